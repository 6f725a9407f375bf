// W4A16 linear (int4 weights in groups, fp32/bf16 activations). See int4_gemm.h for the
// packed layout and the two numeric routes. Three bodies per route, one per ISA:
//   avx512_vnni: INT8_ACT: VPDPBUSD on nibbles widened to u8 (AND / shift+AND) x s8
//                activations, 8 rows x 3 column blocks (48 columns) per tile; M = 1 is a
//                GEMV tile with split accumulators that streams the 4-bit weights once, at
//                the core's load bandwidth.
//                EXACT_FP32: nibbles -> fp32 through VPERMPS (16-entry LUT), (c - z) * s into
//                an L1/L2-resident panel, 6 x 64 FMA micro-kernel; M = 1 dequantizes in
//                registers and FMAs straight away.
//   avx2:        INT8_ACT: VPMADDUBSW (u8 codes x s8, pairs <= 3810, no saturation) summed
//                in s16 over 4 lines (<= 30480), then VPMADDWD into int32;
//                EXACT_FP32: AND+CVT dequant into a panel, 4 x 16 FMA micro-kernel.
//   scalar:      the same math over the same packed layout, in portable loops.
// Work is split over output-column groups (and row tiles) with dynamic scheduling: on a
// shared 2-core machine a static split waits for whichever thread lost its core.
#include "cpu/int4_gemm.h"
#include "cpu/int4_bf16.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "cpu/bf16.h"
#include "cpu/isa.h"
#include "cpu/vec_math.h"

// GCC 12 flags the _mm512_undefined_* inside the intrinsics headers as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace lathe {
namespace {

constexpr int kCols = 16;     // output channels per packed column block
constexpr int kLine = 64;     // bytes per packed line: 16 columns x 4 k x 2 nibbles
constexpr int64_t kKC = 128;  // k per dequantized panel (a multiple of every group size)
// Tile shapes of the AVX-512 INT8_ACT body (measured on a 2-core Xeon, VNNI, no AMX):
// GEMM tiles of kMR rows x kNV column blocks (24 int32 sums in zmm registers); the GEMV
// (M = 1) walks kGemvNV blocks at once. It reads weights at the core's streaming bandwidth
// (measured: same GB/s as a bare 4-stream load loop); software prefetch did not help.
// Overridable at build time (-DLATHE_I4_MR=...) for tuning.
#ifndef LATHE_I4_MR
#define LATHE_I4_MR 8
#endif
#ifndef LATHE_I4_NV
#define LATHE_I4_NV 3
#endif
#ifndef LATHE_I4_GEMV_NV
#define LATHE_I4_GEMV_NV 4
#endif
constexpr int kMR = LATHE_I4_MR, kNV = LATHE_I4_NV, kGemvNV = LATHE_I4_GEMV_NV;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Packed {
  const uint8_t* codes;
  const float* scales;
  const uint8_t* zeros;
  int64_t N, K, g, G, Kp, NB, L, bstride;  // L = g/8 lines a group; bstride = bytes a block
};

Packed make_packed(const uint8_t* codes, const float* scales, const uint8_t* zeros, int64_t N,
                   int64_t K, int64_t g) {
  Packed p{codes, scales, zeros, N, K, g, 0, 0, 0, 0, 0};
  p.G = ceil_div(K, g);
  p.Kp = p.G * g;
  p.NB = ceil_div(N, kCols);
  p.L = g / 8;
  p.bstride = p.G * p.L * kLine;
  return p;
}

// Activations quantized per (row, group): q s8 [M][Kp] (zero past K), sx = amax/127 and
// sxs = sx * sum(q) fp32 [M][G]. Pointers are offset to the tile's first row.
struct ActQ {
  const int8_t* q;
  int64_t ldq;
  const float* sx;
  const float* sxs;
  int64_t G;
};


inline float load_x(const void* x, int dt, int64_t i) {
  return dt == 0 ? static_cast<const float*>(x)[i]
                 : bf16_to_f32(static_cast<const uint16_t*>(x)[i]);
}

inline void store_y(void* out, int dt, int64_t i, float v) {
  if (dt == 0) static_cast<float*>(out)[i] = v;
  else static_cast<uint16_t*>(out)[i] = f32_to_bf16(v);
}

inline int32_t ld32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline __mmask16 tail16(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF)
                 : n <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << n) - 1);
}

// ---------------------------------------------------------------- activation quantization
// Symmetric s8 per (row, group): inv = 127 / amax, q = clamp(round_half_even(x * inv), +-127).
// A group holding NaN/Inf gets sx = sxs = NaN (its rows come out NaN, never garbage); an
// all-zero group (or one too small for 127/amax to be finite) gets q = 0, sx = sxs = 0.
// Every body computes the same q, sx and sxs bit for bit.
void quant_row_scalar(const void* x, int dt, int64_t off, const Packed& p, int8_t* q, float* sx,
                      float* sxs) {
  for (int64_t gi = 0; gi < p.G; ++gi) {
    const int64_t k0 = gi * p.g, n = std::min(p.g, p.K - k0);
    int8_t* qg = q + k0;
    float amax = 0.f;
    bool finite = true;
    for (int64_t t = 0; t < n; ++t) {
      const float v = load_x(x, dt, off + k0 + t);
      finite = finite && std::isfinite(v);
      amax = std::max(amax, std::fabs(v));
    }
    std::memset(qg, 0, p.g);
    const float inv = 127.f / amax;
    if (!finite) {
      sx[gi] = sxs[gi] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    if (amax == 0.f || !(inv <= std::numeric_limits<float>::max())) {
      sx[gi] = sxs[gi] = 0.f;
      continue;
    }
    int32_t s = 0;
    for (int64_t t = 0; t < n; ++t) {
      const float r = std::min(127.f, std::max(-127.f, std::nearbyint(load_x(x, dt, off + k0 + t) * inv)));
      qg[t] = static_cast<int8_t>(r);
      s += static_cast<int32_t>(r);
    }
    sx[gi] = amax / 127.f;
    sxs[gi] = sx[gi] * static_cast<float>(s);
  }
}

LATHE_T512 inline __m512 load16(const void* x, int dt, int64_t i, __mmask16 m) {
  if (dt == 0) return _mm512_maskz_loadu_ps(m, static_cast<const float*>(x) + i);
  const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(x) + i);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

LATHE_T512 inline __m512i bf16_bits_avx512(__m512 y) {
  const __m512i u = _mm512_castps_si512(y);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb)), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q);
  return _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
}

