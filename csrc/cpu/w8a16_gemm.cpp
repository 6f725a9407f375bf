// W8A16 linear (int8 weights, fp32/bf16 activations). See w8a16_gemm.h for the packed layout
// and the summation order. One tile routine per ISA:
//   avx512: MR rows x NV column blocks (16 columns each) of fp32 accumulators; per k, NV
//           VPMOVSXBD (16 int8 codes straight from memory) + VCVTDQ2PS, shared by the MR rows,
//           then MR x NV FMAs with the broadcast x[r, k]. M = 1 is the same tile with one
//           row and more column blocks (streams the weights once, 1 FMA per 16 bytes).
//           Row blocks of 3+ tiles widen each K block's codes once into an fp32 panel in L1
//           and the tiles read it (the conversion then costs nothing per row).
//   avx2:   the same with 8-column halves (2 ymm a block).
//   scalar: the same math, column by column, in portable loops.
// All three compute the same fp32 operations in the same order (FMA chains per column and
// chunk, then fma(chunk, scale, y), then + bias), so their results are bit-identical.
// Work: tasks = (row block of kMB rows) x (column group), row-block-major with dynamic
// scheduling: a thread reuses one row block of x from its L2 across column groups, and one
// column group's weight panel (a K block of kKB values) across the row block's tiles.
// Measured (1 core, CPU time, AVX-512): M = 1 reads 27-29 GB/s of int8 weights (compute-
// bound on the widening: 3 vector ops per 16 weights), 2-5x torch fp32; M >= 128 runs at
// 140-155 GFLOP/s, 0.85-1.0x of MKL's fp32 GEMM.
#include "cpu/w8a16_gemm.h"
#include "cpu/w8a16_bf16.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/bf16.h"
#include "cpu/isa.h"
#include "cpu/vec_math.h"

#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace lathe {
namespace {

constexpr int kCols = 16;        // output columns per packed block
constexpr int64_t kChunk = 128;  // K values summed apart per channel (blocked summation)
constexpr int64_t kMB = 64;      // rows per task (the x block a thread keeps in L2)
constexpr int64_t kKB = 128;     // K values per pass over a row block (rounded up to whole chunks)
// Tile shapes (measured on a 2-core AVX-512 Xeon); overridable with -D for tuning.
#ifndef LATHE_W8_MR
#define LATHE_W8_MR 8
#endif
#ifndef LATHE_W8_NV
#define LATHE_W8_NV 3
#endif
#ifndef LATHE_W8_GEMV_NV
#define LATHE_W8_GEMV_NV 4
#endif
constexpr int kMR = LATHE_W8_MR, kNV = LATHE_W8_NV, kGemvNV = LATHE_W8_GEMV_NV;
constexpr int kMR2 = 6;  // AVX2 rows a tile (12 accumulators + 2 weights + 1 broadcast of 16 ymm)

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }


struct Packed {
  const int8_t* codes;
  const float* scales;
  int64_t N, K, g, G, NB, C;  // C: chunk length (g, or kChunk per channel)

  const int8_t* block(int64_t nb) const { return codes + nb * K * kCols; }
  // scales of block nb for the chunk starting at k0
  const float* scale(int64_t nb, int64_t k0) const { return scales + (nb * G + (g ? k0 / g : 0)) * kCols; }
};

Packed make_packed(const uint8_t* buf, int64_t N, int64_t K, int64_t g) {
  Packed p{reinterpret_cast<const int8_t*>(buf), reinterpret_cast<const float*>(buf + w8a16_scale_offset(N, K)),
           N, K, g, g ? K / g : 1, ceil_div(N, kCols), g ? g : kChunk};
  return p;
}


