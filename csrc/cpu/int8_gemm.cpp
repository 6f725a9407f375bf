// W8A8 linear: per-token dynamic int8 activations x per-channel int8 weights, int32
// accumulation, fp32 epilogue (scales, bias, optional GELU/SiLU). Three bodies, one per ISA:
//   avx512_vnni: VPDPBUSD on u8 (a + 128) x s8 weights, 6 rows x 64 columns per tile.
//   avx2:        VPMADDWD on s16-widened operands (exact; VPMADDUBSW would saturate).
//   scalar:      portable reference loops over the same packed layout.
#include "cpu/int8_gemm.h"
#include "cpu/int8_gemm_amx.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/isa.h"
#include "cpu/vec_math.h"

namespace lathe {
namespace {

constexpr int kNB = 16;  // output channels per packed block
constexpr int kKB = 4;   // k per packed group (one VPDPBUSD lane)

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline float apply_act_scalar(float v, int act) {
  if (act == 1) return 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f));
  if (act == 2) return v / (1.0f + std::exp(-v));
  return v;
}

// x is read as x[k] * sm[k] when a SmoothQuant vector is given (sm = 1 / smoothing scale).
inline float smoothed(const float* x, const float* sm, int64_t k) { return sm ? x[k] * sm[k] : x[k]; }

// Per-token quantization parameters. Symmetric: s = amax / 127, zero point 128 (codes 1..255).
// Asymmetric: the range [min(x, 0), max(x, 0)] over 255 steps; skewed rows (GELU outputs)
// keep twice the resolution. Codes are always u8, so every ISA body reads the same buffer.
struct RowQ {
  float scale;
  int32_t zp;
};

inline RowQ row_params(float lo, float hi, bool finite, bool asym) {
  if (!finite) return {NAN, 0};  // NaN/Inf propagate as NaN rows, never as garbage
  if (!asym) {
    const float amax = std::max(-lo, hi);
    return {amax > 0.f ? amax / 127.f : 1.f, 128};
  }
  lo = std::min(lo, 0.f);
  hi = std::max(hi, 0.f);
  const float s = hi > lo ? (hi - lo) / 255.f : 1.f;
  const float z = std::nearbyint(-lo / s);
  return {s, static_cast<int32_t>(std::min(255.f, std::max(0.f, z)))};
}

inline RowQ row_params_scalar(const float* x, const float* sm, int64_t K, bool asym) {
  float lo = 0.f, hi = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    const float v = smoothed(x, sm, k);
    if (!std::isfinite(v)) return row_params(0, 0, false, asym);
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  return row_params(lo, hi, true, asym);
}

// ---------------------------------------------------------------- quantization (one pass)
// q = clamp(round_half_even(x * (1/s)) + zp, 0, 255) (symmetric: clamp to +-127 before the
// +128). A multiply by the fp32 reciprocal, not a division: 10x cheaper in the vector unit,
// and the PyTorch reference (lathe.kernels.reference.quantize_rows_u8) does the same.
void quantize_row_scalar(const float* x, const float* sm, int64_t K, RowQ p, bool asym,
                         uint8_t* q) {
  const int lo = asym ? 0 : -127, hi = asym ? 255 : 127;
  const int add = asym ? p.zp : 0, post = asym ? 0 : 128;
  const float inv = 1.f / p.scale;
  for (int64_t k = 0; k < K; ++k) {
    int v = static_cast<int>(std::nearbyint(smoothed(x, sm, k) * inv)) + add;
    q[k] = static_cast<uint8_t>(std::min(hi, std::max(lo, v)) + post);
  }
}

LATHE_T512 inline __m512 load_smoothed(const float* x, const float* sm, int64_t k, __mmask16 m) {
  const __m512 v = _mm512_maskz_loadu_ps(m, x + k);
  return sm ? _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, sm + k)) : v;
}