LATHE_T512 inline void store16(void* out, int dt, int64_t i, __mmask16 m, __m512 y) {
  if (dt == 0) _mm512_mask_storeu_ps(static_cast<float*>(out) + i, m, y);
  else _mm512_mask_cvtepi32_storeu_epi16(static_cast<uint16_t*>(out) + i, m, bf16_bits_avx512(y));
}

LATHE_T512 void quant_row_avx512(const void* x, int dt, int64_t off, const Packed& p, int8_t* q,
                                 float* sx, float* sxs) {
  for (int64_t gi = 0; gi < p.G; ++gi) {
    const int64_t k0 = gi * p.g, n = std::min(p.g, p.K - k0);
    __m512 vmax = _mm512_setzero_ps(), bad = _mm512_setzero_ps();
    for (int64_t t = 0; t < p.g; t += 16) {
      const __m512 v = load16(x, dt, off + k0 + t, tail16(n - t));
      vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
      bad = _mm512_add_ps(bad, _mm512_sub_ps(v, v));  // NaN where v is NaN or Inf
    }
    const float amax = _mm512_reduce_max_ps(vmax);
    const float inv = 127.f / amax;
    if (!std::isfinite(_mm512_reduce_add_ps(bad))) {
      std::memset(q + k0, 0, p.g);
      sx[gi] = sxs[gi] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    if (amax == 0.f || !(inv <= std::numeric_limits<float>::max())) {
      std::memset(q + k0, 0, p.g);
      sx[gi] = sxs[gi] = 0.f;
      continue;
    }
    const __m512 vinv = _mm512_set1_ps(inv);
    const __m512 lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
    __m512i sum = _mm512_setzero_si512();
    for (int64_t t = 0; t < p.g; t += 16) {
      const __m512 v = load16(x, dt, off + k0 + t, tail16(n - t));
      __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(v, vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      r = _mm512_min_ps(hi, _mm512_max_ps(lo, r));
      const __m512i i = _mm512_cvtps_epi32(r);
      sum = _mm512_add_epi32(sum, i);
      _mm512_mask_cvtepi32_storeu_epi8(q + k0 + t, 0xFFFF, i);
    }
    sx[gi] = amax / 127.f;
    sxs[gi] = sx[gi] * static_cast<float>(_mm512_reduce_add_epi32(sum));
  }
}

LATHE_T256 void quant_row_avx2(const void* x, int dt, int64_t off, const Packed& p, int8_t* q,
                               float* sx, float* sxs) {
  alignas(32) float buf[128];
  alignas(32) float red[8];
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int64_t gi = 0; gi < p.G; ++gi) {
    const int64_t k0 = gi * p.g, n = std::min(p.g, p.K - k0);
    const float* src = static_cast<const float*>(x) + off + k0;
    if (dt != 0 || n < p.g) {  // bf16, or the ragged last group: widen / pad into buf
      for (int64_t t = 0; t < n; ++t) buf[t] = load_x(x, dt, off + k0 + t);
      for (int64_t t = n; t < p.g; ++t) buf[t] = 0.f;
      src = buf;
    }
    __m256 vmax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    for (int64_t t = 0; t < p.g; t += 8) {
      const __m256 v = _mm256_loadu_ps(src + t);
      vmax = _mm256_max_ps(vmax, _mm256_and_ps(v, absmask));
      bad = _mm256_add_ps(bad, _mm256_sub_ps(v, v));
    }
    _mm256_store_ps(red, vmax);
    float amax = red[0];
    for (int i = 1; i < 8; ++i) amax = std::max(amax, red[i]);
    _mm256_store_ps(red, bad);
    float nan = 0.f;
    for (int i = 0; i < 8; ++i) nan += red[i];
    const float inv = 127.f / amax;
    if (!std::isfinite(nan)) {
      std::memset(q + k0, 0, p.g);
      sx[gi] = sxs[gi] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    if (amax == 0.f || !(inv <= std::numeric_limits<float>::max())) {
      std::memset(q + k0, 0, p.g);
      sx[gi] = sxs[gi] = 0.f;
      continue;
    }
    const __m256 vinv = _mm256_set1_ps(inv);
    const __m256 lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
    __m256i sum = _mm256_setzero_si256();
    for (int64_t t = 0; t < p.g; t += 8) {
      __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(src + t), vinv),
                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      r = _mm256_min_ps(hi, _mm256_max_ps(lo, r));
      const __m256i i = _mm256_cvtps_epi32(r);
      sum = _mm256_add_epi32(sum, i);
      const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k0 + t), _mm_packs_epi16(w16, w16));
    }
    alignas(32) int32_t si[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(si), sum);
    int32_t total = 0;
    for (int i = 0; i < 8; ++i) total += si[i];
    sx[gi] = amax / 127.f;
    sxs[gi] = sx[gi] * static_cast<float>(total);
  }
}

// ---------------------------------------------------------------- INT8_ACT, AVX-512 VNNI
// One tile: MR rows x NV column blocks (16 columns each). Per group, int32 sums over the
// group's L lines in registers, then the fp32 epilogue:
//   fy += cvt(acc) * (sw * sx);  fy -= (z * sw) * sxs.
// MR == 1 (the GEMV) keeps separate accumulators for the low and high nibbles, so the
// dependent VPDPBUSD chains do not limit a single row.
// The fp32 sums live in `fy` (MR * NV * 16 floats of the caller's scratch, L1-resident), not
// in registers: all 32 zmm go to the int32 sums, the weights and constants (kept in
// registers, GCC spilled the int32 sums inside the k loop instead).
using I8Tile512 = void (*)(ActQ, const Packed&, int64_t, const float*, void*, int64_t, int, int64_t,
                           float*);