inline __mmask16 tail16(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

// One tile: rows x[0..MR) (row stride ldx) times column blocks nb0..nb0+NV over the K range
// [kb, ke) (whole chunks). The running outputs live in out (fp32, row stride ldo, ncols
// valid columns): zero when `first`, else read back; `bias` (the last K range only) is
// added before the final store. `panel` (AVX-512, row blocks taller than one tile): the
// codes of this K range already widened to fp32, [ke - kb][NV][16], shared by the tiles.
struct TileArgs {
  const float* panel;
  const float* x;
  int64_t ldx, nb0, kb, ke;
  bool first;
  const float* bias;
  float* out;
  int64_t ldo, ncols;
};
using Tile = void (*)(const TileArgs&, const Packed&);

// ---------------------------------------------------------------- AVX-512
template <int MR, int NV, bool PANEL>
LATHE_T512 void tile_avx512(const TileArgs& a, const Packed& p) {
  alignas(64) float fy[MR * NV * 16];  // running outputs: the registers hold the chunk sums
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    const __mmask16 m = v * kCols < a.ncols ? tail16(a.ncols - v * kCols) : 0;
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
      _mm512_store_ps(fy + (r * NV + v) * 16,
                      a.first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m, a.out + r * a.ldo + v * kCols));
  }
  const int8_t* w0 = p.block(a.nb0);
  const int64_t bstride = p.K * kCols;
  for (int64_t k0 = a.kb; k0 < a.ke; k0 += p.C) {
    const int64_t kc = std::min(p.C, p.K - k0);
    __m512 acc[MR][NV];
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
    const int8_t* wk = w0 + k0 * kCols;
    const float* xk = a.x + k0;
    for (int64_t k = 0; k < kc; ++k) {
      __m512 wv[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v)
        wv[v] = PANEL ? _mm512_loadu_ps(a.panel + ((k0 - a.kb + k) * NV + v) * kCols)
                      : _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                            _mm_loadu_si128(reinterpret_cast<const __m128i*>(wk + v * bstride + k * kCols))));
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        const __m512 xa = _mm512_set1_ps(xk[r * a.ldx + k]);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(xa, wv[v], acc[r][v]);
      }
    }
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const __m512 s = _mm512_loadu_ps(p.scale(a.nb0 + v, k0));
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        float* f = fy + (r * NV + v) * 16;
        _mm512_store_ps(f, _mm512_fmadd_ps(acc[r][v], s, _mm512_load_ps(f)));
      }
    }
  }
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    if (v * kCols >= a.ncols) break;
    const __mmask16 m = tail16(a.ncols - v * kCols);
    const __m512 b = a.bias ? _mm512_maskz_loadu_ps(m, a.bias + v * kCols) : _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512 y = _mm512_load_ps(fy + (r * NV + v) * 16);
      _mm512_mask_storeu_ps(a.out + r * a.ldo + v * kCols, m, a.bias ? _mm512_add_ps(y, b) : y);
    }
  }
}

// ---------------------------------------------------------------- AVX2
template <int MR, int NV>
LATHE_T256 void tile_avx2(const TileArgs& a, const Packed& p) {
  constexpr int NH = 2 * NV;  // 8-column halves
  const int nc = static_cast<int>(std::min<int64_t>(NH * 8, a.ncols));
  alignas(32) float fy[MR * NH * 8];  // the running outputs, in memory: 16 ymm are few
  std::memset(fy, 0, sizeof(fy));
  if (!a.first)
    for (int r = 0; r < MR; ++r) std::memcpy(fy + r * NH * 8, a.out + r * a.ldo, nc * sizeof(float));
  const int8_t* w0 = p.block(a.nb0);
  const int64_t bstride = p.K * kCols;
  for (int64_t k0 = a.kb; k0 < a.ke; k0 += p.C) {
    const int64_t kc = std::min(p.C, p.K - k0);
    __m256 acc[MR][NH];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
      for (int h = 0; h < NH; ++h) acc[r][h] = _mm256_setzero_ps();
    const int8_t* wk = w0 + k0 * kCols;
    const float* xk = a.x + k0;
    for (int64_t k = 0; k < kc; ++k) {
      __m256 wv[NH];
#pragma GCC unroll 8
      for (int h = 0; h < NH; ++h)
        wv[h] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
            reinterpret_cast<const __m128i*>(wk + (h / 2) * bstride + k * kCols + (h % 2) * 8))));
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m256 xa = _mm256_broadcast_ss(xk + r * a.ldx + k);
#pragma GCC unroll 8
        for (int h = 0; h < NH; ++h) acc[r][h] = _mm256_fmadd_ps(xa, wv[h], acc[r][h]);
      }
    }
#pragma GCC unroll 8
    for (int h = 0; h < NH; ++h) {
      const __m256 s = _mm256_loadu_ps(p.scale(a.nb0 + h / 2, k0) + (h % 2) * 8);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        float* f = fy + (r * NH + h) * 8;
        _mm256_store_ps(f, _mm256_fmadd_ps(acc[r][h], s, _mm256_load_ps(f)));
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < nc; ++c) {
      const float v = fy[r * NH * 8 + c];
      a.out[r * a.ldo + c] = a.bias ? v + a.bias[c] : v;
    }
}

// The panel: codes of blocks nb0..nb0+nv, k in [kb, ke), widened to fp32 once for all the
// row block's tiles (exact: the tiles multiply the same values either way).
LATHE_T512 void widen_panel(const Packed& p, int64_t nb0, int nv, int64_t kb, int64_t ke, float* panel) {
  for (int64_t k = kb; k < ke; ++k)
    for (int v = 0; v < nv; ++v)
      _mm512_storeu_ps(panel + ((k - kb) * nv + v) * kCols,
                      _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                          reinterpret_cast<const __m128i*>(p.block(nb0 + v) + k * kCols)))));
}