LATHE_T512 void quantize_row_avx512(const float* x, const float* sm, int64_t K, RowQ p,
                                     bool asym, uint8_t* q) {
  const __m512 inv = _mm512_set1_ps(1.f / p.scale);
  const __m512i lo = _mm512_set1_epi32(asym ? 0 : -127), hi = _mm512_set1_epi32(asym ? 255 : 127);
  const __m512i add = _mm512_set1_epi32(asym ? p.zp : 0);
  const __m512i post = _mm512_set1_epi32(asym ? 0 : 128);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - k)) - 1);
    // cvtps rounds half to even under the default MXCSR, as std::nearbyint does
    __m512i i = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(load_smoothed(x, sm, k, m), inv)), add);
    i = _mm512_add_epi32(_mm512_min_epi32(hi, _mm512_max_epi32(lo, i)), post);
    _mm_mask_storeu_epi8(q + k, m, _mm512_cvtepi32_epi8(i));
  }
}

LATHE_T512 RowQ row_params_avx512(const float* x, const float* sm, int64_t K, bool asym) {
  __m512 vlo = _mm512_setzero_ps(), vhi = _mm512_setzero_ps();
  __m512 bad = _mm512_setzero_ps();  // v - v is NaN exactly where v is NaN or Inf
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - k)) - 1);
    const __m512 v = load_smoothed(x, sm, k, m);
    vlo = _mm512_min_ps(vlo, v);
    vhi = _mm512_max_ps(vhi, v);
    bad = _mm512_add_ps(bad, _mm512_sub_ps(v, v));
  }
  return row_params(_mm512_reduce_min_ps(vlo), _mm512_reduce_max_ps(vhi),
                    std::isfinite(_mm512_reduce_add_ps(bad)), asym);
}

// Quantizes all rows into `q` (row stride ldq; the K..ldq padding holds the zero point, which
// meets zero weights anyway), fills scale[M] and zp[M].
void quantize_rows(const float* x, const float* sm, int64_t M, int64_t K, int64_t ldx,
                   uint8_t* q, int64_t ldq, float* scale, int32_t* zp, bool asym, Isa isa,
                   int nthreads) {
  const bool vec = isa == Isa::Avx512Vnni;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M * K > 32768)
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * ldx;
    uint8_t* qr = q + m * ldq;
    const RowQ p = vec ? row_params_avx512(xr, sm, K, asym) : row_params_scalar(xr, sm, K, asym);
    scale[m] = p.scale;
    zp[m] = p.zp;
    if (std::isnan(p.scale)) {
      std::memset(qr, 0, ldq);
      continue;
    }
    if (vec) quantize_row_avx512(xr, sm, K, p, asym, qr);
    else quantize_row_scalar(xr, sm, K, p, asym, qr);
    std::memset(qr + K, p.zp, ldq - K);
  }
}

// ---------------------------------------------------------------- AVX-512 VNNI body
template <int MR, int NV>
LATHE_T512 void tile_vnni(const uint8_t* A, int64_t lda, const float* ascale, const int32_t* azp,
                           const int8_t* packed, int64_t KB, int64_t nb0, const int32_t* colsum,
                           const float* wsc, const float* bias, int64_t N, float* out,
                           int64_t ldo, int act) {
  __m512i acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_si512();
  const int8_t* bp = packed + nb0 * KB * 64;
  const int64_t bstride = KB * 64;
  for (int64_t kb = 0; kb < KB; ++kb) {
    __m512i b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_si512(bp + v * bstride + kb * 64);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t a4;
      std::memcpy(&a4, A + r * lda + kb * 4, 4);
      const __m512i a = _mm512_set1_epi32(a4);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], a, b[v]);
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const int64_t n0 = (nb0 + v) * kNB;
    if (n0 >= N) break;
    const __mmask16 m = N - n0 >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (N - n0)) - 1);
    const __m512i cs = _mm512_loadu_si512(colsum + n0);
    const __m512 ws = _mm512_maskz_loadu_ps(m, wsc + n0);
    const __m512 bs = bias ? _mm512_maskz_loadu_ps(m, bias + n0) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      // sum_k (q - zp) w = sum_k q w - zp * colsum
      const __m512i corr = _mm512_mullo_epi32(cs, _mm512_set1_epi32(azp[r]));
      __m512 y = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][v], corr));
      y = _mm512_mul_ps(_mm512_mul_ps(y, _mm512_set1_ps(ascale[r])), ws);
      y = _mm512_add_ps(y, bs);
      y = act_avx512(y, act);
      _mm512_mask_storeu_ps(out + r * ldo + n0, m, y);
    }
  }
}