// acc += u8(a) . s8(b) in place. GCC 12 does not tie _mm512_dpbusd_epi32's accumulator to
// its destination inside unrolled tiles and adds two register copies per instruction (and
// spills); the asm form keeps every sum in its own register.
#define LATHE_DPBUSD(acc, a, b) asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b))

template <int MR, int NV>
LATHE_T512 void tile_i8_avx512(ActQ a, const Packed& p, int64_t nb0, const float* bias, void* out,
                               int64_t ldo, int odt, int64_t ncols, float* fy) {
  constexpr bool kSplit = MR == 1;
  constexpr int S = kSplit ? 2 : 1;
  const __m512i lo4 = _mm512_set1_epi8(0x0F);
  for (int i = 0; i < MR * NV; ++i) _mm512_store_ps(fy + i * 16, _mm512_setzero_ps());
  const uint8_t* wbase = p.codes + nb0 * p.bstride;
  const float* sbase = p.scales + nb0 * p.G * kCols;
  const uint8_t* zbase = p.zeros + nb0 * p.G * kCols;
  const int64_t L = p.L, bs = p.bstride;
  for (int64_t gi = 0; gi < p.G; ++gi) {
    __m512i acc[S][MR][NV];
#pragma GCC unroll 2
    for (int s = 0; s < S; ++s)
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[s][r][v] = _mm512_setzero_si512();
    const uint8_t* wg = wbase + gi * L * kLine;
    const int8_t* ag = a.q + gi * p.g;
    for (int64_t j = 0; j < L; ++j) {
      // all NV weight lines unpacked first, then row by row: only two broadcasts are live
      // at a time (v-outer order made GCC hoist all 2*MR and spill the sums)
      __m512i wl[NV], wh[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        const __m512i w = _mm512_loadu_si512(wg + v * bs + j * kLine);
        wl[v] = _mm512_and_si512(w, lo4);
        wh[v] = _mm512_and_si512(_mm512_srli_epi16(w, 4), lo4);
      }
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const int8_t* ar = ag + r * a.ldq + j * 8;
        const __m512i al = _mm512_set1_epi32(ld32(ar)), ah = _mm512_set1_epi32(ld32(ar + 4));
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) {
          LATHE_DPBUSD(acc[0][r][v], wl[v], al);
          LATHE_DPBUSD(acc[S - 1][r][v], wh[v], ah);
        }
      }
    }
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const __m512 sw = _mm512_loadu_ps(sbase + (v * p.G + gi) * kCols);
      const __m128i z8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(zbase + (v * p.G + gi) * kCols));
      const __m512 zsw = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(z8)), sw);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m512i s = kSplit ? _mm512_add_epi32(acc[0][r][v], acc[S - 1][r][v]) : acc[0][r][v];
        const __m512 swsx = _mm512_mul_ps(sw, _mm512_set1_ps(a.sx[r * a.G + gi]));
        float* f = fy + (r * NV + v) * 16;
        __m512 y = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), swsx, _mm512_load_ps(f));
        y = _mm512_fnmadd_ps(zsw, _mm512_set1_ps(a.sxs[r * a.G + gi]), y);
        _mm512_store_ps(f, y);
      }
    }
  }
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    const int64_t c0 = v * kCols;
    if (c0 >= ncols) break;
    const __mmask16 m = tail16(ncols - c0);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(m, bias + c0) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
      store16(out, odt, r * ldo + c0, m, _mm512_add_ps(_mm512_load_ps(fy + (r * NV + v) * 16), b));
  }
}

template <int MR, int NV>
I8Tile512 i8_512_nv(int nv) {
  if constexpr (NV == 1) return tile_i8_avx512<MR, 1>;
  else return nv >= NV ? tile_i8_avx512<MR, NV> : i8_512_nv<MR, NV - 1>(nv);
}

template <int MR, int NV>
I8Tile512 i8_512(int mr, int nv) {
  if constexpr (MR == 1) return i8_512_nv<1, NV>(nv);
  else return mr >= MR ? i8_512_nv<MR, NV>(nv) : i8_512<MR - 1, NV>(mr, nv);
}

template <int MR, int NV>
void gemm_i8_avx512(const ActQ& a, int64_t M, const Packed& p, const float* bias, void* out,
                    int64_t ldo, int odt, int nthreads) {
  const int64_t mtiles = ceil_div(M, MR), ngroups = ceil_div(p.NB, NV), tasks = mtiles * ngroups;
  const int64_t esz = odt == 0 ? 4 : 2;
  // n-major: a thread walks down the M tiles of one weight panel while it stays in cache.
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1) if (tasks > 1)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t gidx = t / mtiles, mt = t % mtiles;
    const int64_t m0 = mt * MR, nb0 = gidx * NV;
    const int mr = static_cast<int>(std::min<int64_t>(MR, M - m0));
    const int nv = static_cast<int>(std::min<int64_t>(NV, p.NB - nb0));
    const ActQ at{a.q + m0 * a.ldq, a.ldq, a.sx + m0 * a.G, a.sxs + m0 * a.G, a.G};
    char* o = static_cast<char*>(out) + (m0 * ldo + nb0 * kCols) * esz;
    alignas(64) float fy[MR * NV * 16];
    i8_512<MR, NV>(mr, nv)(at, p, nb0, bias ? bias + nb0 * kCols : nullptr, o, ldo, odt,
                           p.N - nb0 * kCols, fy);
  }
}