// Tile for (mr <= MR rows, nv <= NV blocks), by template recursion. ISA: 0 avx2, 1 avx512
// widening in registers, 2 avx512 reading the panel.
template <int MR, int NV, int ISA>
Tile tile_of() {
  if constexpr (ISA == 0) return tile_avx2<MR, NV>;
  else return tile_avx512<MR, NV, ISA == 2>;
}

template <int MR, int NV, int ISA>
Tile pick_nv(int nv) {
  if constexpr (NV == 1) return tile_of<MR, 1, ISA>();
  else return nv >= NV ? tile_of<MR, NV, ISA>() : pick_nv<MR, NV - 1, ISA>(nv);
}

template <int MR, int NV, int ISA>
Tile pick(int mr, int nv) {
  if constexpr (MR == 1) return pick_nv<1, NV, ISA>(nv);
  else return mr >= MR ? pick_nv<MR, NV, ISA>(nv) : pick<MR - 1, NV, ISA>(mr, nv);
}

// Runs tiles of MR x NV over the whole output (rows x of ldx, fp32 out of ldo). A task is a
// row block x a column group; inside it, K is walked in blocks of whole chunks (>= kKB
// values) and every tile of the row block takes one K block before the next one starts, so
// the weight panel (K block x NV*16 bytes) stays in L1 and x's rows in L2.
template <int MR, int NV, bool W512>
void gemm(const float* x, int64_t ldx, int64_t M, const Packed& p, const float* bias, float* out,
          int64_t ldo, int nthreads) {
  const int64_t ngroups = ceil_div(p.NB, NV), mblocks = ceil_div(M, kMB), tasks = ngroups * mblocks;
  const int64_t KB = ceil_div(kKB, p.C) * p.C;
#pragma omp parallel num_threads(nthreads) if (tasks > 1)
  {
    std::vector<float> panel;
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t mb = t / ngroups, nb0 = (t % ngroups) * NV, n0 = nb0 * kCols;
      const int nv = static_cast<int>(std::min<int64_t>(NV, p.NB - nb0));
      const int64_t m_beg = mb * kMB, m_end = std::min(M, m_beg + kMB);
      // equal tile heights: 16 rows run as 8 + 8, not 12 + 4
      const int64_t ntiles = ceil_div(m_end - m_beg, MR), step = ceil_div(m_end - m_beg, ntiles);
      const bool use_panel = W512 && ntiles >= 3;  // measured: 2 tiles gain less than the panel costs
      if (use_panel && panel.size() < static_cast<size_t>(KB * NV * kCols)) panel.resize(KB * NV * kCols);
      for (int64_t kb = 0; kb < p.K; kb += KB) {
        const int64_t ke = std::min(p.K, kb + KB);
        if constexpr (W512)
          if (use_panel) widen_panel(p, nb0, nv, kb, ke, panel.data());
        for (int64_t m0 = m_beg; m0 < m_end; m0 += step) {
          const int mr = static_cast<int>(std::min<int64_t>(step, m_end - m0));
          const TileArgs a{panel.data(), x + m0 * ldx, ldx, nb0, kb, ke, kb == 0,
                           ke == p.K && bias ? bias + n0 : nullptr, out + m0 * ldo + n0, ldo, p.N - n0};
          if (!W512) pick<MR, NV, 0>(mr, nv)(a, p);
          else if (use_panel) pick<MR, NV, 2>(mr, nv)(a, p);
          else pick<MR, NV, 1>(mr, nv)(a, p);
        }
      }
    }
  }
}

// ---------------------------------------------------------------- scalar
void gemm_scalar(const float* x, int64_t ldx, int64_t M, const Packed& p, const float* bias,
                 float* out, int64_t ldo, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M * p.N > 256)
  for (int64_t n = 0; n < p.N; ++n) {
    const int64_t nb = n / kCols, c = n % kCols;
    const int8_t* w = p.block(nb) + c;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * ldx;
      float y = 0.f;
      for (int64_t k0 = 0; k0 < p.K; k0 += p.C) {
        float acc = 0.f;
        for (int64_t k = k0; k < std::min(p.K, k0 + p.C); ++k)
          acc = std::fma(xm[k], static_cast<float>(w[k * kCols]), acc);
        y = std::fma(acc, p.scale(nb, k0)[c], y);
      }
      out[m * ldo + n] = bias ? y + bias[n] : y;
    }
  }
}

std::string s(int64_t v) { return std::to_string(v); }

void check_shape(int64_t N, int64_t K, int64_t g, const char* fn) {
  check(N > 0 && K > 0, std::string(fn) + ": N and K must be positive, got N=" + s(N) + " K=" + s(K));
  check(g >= 0 && (g == 0 || K % g == 0),
        std::string(fn) + ": group size must be 0 (per channel) or divide K=" + s(K) + ", got " + s(g));
}

}  // namespace