using VnniTile = void (*)(const uint8_t*, int64_t, const float*, const int32_t*, const int8_t*,
                          int64_t, int64_t,
                          const int32_t*, const float*, const float*, int64_t, float*, int64_t,
                          int);

template <int MR>
constexpr VnniTile vnni_for_nv(int nv) {
  return nv == 1 ? tile_vnni<MR, 1>
         : nv == 2 ? tile_vnni<MR, 2>
         : nv == 3 ? tile_vnni<MR, 3>
                   : tile_vnni<MR, 4>;
}

VnniTile vnni_tile(int mr, int nv) {
  switch (mr) {
    case 1: return vnni_for_nv<1>(nv);
    case 2: return vnni_for_nv<2>(nv);
    case 3: return vnni_for_nv<3>(nv);
    case 4: return vnni_for_nv<4>(nv);
    case 5: return vnni_for_nv<5>(nv);
    default: return vnni_for_nv<6>(nv);
  }
}

void linear_vnni(const uint8_t* A, int64_t lda, const float* ascale, const int32_t* azp, int64_t M,
                 const int8_t* packed, int64_t KB, const int32_t* colsum, const float* wsc,
                 const float* bias, int64_t N, float* out, int64_t ldo, int act, int nthreads) {
  constexpr int MR = 6, NV = 4;
  const int64_t NB = ceil_div(N, kNB);
  const int64_t mtiles = ceil_div(M, MR), ngroups = ceil_div(NB, NV);
  const int64_t tasks = mtiles * ngroups;
  // n-major order: a thread walks down the M tiles of one weight panel, which stays in cache.
#pragma omp parallel for num_threads(nthreads) schedule(static) if (tasks > 1)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t g = t / mtiles, mt = t % mtiles;
    const int64_t m0 = mt * MR, nb0 = g * NV;
    const int mr = static_cast<int>(std::min<int64_t>(MR, M - m0));
    const int nv = static_cast<int>(std::min<int64_t>(NV, NB - nb0));
    vnni_tile(mr, nv)(A + m0 * lda, lda, ascale + m0, azp + m0, packed, KB, nb0, colsum, wsc, bias, N,
                      out + m0 * ldo, ldo, act);
  }
}

// ---------------------------------------------------------------- AVX2 body
template <int MR>
LATHE_T256 void tile_avx2(const uint8_t* A, int64_t lda, const float* ascale, const int32_t* azp,
                           const int8_t* packed, const int32_t* colsum, int64_t KB, int64_t nb,
                           int half,
                           const float* wsc, const float* bias, int64_t N, float* out,
                           int64_t ldo, int act) {
  __m256i lo[MR], hi[MR];
  for (int r = 0; r < MR; ++r) lo[r] = hi[r] = _mm256_setzero_si256();
  const int8_t* bp = packed + nb * KB * 64 + half * 32;
  for (int64_t kb = 0; kb < KB; ++kb) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp + kb * 64));
    const __m256i wlo = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(w));       // cols 0-3
    const __m256i whi = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(w, 1));  // cols 4-7
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      int32_t a4;
      std::memcpy(&a4, A + r * lda + kb * 4, 4);
      const __m256i a = _mm256_broadcastq_epi64(_mm_cvtepu8_epi16(_mm_cvtsi32_si128(a4)));
      lo[r] = _mm256_add_epi32(lo[r], _mm256_madd_epi16(wlo, a));
      hi[r] = _mm256_add_epi32(hi[r], _mm256_madd_epi16(whi, a));
    }
  }
  const int64_t n0 = nb * kNB + half * 8;
  const int cols = static_cast<int>(std::min<int64_t>(8, N - n0));
  for (int r = 0; r < MR; ++r) {
    // pairs of k-partial sums -> one int32 per column, in column order
    __m256i s = _mm256_permute4x64_epi64(_mm256_hadd_epi32(lo[r], hi[r]), 0xD8);
    alignas(32) int32_t acc[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(acc), s);
    for (int c = 0; c < cols; ++c) {
      const int32_t a = acc[c] - azp[r] * colsum[n0 + c];
      float y = static_cast<float>(a) * ascale[r] * wsc[n0 + c];
      if (bias) y += bias[n0 + c];
      out[r * ldo + n0 + c] = apply_act_scalar(y, act);
    }
  }
}