// ---------------------------------------------------------------- INT8_ACT, AVX2
// One tile: MR rows x 8 columns (one half of a packed 64-byte line).
template <int MR>
LATHE_T256 void tile_i8_avx2(ActQ a, const Packed& p, int64_t nb, int half, const float* bias,
                             void* out, int64_t ldo, int odt, int64_t ncols) {
  const __m256i lo4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 fy[MR];
  for (int r = 0; r < MR; ++r) fy[r] = _mm256_setzero_ps();
  const int64_t L = p.L;
  for (int64_t gi = 0; gi < p.G; ++gi) {
    __m256i acc[MR], a16[MR];
    for (int r = 0; r < MR; ++r) acc[r] = a16[r] = _mm256_setzero_si256();
    const uint8_t* wg = p.codes + nb * p.bstride + gi * L * kLine + half * 32;
    const int8_t* ag = a.q + gi * p.g;
    for (int64_t j = 0; j < L; ++j) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + j * kLine));
      const __m256i wl = _mm256_and_si256(w, lo4);
      const __m256i wh = _mm256_and_si256(_mm256_srli_epi16(w, 4), lo4);
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) {
        const int8_t* ar = ag + r * a.ldq + j * 8;
        const __m256i pl = _mm256_maddubs_epi16(wl, _mm256_set1_epi32(ld32(ar)));
        const __m256i ph = _mm256_maddubs_epi16(wh, _mm256_set1_epi32(ld32(ar + 4)));
        a16[r] = _mm256_add_epi16(a16[r], _mm256_add_epi16(pl, ph));
      }
      if ((j & 3) == 3) {  // 4 lines: |s16| <= 4 * 2 * 2 * 15 * 127 = 30480
#pragma GCC unroll 4
        for (int r = 0; r < MR; ++r) {
          acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(a16[r], ones));
          a16[r] = _mm256_setzero_si256();
        }
      }
    }
    const int64_t so = (nb * p.G + gi) * kCols + half * 8;
    const __m256 sw = _mm256_loadu_ps(p.scales + so);
    const __m128i z8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p.zeros + so));
    const __m256 zsw = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(z8)), sw);
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      const __m256 swsx = _mm256_mul_ps(sw, _mm256_set1_ps(a.sx[r * a.G + gi]));
      fy[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r]), swsx, fy[r]);
      fy[r] = _mm256_fnmadd_ps(zsw, _mm256_set1_ps(a.sxs[r * a.G + gi]), fy[r]);
    }
  }
  const int nc = static_cast<int>(std::min<int64_t>(8, ncols));
  alignas(32) float b[8] = {0, 0, 0, 0, 0, 0, 0, 0}, y[8];
  if (bias) std::memcpy(b, bias, nc * sizeof(float));
  const __m256 bv = _mm256_load_ps(b);
  for (int r = 0; r < MR; ++r) {
    _mm256_store_ps(y, _mm256_add_ps(fy[r], bv));
    for (int c = 0; c < nc; ++c) store_y(out, odt, r * ldo + c, y[c]);
  }
}

void gemm_i8_avx2(const ActQ& a, int64_t M, const Packed& p, const float* bias, void* out,
                  int64_t ldo, int odt, int nthreads) {
  constexpr int MR = 4;
  const int64_t halves = ceil_div(p.N, 8), mtiles = ceil_div(M, MR), tasks = mtiles * halves;
  const int64_t esz = odt == 0 ? 4 : 2;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1) if (tasks > 1)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t h = t / mtiles, mt = t % mtiles, m0 = mt * MR, n0 = h * 8;
    const int mr = static_cast<int>(std::min<int64_t>(MR, M - m0));
    auto* fn = mr == 1 ? tile_i8_avx2<1> : mr == 2 ? tile_i8_avx2<2> : mr == 3 ? tile_i8_avx2<3>
                                                                              : tile_i8_avx2<4>;
    const ActQ at{a.q + m0 * a.ldq, a.ldq, a.sx + m0 * a.G, a.sxs + m0 * a.G, a.G};
    fn(at, p, h / 2, static_cast<int>(h % 2), bias ? bias + n0 : nullptr,
       static_cast<char*>(out) + (m0 * ldo + n0) * esz, ldo, odt, p.N - n0);
  }
}

// ---------------------------------------------------------------- INT8_ACT, scalar
void gemm_i8_scalar(const ActQ& a, int64_t M, const Packed& p, const float* bias, void* out,
                    int64_t ldo, int odt, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M * p.N > 256)
  for (int64_t n = 0; n < p.N; ++n) {
    const int64_t nb = n / kCols, c = n % kCols;
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* q = a.q + m * a.ldq;
      float fy = 0.f;
      for (int64_t gi = 0; gi < p.G; ++gi) {
        int32_t acc = 0;
        for (int64_t j = 0; j < p.L; ++j) {
          const uint8_t* line = p.codes + nb * p.bstride + (gi * p.L + j) * kLine + c * 4;
          const int8_t* qk = q + gi * p.g + j * 8;
          for (int i = 0; i < 4; ++i)
            acc += int32_t(line[i] & 0x0F) * qk[i] + int32_t(line[i] >> 4) * qk[4 + i];
        }
        const int64_t so = (nb * p.G + gi) * kCols + c;
        const float sw = p.scales[so];
        const float zsw = static_cast<float>(p.zeros[so]) * sw;
        fy = std::fma(static_cast<float>(acc), sw * a.sx[m * a.G + gi], fy);
        fy = std::fma(-zsw, a.sxs[m * a.G + gi], fy);
      }
      store_y(out, odt, m * ldo + n, bias ? fy + bias[n] : fy);
    }
  }
}