int64_t w8a16_scale_offset(int64_t N, int64_t K) {
  check_shape(N, K, 0, "w8a16_scale_offset");
  return ceil_div(ceil_div(N, kCols) * kCols * K, 64) * 64;
}

int64_t w8a16_packed_bytes(int64_t N, int64_t K, int64_t g) {
  check_shape(N, K, g, "w8a16_packed_bytes");
  return w8a16_scale_offset(N, K) + ceil_div(N, kCols) * kCols * (g ? K / g : 1) * 4;
}

void w8a16_pack(const int8_t* qweight, int64_t ldq, const float* scales, int64_t lds, int64_t N,
                int64_t K, int64_t g, uint8_t* packed) {
  check_shape(N, K, g, "w8a16_pack");
  const int64_t G = g ? K / g : 1;
  check(ldq >= K, "w8a16_pack: qweight row stride " + s(ldq) + " < K=" + s(K));
  check(lds >= G, "w8a16_pack: scales row stride " + s(lds) + " < groups G=" + s(G));
  check(qweight && scales && packed, "w8a16_pack: null pointer");
  std::memset(packed, 0, w8a16_packed_bytes(N, K, g));
  const Packed p = make_packed(packed, N, K, g);
  int8_t* codes = const_cast<int8_t*>(p.codes);
  float* sc = const_cast<float*>(p.scales);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t nb = n / kCols, c = n % kCols;
    for (int64_t k = 0; k < K; ++k) codes[(nb * K + k) * kCols + c] = qweight[n * ldq + k];
    for (int64_t gi = 0; gi < G; ++gi) sc[(nb * G + gi) * kCols + c] = scales[n * lds + gi];
  }
}

void w8a16_linear(const void* x, int dtype, int64_t M, int64_t K, int64_t ldx,
                  const uint8_t* packed, int64_t N, int64_t g, const float* bias, void* out,
                  int64_t ldo, int nthreads) {
  check_shape(N, K, g, "w8a16_linear");
  check(M >= 0, "w8a16_linear: M must be >= 0, got " + s(M));
  check(dtype == 0 || dtype == 1, "w8a16_linear: dtype code must be 0 (fp32) or 1 (bf16), got " + s(dtype));
  check(ldx >= K && ldo >= N, "w8a16_linear: row strides smaller than the rows (ldx=" + s(ldx) +
                                  ", K=" + s(K) + ", ldo=" + s(ldo) + ", N=" + s(N) + ")");
  if (M == 0) return;
  check(x && packed && out, "w8a16_linear: null pointer");
  nthreads = std::max(1, nthreads);
  const Packed p = make_packed(packed, N, K, g);
  if (dtype == 1 && w8a16_bf16_linear(static_cast<const uint16_t*>(x), M, K, ldx, packed, N, g, bias,
                                      static_cast<uint16_t*>(out), ldo, nthreads))
    return;  // AVX512-BF16 body (w8a16_bf16.cpp)

  // bf16 rows are widened once (M*K values, small beside the N*K weights) and the fp32
  // result narrowed at the end, so the tiles see only fp32.
  const float* xf = static_cast<const float*>(x);
  float* of = static_cast<float*>(out);
  int64_t ldxf = ldx, ldof = ldo;
  thread_local std::vector<float> xbuf, obuf;
  if (dtype == 1) {
    if (static_cast<int64_t>(xbuf.size()) < M * K) xbuf.resize(M * K);
    if (static_cast<int64_t>(obuf.size()) < M * N) obuf.resize(M * N);
    const uint16_t* xh = static_cast<const uint16_t*>(x);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) xbuf[m * K + k] = bf16_to_f32(xh[m * ldx + k]);
    xf = xbuf.data(), ldxf = K;
    of = obuf.data(), ldof = N;
  }
  switch (active_isa()) {
    case Isa::Avx512Vnni:
      if (M == 1) gemm<1, kGemvNV, true>(xf, ldxf, M, p, bias, of, ldof, nthreads);
      else gemm<kMR, kNV, true>(xf, ldxf, M, p, bias, of, ldof, nthreads);
      break;
    case Isa::Avx2:
      if (M == 1) gemm<1, kGemvNV, false>(xf, ldxf, M, p, bias, of, ldof, nthreads);
      else gemm<kMR2, 1, false>(xf, ldxf, M, p, bias, of, ldof, nthreads);
      break;
    default:
      gemm_scalar(xf, ldxf, M, p, bias, of, ldof, nthreads);
  }
  if (dtype == 1) {
    uint16_t* oh = static_cast<uint16_t*>(out);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) oh[m * ldo + n] = f32_to_bf16(obuf[m * N + n]);
  }
}

}  // namespace lathe
