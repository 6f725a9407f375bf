// A GEMM of bf16 activations against integer weights widened to bf16 pairs, on AVX512-BF16
// (VDPBF16PS), shared by the W8A16 (w8a16_bf16.cpp) and int4 (int4_bf16.cpp) bodies. Their
// weights differ only in how a K block of a column group is widened into the panel; the
// scales, summation order and threading are the same:
//   panel[(kp * nv + v) * 32 + 2c + e] = bf16(w[16 (nb0 + v) + c][kb + 2 kp + e]) (0 past ke),
//   exact small integers (int8 codes, or int4 codes minus their zero point);
//   per chunk of C values (a group, or 128 per channel) s = fp32 sum of x w (VDPBF16PS:
//   exact products, added one after the other), then y = fma(s, scale[n, chunk], y), + bias.
// Tiles of MR rows x NV blocks of 16 columns: per k pair, NV panel vectors, MR broadcasts of
// the row's (x[k], x[k+1]), MR x NV VDPBF16PS.
#pragma once

// GCC 12 reports the _mm512_undefined_* placeholders inside the intrinsics headers as
// (maybe) uninitialized (GCC bug 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/target_bf16.h"

namespace lathe {
namespace bf16p {

constexpr int kCols = 16;        // columns per packed block
constexpr int64_t kMB = 64;      // rows per task
constexpr int64_t kKB = 256;     // K values per panel (rounded up to whole chunks)
constexpr int kMR = 8, kNV = 3;  // 24 accumulators + 3 panel vectors + 1 broadcast

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The scales and shape the driver needs: scale[n, k0 / C] at scales[(nb * G + k0 / g) * 16 + c]
// (g = 0: one scale per column, G = 1).
struct W {
  const float* scales;  // [NB][G][16]
  int64_t N, K, g, G, NB, C;
  const float* scale(int64_t nb, int64_t k0) const { return scales + (nb * G + (g ? k0 / g : 0)) * kCols; }
};

LATHE_TBF16 inline __m512bh as_bh(__m512i x) { return reinterpret_cast<__m512bh>(x); }

// Rows x[0..MR) (stride ldx) x blocks nb0..nb0+NV over [kb, ke) (whole chunks); the running
// sums y live in acc_out (fp32 [rows][ldy], zero when first).
template <int MR, int NV>
LATHE_TBF16 inline void tile(const W& w, const uint16_t* panel, const uint16_t* x, int64_t ldx, int64_t nb0, int64_t kb,
                      int64_t ke, bool first, float* y, int64_t ldy) {
  __m512 fy[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) fy[r][v] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(y + r * ldy + v * kCols);
  for (int64_t k0 = kb; k0 < ke; k0 += w.C) {
    const int64_t kc = std::min(w.C, w.K - k0);
    __m512 acc[MR][NV];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
    const uint16_t* pp = panel + (k0 - kb) / 2 * NV * 32;
    const uint16_t* xk = x + k0;
    const int64_t full = kc / 2;
    for (int64_t kp = 0; kp < full; ++kp) {
      __m512i wv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_si512(pp + (kp * NV + v) * 32);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        int32_t pr;
        std::memcpy(&pr, xk + r * ldx + 2 * kp, 4);
        const __m512bh a = as_bh(_mm512_set1_epi32(pr));
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, as_bh(wv[v]));
      }
    }
    if (kc & 1) {  // the last k of an odd K: (x[k], 0) against (code, 0)
      __m512i wv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_si512(pp + (full * NV + v) * 32);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m512bh a = as_bh(_mm512_set1_epi32(xk[r * ldx + 2 * full]));
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, as_bh(wv[v]));
      }
    }
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __m512 sc = _mm512_loadu_ps(w.scale(nb0 + v, k0));
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) fy[r][v] = _mm512_fmadd_ps(acc[r][v], sc, fy[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(y + r * ldy + v * kCols, fy[r][v]);
}

using TileFn = void (*)(const W&, const uint16_t*, const uint16_t*, int64_t, int64_t, int64_t, int64_t, bool, float*,
                        int64_t);

template <int MR, int NV>
TileFn pick_nv(int nv) {
  if constexpr (NV == 1) return tile<MR, 1>;
  else return nv >= NV ? tile<MR, NV> : pick_nv<MR, NV - 1>(nv);
}

template <int MR>
TileFn pick(int mr, int nv) {
  if constexpr (MR == 1) return pick_nv<1, kNV>(nv);
  else return mr >= MR ? pick_nv<MR, kNV>(nv) : pick<MR - 1>(mr, nv);
}

// y (fp32, [M][ldy], ldy = NB * 16) + bias, rounded to bf16 (round to nearest even).
LATHE_TBF16 inline void finish_row(const float* y, const float* bias, int64_t N, uint16_t* out) {
  for (int64_t n0 = 0; n0 < N; n0 += 16) {
    const __mmask16 m = N - n0 >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (N - n0)) - 1);
    __m512 v = _mm512_loadu_ps(y + n0);
    if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bias + n0));
    _mm256_mask_storeu_epi16(out + n0, m, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
  }
}

// The whole product: y[M][N] (bf16, row stride ldo) = x (bf16 [M][K], row stride ldx) W^T +
// bias; widen(nb0, nv, kb, ke, panel) fills the panel of one K block.
template <class Widen>
void gemm(const uint16_t* x, int64_t M, int64_t ldx, const W& w, const Widen& widen, const float* bias,
          uint16_t* out, int64_t ldo, int nthreads) {
  const int64_t K = w.K, N = w.N;
  const int64_t ldy = w.NB * kCols;
  thread_local std::vector<float> ybuf;
  if (static_cast<int64_t>(ybuf.size()) < M * ldy) ybuf.resize(M * ldy);
  float* Y = ybuf.data();
  const int64_t ngroups = ceil_div(w.NB, kNV), mblocks = ceil_div(M, kMB), tasks = ngroups * mblocks;
  const int64_t KB = ceil_div(kKB, w.C) * w.C;
#pragma omp parallel num_threads(nthreads) if (tasks > 1)
  {
    std::vector<uint16_t> panel(ceil_div(KB, 2) * kNV * 32);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t mb = t / ngroups, nb0 = (t % ngroups) * kNV;
      const int nv = static_cast<int>(std::min<int64_t>(kNV, w.NB - nb0));
      const int64_t m_beg = mb * kMB, m_end = std::min(M, m_beg + kMB);
      const int64_t ntiles = ceil_div(m_end - m_beg, kMR), step = ceil_div(m_end - m_beg, ntiles);
      for (int64_t kb = 0; kb < K; kb += KB) {
        const int64_t ke = std::min(K, kb + KB);
        widen(nb0, nv, kb, ke, panel.data());
        for (int64_t m0 = m_beg; m0 < m_end; m0 += step) {
          const int mr = static_cast<int>(std::min<int64_t>(step, m_end - m0));
          pick<kMR>(mr, nv)(w, panel.data(), x + m0 * ldx, ldx, nb0, kb, ke, kb == 0, Y + m0 * ldy + nb0 * kCols, ldy);
        }
      }
    }
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) finish_row(Y + m * ldy, bias, N, out + m * ldo);
  }
}

}  // namespace bf16p
}  // namespace lathe