// ---------------------------------------------------------------- EXACT_FP32, AVX-512
// panel fp32 [kc][nv * 16]: W^T for k0 .. k0+kc and blocks nb0 .. nb0+nv, exactly as the
// reference dequantizes: (float(code) - float(zero)) * scale.
LATHE_T512 void dequant_panel_avx512(const Packed& p, int64_t nb0, int nv, int64_t k0, int64_t kc,
                                     float* panel) {
  const __m512 lut = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const int64_t ldp = nv * kCols;
  for (int v = 0; v < nv; ++v) {
    const int64_t nb = nb0 + v;
    for (int64_t gi = k0 / p.g; gi * p.g < k0 + kc; ++gi) {
      const int64_t so = (nb * p.G + gi) * kCols;
      const __m512 sw = _mm512_loadu_ps(p.scales + so);
      const __m512 zf = _mm512_cvtepi32_ps(
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.zeros + so))));
      const uint8_t* wg = p.codes + nb * p.bstride + gi * p.L * kLine;
      for (int64_t j = 0; j < p.L; ++j) {
        const __m512i w = _mm512_loadu_si512(wg + j * kLine);
        const __m512i wh = _mm512_srli_epi32(w, 4);
        float* dst = panel + (gi * p.g + j * 8 - k0) * ldp + v * kCols;
        // VPERMPS reads only the low 4 bits of each index: shift, then look up.
        _mm512_storeu_ps(dst + 0 * ldp, _mm512_mul_ps(_mm512_sub_ps(_mm512_permutexvar_ps(w, lut), zf), sw));
        _mm512_storeu_ps(dst + 1 * ldp, _mm512_mul_ps(_mm512_sub_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(w, 8), lut), zf), sw));
        _mm512_storeu_ps(dst + 2 * ldp, _mm512_mul_ps(_mm512_sub_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(w, 16), lut), zf), sw));
        _mm512_storeu_ps(dst + 3 * ldp, _mm512_mul_ps(_mm512_sub_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(w, 24), lut), zf), sw));
        _mm512_storeu_ps(dst + 4 * ldp, _mm512_mul_ps(_mm512_sub_ps(_mm512_permutexvar_ps(wh, lut), zf), sw));
        _mm512_storeu_ps(dst + 5 * ldp, _mm512_mul_ps(_mm512_sub_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(wh, 8), lut), zf), sw));
        _mm512_storeu_ps(dst + 6 * ldp, _mm512_mul_ps(_mm512_sub_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(wh, 16), lut), zf), sw));
        _mm512_storeu_ps(dst + 7 * ldp, _mm512_mul_ps(_mm512_sub_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(wh, 24), lut), zf), sw));
      }
    }
  }
}

// out[MR][nv*16] = (first ? 0 : out) + x[MR][kc] @ panel (+ bias on the last chunk). Each chunk
// is summed from zero before it meets the output: blocked summation, like the reference GEMM.
using F32Tile512 = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t,
                            bool, const float*);

template <int MR, int NV>
LATHE_T512 void tile_f32_avx512(const float* x, int64_t ldx, const float* panel, int64_t kc,
                                float* out, int64_t ldo, int64_t ncols, bool first,
                                const float* bias) {
  constexpr int ldp = NV * kCols;
  __m512 acc[MR][NV];  // one chain a column: a row sums alike in every tile height
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    __m512 b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(panel + k * ldp + v * kCols);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 xa = _mm512_set1_ps(x[r * ldx + k]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(xa, b[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    if (v * kCols >= ncols) break;
    const __mmask16 m = tail16(ncols - v * kCols);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      // blocked summation: each kc chunk is summed from zero, then added to the output
      __m512 y = acc[r][v];
      if (!first) y = _mm512_add_ps(_mm512_maskz_loadu_ps(m, out + r * ldo + v * kCols), y);
      if (bias) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(m, bias + v * kCols));
      _mm512_mask_storeu_ps(out + r * ldo + v * kCols, m, y);
    }
  }
}

template <int MR, int NV>
F32Tile512 f32_512_nv(int nv) {
  if constexpr (NV == 1) return tile_f32_avx512<MR, 1>;
  else return nv >= NV ? tile_f32_avx512<MR, NV> : f32_512_nv<MR, NV - 1>(nv);
}

template <int MR, int NV>
F32Tile512 f32_512(int mr, int nv) {
  if constexpr (MR == 1) return f32_512_nv<1, NV>(nv);
  else return mr >= MR ? f32_512_nv<MR, NV>(nv) : f32_512<MR - 1, NV>(mr, nv);
}

// Work split shared by the panel-based bodies: tasks = (column groups) x (row chunks); the
// rows are split only when there are fewer column groups than threads.
struct PanelSplit {
  int64_t ngroups, msplit, mchunk, tasks;
};

PanelSplit panel_split(int64_t M, int64_t NB, int nv_per_group, int mr, int nthreads) {
  PanelSplit s;
  s.ngroups = ceil_div(NB, nv_per_group);
  const int64_t mtiles = ceil_div(M, mr);
  s.msplit = s.ngroups >= nthreads ? 1 : std::min(mtiles, ceil_div(nthreads, s.ngroups));
  s.mchunk = ceil_div(mtiles, s.msplit) * mr;
  s.tasks = s.ngroups * s.msplit;
  return s;
}

void gemm_f32_avx512(const float* x, int64_t ldx, int64_t M, const Packed& p, const float* bias,
                     float* out, int64_t ldo, int nthreads) {
  constexpr int MR = 6, NV = 4;
  const PanelSplit sp = panel_split(M, p.NB, NV, MR, nthreads);
#pragma omp parallel num_threads(nthreads) if (sp.tasks > 1)
  {
    std::vector<float> panel(kKC * NV * kCols);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < sp.tasks; ++t) {
      const int64_t gidx = t / sp.msplit, ms = t % sp.msplit;
      const int64_t nb0 = gidx * NV;
      const int nv = static_cast<int>(std::min<int64_t>(NV, p.NB - nb0));
      const int64_t mb = ms * sp.mchunk, me = std::min(M, mb + sp.mchunk);
      const int64_t n0 = nb0 * kCols;
      for (int64_t k0 = 0; k0 < p.Kp; k0 += kKC) {
        const int64_t kc = std::min(kKC, p.Kp - k0);
        dequant_panel_avx512(p, nb0, nv, k0, kc, panel.data());
        const bool first = k0 == 0, last = k0 + kc >= p.Kp;
        for (int64_t m0 = mb; m0 < me; m0 += MR) {
          const int mr = static_cast<int>(std::min<int64_t>(MR, me - m0));
          f32_512<MR, NV>(mr, nv)(x + m0 * ldx + k0, ldx, panel.data(), kc, out + m0 * ldo + n0,
                                  ldo, p.N - n0, first, last && bias ? bias + n0 : nullptr);
        }
      }
    }
  }
}