void linear_avx2(const uint8_t* A, int64_t lda, const float* ascale, const int32_t* azp,
                 int64_t M, const int8_t* packed, const int32_t* colsum, int64_t KB,
                 const float* wsc, const float* bias, int64_t N,
                 float* out, int64_t ldo, int act, int nthreads) {
  constexpr int MR = 4;
  const int64_t halves = ceil_div(N, 8);
  const int64_t mtiles = ceil_div(M, MR), tasks = mtiles * halves;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (tasks > 1)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t h = t / mtiles, mt = t % mtiles, m0 = mt * MR;
    const int mr = static_cast<int>(std::min<int64_t>(MR, M - m0));
    auto* fn = mr == 1 ? tile_avx2<1> : mr == 2 ? tile_avx2<2> : mr == 3 ? tile_avx2<3>
                                                                          : tile_avx2<4>;
    fn(A + m0 * lda, lda, ascale + m0, azp + m0, packed, colsum, KB, h / 2, static_cast<int>(h % 2), wsc, bias, N,
       out + m0 * ldo, ldo, act);
  }
}

// ---------------------------------------------------------------- scalar body
void linear_scalar(const uint8_t* A, int64_t lda, const float* ascale, const int32_t* azp,
                   int64_t M, const int8_t* packed, const int32_t* colsum, int64_t KB, const float* wsc, const float* bias,
                   int64_t N, float* out, int64_t ldo, int act, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M * N > 256)
  for (int64_t n = 0; n < N; ++n) {
    const int8_t* col = packed + (n / kNB) * KB * 64 + (n % kNB) * kKB;
    for (int64_t m = 0; m < M; ++m) {
      const uint8_t* a = A + m * lda;
      int32_t acc = 0;
      for (int64_t kb = 0; kb < KB; ++kb)
        for (int j = 0; j < kKB; ++j) acc += int32_t(a[kb * 4 + j]) * int32_t(col[kb * 64 + j]);
      acc -= azp[m] * colsum[n];
      float y = static_cast<float>(acc) * ascale[m] * wsc[n];
      if (bias) y += bias[n];
      out[m * ldo + n] = apply_act_scalar(y, act);
    }
  }
}

}  // namespace

int64_t int8_packed_cols(int64_t N) { return ceil_div(N, kNB) * kNB; }

int64_t int8_packed_bytes(int64_t N, int64_t K) {
  return ceil_div(N, kNB) * ceil_div(K, kKB) * kNB * kKB;
}

void int8_pack_weight(const int8_t* w, int64_t N, int64_t K, int64_t ldw, int8_t* packed,
                      int32_t* colsum) {
  check(w && packed && colsum, "int8_pack_weight: null pointer");
  check(N > 0 && K > 0, "int8_pack_weight: N and K must be positive, got N=" +
                            std::to_string(N) + " K=" + std::to_string(K));
  check(ldw >= K, "int8_pack_weight: row stride " + std::to_string(ldw) + " < K=" +
                      std::to_string(K));
  const int64_t NB = ceil_div(N, kNB), KB = ceil_div(K, kKB);
  std::memset(packed, 0, NB * KB * kNB * kKB);
  std::memset(colsum, 0, NB * kNB * sizeof(int32_t));
  for (int64_t n = 0; n < N; ++n) {
    int8_t* dst = packed + (n / kNB) * KB * 64 + (n % kNB) * kKB;
    int32_t s = 0;
    for (int64_t k = 0; k < K; ++k) {
      const int8_t v = w[n * ldw + k];
      dst[(k / kKB) * 64 + (k % kKB)] = v;
      s += v;
    }
    colsum[n] = s;
  }
}

void quantize_rows_u8(const float* x, int64_t M, int64_t K, int64_t ldx, uint8_t* q,
                      float* scale, int32_t* zp, int asym, int nthreads) {
  check(x && q && scale && zp, "quantize_rows_u8: null pointer");
  check(M >= 0 && K > 0 && ldx >= K, "quantize_rows_u8: bad shape");
  quantize_rows(x, nullptr, M, K, ldx, q, K, scale, zp, asym != 0, active_isa(),
                std::max(1, nthreads));
}