// EXACT_FP32 with one row: dequantize in registers (no panel round trip) and FMA straight
// away. Same summation as the batched panel tiles (one chain a column through each kKC-long
// chunk, chunks added in order, then + bias), so a row gives the same bits alone or in a
// batch. One chain is enough here: each FMA waits on 4 other vector ops (shift, permute,
// sub, mul), which keep the ports busier than the FMA latency does.
template <int NV>
LATHE_T512 void gemv_f32_tile_avx512(const float* x, const Packed& p, int64_t nb0, const float* bias,
                                     float* out, int64_t ncols) {
  const __m512 lut = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 tot[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) tot[v] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < p.Kp; k0 += kKC) {
    __m512 acc[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[v] = _mm512_setzero_ps();
    for (int64_t gi = k0 / p.g; gi * p.g < std::min(p.Kp, k0 + kKC); ++gi) {
      __m512 sw[NV], zf[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        const int64_t so = ((nb0 + v) * p.G + gi) * kCols;
        sw[v] = _mm512_loadu_ps(p.scales + so);
        zf[v] = _mm512_cvtepi32_ps(
            _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.zeros + so))));
      }
      for (int64_t j = 0; j < p.L; ++j) {
        const float* xk = x + gi * p.g + j * 8;
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) {
          const __m512i w = _mm512_loadu_si512(p.codes + (nb0 + v) * p.bstride + (gi * p.L + j) * kLine);
          const __m512i wh = _mm512_srli_epi32(w, 4);
#pragma GCC unroll 8
          for (int i = 0; i < 8; ++i) {
            const __m512i src = i < 4 ? w : wh;
            const int sh = (i & 3) * 8;
            const __m512 c = _mm512_permutexvar_ps(sh ? _mm512_srli_epi32(src, sh) : src, lut);
            const __m512 wv = _mm512_mul_ps(_mm512_sub_ps(c, zf[v]), sw[v]);
            acc[v] = _mm512_fmadd_ps(_mm512_set1_ps(xk[i]), wv, acc[v]);
          }
        }
      }
    }
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) tot[v] = _mm512_add_ps(tot[v], acc[v]);
  }
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    if (v * kCols >= ncols) break;
    const __mmask16 m = tail16(ncols - v * kCols);
    const __m512 y = bias ? _mm512_add_ps(tot[v], _mm512_maskz_loadu_ps(m, bias + v * kCols)) : tot[v];
    _mm512_mask_storeu_ps(out + v * kCols, m, y);
  }
}

void gemv_f32_avx512(const float* x, const Packed& p, const float* bias, float* out, int nthreads) {
  constexpr int NV = 4;
  const int64_t tasks = ceil_div(p.NB, NV);
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1) if (tasks > 1)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t nb0 = t * NV, n0 = nb0 * kCols;
    const int64_t nv = std::min<int64_t>(NV, p.NB - nb0);
    auto* fn = nv >= 4 ? gemv_f32_tile_avx512<4> : nv == 3 ? gemv_f32_tile_avx512<3>
             : nv == 2 ? gemv_f32_tile_avx512<2> : gemv_f32_tile_avx512<1>;
    fn(x, p, nb0, bias ? bias + n0 : nullptr, out + n0, p.N - n0);
  }
}

LATHE_T512 void bf16_rows_avx512(const float* src, int64_t M, int64_t N, int64_t lds, uint16_t* dst,
                                 int64_t ldd) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; n += 16) {
      const __mmask16 k = tail16(N - n);
      store16(dst + m * ldd, 1, n, k, _mm512_maskz_loadu_ps(k, src + m * lds + n));
    }
}

// ---------------------------------------------------------------- EXACT_FP32, AVX2
LATHE_T256 void dequant_panel_avx2(const Packed& p, int64_t nb, int64_t k0, int64_t kc, float* panel) {
  const __m256i lo4 = _mm256_set1_epi32(0x0F);
  for (int64_t gi = k0 / p.g; gi * p.g < k0 + kc; ++gi)
    for (int half = 0; half < 2; ++half) {
      const int64_t so = (nb * p.G + gi) * kCols + half * 8;
      const __m256 sw = _mm256_loadu_ps(p.scales + so);
      const __m256 zf = _mm256_cvtepi32_ps(
          _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p.zeros + so))));
      const uint8_t* wg = p.codes + nb * p.bstride + gi * p.L * kLine + half * 32;
      for (int64_t j = 0; j < p.L; ++j) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + j * kLine));
        float* dst = panel + (gi * p.g + j * 8 - k0) * kCols + half * 8;
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) {
          const int sh = (i & 3) * 8 + (i >> 2) * 4;
          const __m256 c = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(w, _mm256_set1_epi32(sh)), lo4));
          _mm256_storeu_ps(dst + i * kCols, _mm256_mul_ps(_mm256_sub_ps(c, zf), sw));
        }
      }
    }
}

template <int MR>
LATHE_T256 void tile_f32_avx2(const float* x, int64_t ldx, const float* panel, int64_t kc, float* out,
                              int64_t ldo, int64_t ncols, bool first, const float* bias) {
  const int nc = static_cast<int>(std::min<int64_t>(16, ncols));
  __m256 acc[MR][2];
  alignas(32) float tmp[16];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(panel + k * kCols), b1 = _mm256_loadu_ps(panel + k * kCols + 8);
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      const __m256 xa = _mm256_set1_ps(x[r * ldx + k]);
      acc[r][0] = _mm256_fmadd_ps(xa, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xa, b1, acc[r][1]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    _mm256_store_ps(tmp, acc[r][0]);
    _mm256_store_ps(tmp + 8, acc[r][1]);
    for (int c = 0; c < nc; ++c) {
      const float y = first ? tmp[c] : out[r * ldo + c] + tmp[c];
      out[r * ldo + c] = bias ? y + bias[c] : y;
    }
  }
}

void gemm_f32_avx2(const float* x, int64_t ldx, int64_t M, const Packed& p, const float* bias,
                   float* out, int64_t ldo, int nthreads) {
  constexpr int MR = 4;
  const PanelSplit sp = panel_split(M, p.NB, 1, MR, nthreads);
#pragma omp parallel num_threads(nthreads) if (sp.tasks > 1)
  {
    std::vector<float> panel(kKC * kCols);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < sp.tasks; ++t) {
      const int64_t nb = t / sp.msplit, ms = t % sp.msplit, n0 = nb * kCols;
      const int64_t mb = ms * sp.mchunk, me = std::min(M, mb + sp.mchunk);
      for (int64_t k0 = 0; k0 < p.Kp; k0 += kKC) {
        const int64_t kc = std::min(kKC, p.Kp - k0);
        dequant_panel_avx2(p, nb, k0, kc, panel.data());
        const bool first = k0 == 0, last = k0 + kc >= p.Kp;
        for (int64_t m0 = mb; m0 < me; m0 += MR) {
          const int mr = static_cast<int>(std::min<int64_t>(MR, me - m0));
          auto* fn = mr == 1 ? tile_f32_avx2<1> : mr == 2 ? tile_f32_avx2<2>
                   : mr == 3 ? tile_f32_avx2<3> : tile_f32_avx2<4>;
          fn(x + m0 * ldx + k0, ldx, panel.data(), kc, out + m0 * ldo + n0, ldo, p.N - n0, first,
             last && bias ? bias + n0 : nullptr);
        }
      }
    }
  }
}

// ---------------------------------------------------------------- EXACT_FP32, scalar
void gemm_f32_scalar(const void* x, int dt, int64_t ldx, int64_t M, const Packed& p,
                     const float* bias, void* out, int64_t ldo, int odt, int nthreads) {
#pragma omp parallel num_threads(nthreads) if (M * p.N > 256)
  {
    std::vector<float> w(p.K);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < p.N; ++n) {
      const int64_t nb = n / kCols, c = n % kCols;
      for (int64_t k = 0; k < p.K; ++k) {
        const int64_t gi = k / p.g, kin = k % p.g, j = kin / 8, i = kin % 8;
        const uint8_t byte = p.codes[nb * p.bstride + (gi * p.L + j) * kLine + c * 4 + (i & 3)];
        const int code = i < 4 ? (byte & 0x0F) : (byte >> 4);
        const int64_t so = (nb * p.G + gi) * kCols + c;
        w[k] = (static_cast<float>(code) - static_cast<float>(p.zeros[so])) * p.scales[so];
      }
      for (int64_t m = 0; m < M; ++m) {
        float acc = 0.f;  // blocked like the vector bodies: kKC-long chunks summed apart
        for (int64_t k0 = 0; k0 < p.K; k0 += kKC) {
          float part = 0.f;
          for (int64_t k = k0; k < std::min(p.K, k0 + kKC); ++k) part += load_x(x, dt, m * ldx + k) * w[k];
          acc += part;
        }
        store_y(out, odt, m * ldo + n, bias ? acc + bias[n] : acc);
      }
    }
  }
}

std::string s(int64_t v) { return std::to_string(v); }

void check_group(int64_t g, const char* fn) {
  check(g == 32 || g == 64 || g == 128,
        std::string(fn) + ": group size must be 32, 64 or 128, got " + s(g));
}

}  // namespace

int64_t int4_packed_code_bytes(int64_t N, int64_t K, int64_t g) {
  check_group(g, "int4_packed_code_bytes");
  check(N > 0 && K > 0, "int4_packed_code_bytes: N and K must be positive, got N=" + s(N) + " K=" + s(K));
  return ceil_div(N, kCols) * kCols * ceil_div(K, g) * g / 2;
}

int64_t int4_packed_scale_count(int64_t N, int64_t K, int64_t g) {
  check_group(g, "int4_packed_scale_count");
  check(N > 0 && K > 0, "int4_packed_scale_count: N and K must be positive, got N=" + s(N) + " K=" + s(K));
  return ceil_div(N, kCols) * kCols * ceil_div(K, g);
}

void int4_pack(const uint8_t* qweight, int64_t ldq, const float* scales, int64_t lds,
               const uint8_t* zeros, int64_t ldz, int64_t N, int64_t K, int64_t g,
               uint8_t* p_codes, float* p_scales, uint8_t* p_zeros) {
  check_group(g, "int4_pack");
  check(N > 0 && K > 0, "int4_pack: N and K must be positive, got N=" + s(N) + " K=" + s(K));
  const int64_t G = ceil_div(K, g);
  check(ldq >= ceil_div(K, 2), "int4_pack: qweight row stride " + s(ldq) + " < ceil(K/2)=" + s(ceil_div(K, 2)));
  check(lds >= G, "int4_pack: scales row stride " + s(lds) + " < groups G=" + s(G));
  check(!zeros || ldz >= G, "int4_pack: zeros row stride " + s(ldz) + " < groups G=" + s(G));
  check(qweight && scales && p_codes && p_scales && p_zeros, "int4_pack: null pointer");
  if (zeros)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t gi = 0; gi < G; ++gi)
        check(zeros[n * ldz + gi] <= 15, "int4_pack: zero point " + s(zeros[n * ldz + gi]) +
                                             " at [" + s(n) + ", " + s(gi) + "] is not a 4-bit code");
  const Packed p = make_packed(p_codes, p_scales, p_zeros, N, K, g);
  std::memset(p_codes, 0, int4_packed_code_bytes(N, K, g));
  std::memset(p_zeros, 0, int4_packed_scale_count(N, K, g));
  std::fill(p_scales, p_scales + int4_packed_scale_count(N, K, g), 0.f);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t nb = n / kCols, c = n % kCols;
    for (int64_t gi = 0; gi < G; ++gi) {
      const uint8_t z = zeros ? zeros[n * ldz + gi] : 8;
      const int64_t so = (nb * G + gi) * kCols + c;
      p_scales[so] = scales[n * lds + gi];
      p_zeros[so] = z;
      for (int64_t kin = 0; kin < g; ++kin) {
        const int64_t k = gi * g + kin;
        const uint8_t code = k < K ? ((qweight[n * ldq + k / 2] >> ((k & 1) * 4)) & 0x0F) : z;
        const int64_t j = kin / 8, i = kin % 8;
        p_codes[nb * p.bstride + (gi * p.L + j) * kLine + c * 4 + (i & 3)] |=
            static_cast<uint8_t>(code << (i < 4 ? 0 : 4));
      }
    }
  }
}