void int8_linear(const float* x, const float* smooth, int64_t M, int64_t K, int64_t ldx,
                 const int8_t* packed,
                 const int32_t* colsum, const float* w_scale, const float* bias, int64_t N,
                 float* out, int64_t ldo, int act, int asym, int nthreads) {
  check(M >= 0 && K > 0 && N > 0, "int8_linear: need M >= 0, K > 0, N > 0; got M=" +
                                      std::to_string(M) + " K=" + std::to_string(K) +
                                      " N=" + std::to_string(N));
  check(ldx >= K && ldo >= N, "int8_linear: row strides smaller than the rows (ldx=" +
                                  std::to_string(ldx) + ", K=" + std::to_string(K) +
                                  ", ldo=" + std::to_string(ldo) + ", N=" + std::to_string(N) +
                                  ")");
  check(act >= 0 && act <= 2, "int8_linear: act must be 0 (none), 1 (gelu) or 2 (silu)");
  if (M == 0) return;
  check(x && packed && colsum && w_scale && out, "int8_linear: null pointer");
  nthreads = std::max(1, nthreads);
  const Isa isa = active_isa();
  // AMX (int8_gemm_amx.cpp) reads the codes as A tiles: rows padded to 32, stride to 64 bytes.
  const bool amx = int8_use_amx(M);
  const int64_t KB = ceil_div(K, kKB), lda = amx ? ceil_div(K, kAmxKPad) * kAmxKPad : KB * kKB;
  const int64_t qrows = amx ? ceil_div(M, kAmxRowPad) * kAmxRowPad : M;
  thread_local std::vector<uint8_t> qbuf;
  thread_local std::vector<float> sbuf;
  thread_local std::vector<int32_t> zbuf;
  if (static_cast<int64_t>(qbuf.size()) < qrows * lda + 64) qbuf.resize(qrows * lda + 64);
  if (static_cast<int64_t>(sbuf.size()) < M) sbuf.resize(M), zbuf.resize(M);
  quantize_rows(x, smooth, M, K, ldx, qbuf.data(), lda, sbuf.data(), zbuf.data(), asym != 0, isa,
                nthreads);
  if (amx) {
    int8_gemm_amx(qbuf.data(), lda, sbuf.data(), zbuf.data(), M, packed, K, colsum, w_scale, bias, N, out, ldo,
                  act, nthreads);
    return;
  }
  switch (isa) {
    case Isa::Avx512Vnni:
      linear_vnni(qbuf.data(), lda, sbuf.data(), zbuf.data(), M, packed, KB, colsum, w_scale,
                  bias, N, out, ldo, act, nthreads);
      break;
    case Isa::Avx2:
      linear_avx2(qbuf.data(), lda, sbuf.data(), zbuf.data(), M, packed, colsum, KB, w_scale,
                  bias, N, out, ldo, act, nthreads);
      break;
    default:
      linear_scalar(qbuf.data(), lda, sbuf.data(), zbuf.data(), M, packed, colsum, KB, w_scale,
                    bias, N, out, ldo, act, nthreads);
  }
}

}  // namespace lathe

// ---------------------------------------------------------------- peak (for the benchmark)
namespace lathe {
namespace {
LATHE_T512 int64_t vnni_loop(int64_t iters) {
  // 16 independent accumulators: enough to hide VPDPBUSD's latency on every core we know.
  __m512i acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_set1_epi32(i);
  const __m512i a = _mm512_set1_epi32(0x01010101), b = _mm512_set1_epi32(0x01020304);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
  }
  __m512i s = acc[0];
  for (int i = 1; i < 16; ++i) s = _mm512_add_epi32(s, acc[i]);
  return _mm512_reduce_add_epi32(s);
}
}  // namespace

double vnni_peak_gops(int nthreads) {
  check(static_cast<int>(best_isa()) >= static_cast<int>(Isa::Avx512Vnni), "vnni_peak_gops: this CPU has no AVX-512 VNNI");
  nthreads = std::max(1, nthreads);
  const int64_t iters = 4'000'000;
  volatile int64_t sink = 0;
  const double t0 = omp_get_wtime();
#pragma omp parallel num_threads(nthreads)
  { sink += vnni_loop(iters); }
  const double dt = omp_get_wtime() - t0;
  // 16 instructions x 64 u8*s8 MACs x 2 ops each, per iteration, per thread
  return 16.0 * 64 * 2 * iters * nthreads / dt / 1e9;
}
}  // namespace lathe