void int4_linear(const void* x, int dtype, int64_t M, int64_t K, int64_t ldx,
                 const uint8_t* p_codes, const float* p_scales, const uint8_t* p_zeros,
                 int64_t N, int64_t g, const float* bias, void* out, int64_t ldo, int mode,
                 int nthreads) {
  check_group(g, "int4_linear");
  check(M >= 0 && K > 0 && N > 0, "int4_linear: need M >= 0, K > 0, N > 0; got M=" + s(M) +
                                      " K=" + s(K) + " N=" + s(N));
  check(dtype == 0 || dtype == 1, "int4_linear: dtype code must be 0 (fp32) or 1 (bf16), got " + s(dtype));
  check(mode == 0 || mode == 1, "int4_linear: mode must be 0 (int8 activations) or 1 (exact fp32), got " + s(mode));
  check(ldx >= K && ldo >= N, "int4_linear: row strides smaller than the rows (ldx=" + s(ldx) +
                                  ", K=" + s(K) + ", ldo=" + s(ldo) + ", N=" + s(N) + ")");
  if (M == 0) return;
  check(x && p_codes && p_scales && p_zeros && out, "int4_linear: null pointer");
  nthreads = std::max(1, nthreads);
  const Packed p = make_packed(p_codes, p_scales, p_zeros, N, K, g);
  const Isa isa = active_isa();

  if (mode == 0) {
    thread_local std::vector<int8_t> qbuf;
    thread_local std::vector<float> sbuf;
    if (static_cast<int64_t>(qbuf.size()) < M * p.Kp) qbuf.resize(M * p.Kp);
    if (static_cast<int64_t>(sbuf.size()) < 2 * M * p.G) sbuf.resize(2 * M * p.G);
    int8_t* q = qbuf.data();
    float* sx = sbuf.data();
    float* sxs = sbuf.data() + M * p.G;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M * K > 32768)
    for (int64_t m = 0; m < M; ++m) {
      int8_t* qm = q + m * p.Kp;
      float *sxm = sx + m * p.G, *sxsm = sxs + m * p.G;
      if (isa == Isa::Avx512Vnni) quant_row_avx512(x, dtype, m * ldx, p, qm, sxm, sxsm);
      else if (isa == Isa::Avx2) quant_row_avx2(x, dtype, m * ldx, p, qm, sxm, sxsm);
      else quant_row_scalar(x, dtype, m * ldx, p, qm, sxm, sxsm);
    }
    const ActQ a{q, p.Kp, sx, sxs, p.G};
    switch (isa) {
      case Isa::Avx512Vnni:
        if (M == 1) gemm_i8_avx512<1, kGemvNV>(a, M, p, bias, out, ldo, dtype, nthreads);
        else gemm_i8_avx512<kMR, kNV>(a, M, p, bias, out, ldo, dtype, nthreads);
        break;
      case Isa::Avx2:
        gemm_i8_avx2(a, M, p, bias, out, ldo, dtype, nthreads);
        break;
      default:
        gemm_i8_scalar(a, M, p, bias, out, ldo, dtype, nthreads);
    }
    return;
  }

  if (dtype == 1 && int4_bf16_linear(static_cast<const uint16_t*>(x), M, K, ldx, p_codes, p_scales, p_zeros, N, g,
                                     bias, static_cast<uint16_t*>(out), ldo, nthreads))
    return;  // AVX512-BF16 body (int4_bf16.cpp)
  if (isa == Isa::Scalar) {
    gemm_f32_scalar(x, dtype, ldx, M, p, bias, out, ldo, dtype, nthreads);
    return;
  }
  // Panel bodies read fp32 rows of Kp values: bf16 or ragged-K inputs go through a copy.
  const float* xf = static_cast<const float*>(x);
  int64_t ldxf = ldx;
  thread_local std::vector<float> xbuf, obuf;
  if (dtype != 0 || K != p.Kp) {
    if (static_cast<int64_t>(xbuf.size()) < M * p.Kp) xbuf.resize(M * p.Kp);
    float* xb = xbuf.data();
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M * K > 65536)
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t k = 0; k < K; ++k) xb[m * p.Kp + k] = load_x(x, dtype, m * ldx + k);
      std::fill(xb + m * p.Kp + K, xb + (m + 1) * p.Kp, 0.f);
    }
    xf = xb;
    ldxf = p.Kp;
  }
  float* of = static_cast<float*>(out);
  int64_t ldof = ldo;
  if (dtype != 0) {
    if (static_cast<int64_t>(obuf.size()) < M * N) obuf.resize(M * N);
    of = obuf.data();
    ldof = N;
  }
  if (isa == Isa::Avx512Vnni && M == 1) gemv_f32_avx512(xf, p, bias, of, nthreads);
  else if (isa == Isa::Avx512Vnni) gemm_f32_avx512(xf, ldxf, M, p, bias, of, ldof, nthreads);
  else gemm_f32_avx2(xf, ldxf, M, p, bias, of, ldof, nthreads);
  if (dtype != 0) {
    if (isa == Isa::Avx512Vnni) {
      bf16_rows_avx512(of, M, N, ldof, static_cast<uint16_t*>(out), ldo);
    } else {
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) store_y(out, 1, m * ldo + n, of[m * ldof + n]);
    }
  }
}

}  // namespace lathe
