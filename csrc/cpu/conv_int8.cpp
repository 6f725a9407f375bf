// int8 convolutions (see conv_int8.h). Three bodies per kernel, picked at run time:
//   avx512_vnni: VPDPBUSD on u8 activations x s8 weights, the requantization fused in registers
//                (u8 out: cvt, one multiply, cvt, saturating packs; no int32 round trip);
//   avx2:        VPMADDWD / VPMULLD on widened operands (exact);
//   scalar:      plain loops over the same layouts (the portable reference).
// The integer sums are exact on every path and the fp32 epilogue does the same operations in
// the same order on every path (the build uses -ffp-contract=off), so the paths agree bit for bit.
#include "cpu/conv_int8.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/int8_gemm.h"
#include "cpu/isa.h"
#include "cpu/task_pool.h"
#include "cpu/vec_math.h"

namespace lathe {
namespace {

constexpr int kMaxTaps = 64;  // up to 8x8 kernels
constexpr float kBig = kRequantBig;
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t c4(int64_t c) { return ceil_div(c, 4) * 4; }

// Below this many multiply-adds a layer runs on one thread: a fork/join costs more.
constexpr int64_t kParallelMacs = 1 << 19;
inline int threads_for(int64_t macs, int nthreads) {
  return macs < kParallelMacs ? 1 : std::max(1, nthreads);
}

// ---------------------------------------------------------------- per-call channel constants
// Padded to a multiple of 64 channels so the vector epilogues never read past them.
struct Epi {
  std::vector<int32_t> init;  // accumulator start: bq - x_zp * wsum (u8) or -x_zp * wsum (fp32)
  std::vector<float> mul;     // u8: s * (1 / out_scale); fp32: s
  std::vector<float> bias;    // fp32 out: bias (0 where none)
  float rmul = 0.f;           // residual: u8 res_scale * (1 / out_scale); fp32 res_scale
  int32_t rzp = 0;
  uint8_t lo = 0, hi = 255;   // u8 clamp with the activation folded in
};

Epi make_epi(const ConvArgs& a) {
  Epi e;
  const int64_t NP = ceil_div(a.N, 64) * 64;
  e.init.assign(NP, 0), e.mul.assign(NP, 0.f), e.bias.assign(NP, 0.f);
  const float inv = 1.f / a.out_scale;
  for (int64_t n = 0; n < a.N; ++n) {
    const float s = a.x_scale * a.w_scale[n];
    const float b = a.bias ? a.bias[n] : 0.f;
    int32_t bq = 0;
    if (a.out_u8) {
      // round half even without a libm call (this file's baseline ISA has no vroundsd): exact for
      // |r| <= 2^30 < 2^51 in the default rounding mode
      double r = std::min(1073741824.0, std::max(-1073741824.0, static_cast<double>(b) / static_cast<double>(s)));
      volatile double magic = 6755399441055744.0;  // 1.5 * 2^52 (volatile: never folded away)
      r = (r + magic) - magic;
      bq = static_cast<int32_t>(r);
      e.mul[n] = s * inv;
    } else {
      e.mul[n] = s, e.bias[n] = b;
    }
    e.init[n] = bq - a.x_zp * a.wsum[n];
  }
  e.rmul = a.out_u8 ? a.res_scale * inv : a.res_scale;
  e.rzp = a.res_zp;
  if (a.out_u8) {
    int32_t lo, hi;
    u8_act_bounds(a.act, inv, a.out_zp, &lo, &hi);
    e.lo = static_cast<uint8_t>(lo), e.hi = static_cast<uint8_t>(hi);
  }
  return e;
}

// ---------------------------------------------------------------- shared epilogue (scalar)
inline void store_scalar(const ConvArgs& a, const Epi& e, int64_t m, int64_t n, int32_t raw) {
  const int32_t acc = raw + e.init[n];
  const int32_t r = a.res ? static_cast<int32_t>(a.res[m * a.ld_res + n]) - e.rzp : 0;
  if (a.out_u8) {
    float t = static_cast<float>(acc) * e.mul[n];
    if (a.res) t = t + static_cast<float>(r) * e.rmul;
    t = std::min(kBig, std::max(-kBig, t));
    const int32_t q = static_cast<int32_t>(std::nearbyint(t)) + a.out_zp;
    static_cast<uint8_t*>(a.out)[m * a.ldo + n] =
        static_cast<uint8_t>(std::min<int32_t>(e.hi, std::max<int32_t>(e.lo, q)));
  } else {
    float y = static_cast<float>(acc) * e.mul[n] + e.bias[n];
    if (a.res) y = y + static_cast<float>(r) * e.rmul;
    if (a.act >= 1) y = std::max(y, 0.f);
    if (a.act == 2) y = std::min(y, 6.f);
    static_cast<float*>(a.out)[m * a.ldo + n] = y;
  }
}

// Tap pointers of output pixel m (flattened b, oh, ow): the input pixel of each tap, or the
// zero-point row where the tap falls in the padding.
inline void tap_ptrs(const ConvArgs& a, int64_t m, const uint8_t* zprow, const uint8_t** p) {
  const int64_t ow = m % a.OW, oh = (m / a.OW) % a.OH, b = m / (a.OW * a.OH);
  for (int64_t ky = 0; ky < a.kh; ++ky) {
    const int64_t ih = oh * a.stride - a.pad_t + ky;
    for (int64_t kx = 0; kx < a.kw; ++kx) {
      const int64_t iw = ow * a.stride - a.pad_l + kx;
      const bool in = ih >= 0 && ih < a.H && iw >= 0 && iw < a.W;
      p[ky * a.kw + kx] = in ? a.x + ((b * a.H + ih) * a.W + iw) * a.ldc : zprow;
    }
  }
}

// ---------------------------------------------------------------- u8 requantization (AVX-512)
// 4 x 16 int32 lanes of t (already rounded by cvtps) -> 64 u8: saturating packs, + zp, clamp.
// packs/packus interleave 128-bit lanes: byte 16L + 4j + d comes from vector j, dword 4L + d.
LATHE_T512 inline __m512i pack_u8(__m512i q0, __m512i q1, __m512i q2, __m512i q3, __m512i zp16, __m512i lo,
                                  __m512i hi) {
  const __m512i p01 = _mm512_adds_epi16(_mm512_packs_epi32(q0, q1), zp16);
  const __m512i p23 = _mm512_adds_epi16(_mm512_packs_epi32(q2, q3), zp16);
  return _mm512_min_epu8(_mm512_max_epu8(_mm512_packus_epi16(p01, p23), lo), hi);
}

LATHE_T512 inline __m512i requant(__m512i acc, __m512 mul) {
  const __m512 t = _mm512_min_ps(_mm512_set1_ps(kBig), _mm512_mul_ps(_mm512_cvtepi32_ps(acc), mul));
  return _mm512_cvtps_epi32(t);  // round half even; below -2^31 -> INT_MIN, which clamps to lo
}

// ---------------------------------------------------------------- dense: AVX-512 VNNI
// MR output pixels x NV 16-channel blocks; ptrs holds MR * T row pointers (tap t of row r at r * T + t).
template <int MR, int NV>
LATHE_T512 void conv_tile_vnni(const ConvArgs& a, const Epi& e, const uint8_t* const* ptrs, int64_t T,
                               int64_t CB, int64_t m0, int64_t nb0) {
  const int64_t KB = T * CB, bstride = KB * 64;
  __m512i acc[MR][NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const __m512i i0 = _mm512_loadu_si512(e.init.data() + (nb0 + v) * 16);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) acc[r][v] = i0;
  }
  const int8_t* bp = a.packed + nb0 * bstride;
  for (int64_t t = 0; t < T; ++t) {
    const uint8_t* p[MR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) p[r] = ptrs[r * T + t];
    const int8_t* bt = bp + t * CB * 64;
    for (int64_t cb = 0; cb < CB; ++cb) {
      __m512i b[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_si512(bt + v * bstride + cb * 64);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        int32_t a4;
        std::memcpy(&a4, p[r] + cb * 4, 4);
        const __m512i av = _mm512_set1_epi32(a4);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], av, b[v]);
      }
    }
  }
  const int64_t n0 = nb0 * 16;
  const int64_t cols = std::min<int64_t>(NV * 16, a.N - n0);
  __mmask16 mk[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const int64_t left = cols - v * 16;
    mk[v] = left >= 16 ? 0xFFFF : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
  }
  if (a.out_u8) {
    __m512 mul[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) mul[v] = _mm512_loadu_ps(e.mul.data() + n0 + v * 16);
    const __m512i zp16 = _mm512_set1_epi16(static_cast<int16_t>(a.out_zp));
    const __m512i lo = _mm512_set1_epi8(static_cast<char>(e.lo)), hi = _mm512_set1_epi8(static_cast<char>(e.hi));
    // dword D of the packed bytes must hold channels 4D..4D+3: vector D / 4, dword 4 (D % 4) + D / 4
    const __m512i fix = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    const __mmask64 smk = cols >= 64 ? ~0ULL : ((1ULL << cols) - 1);
    const __m512 rmul = _mm512_set1_ps(e.rmul);
    const __m512i rzp = _mm512_set1_epi32(e.rzp);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const int64_t m = m0 + r;
      __m512i q[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                      _mm512_setzero_si512()};
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        if (!a.res) {
          q[v] = requant(acc[r][v], mul[v]);
        } else {
          const __m512i rq = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk[v], a.res + m * a.ld_res + n0 + v * 16));
          __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][v]), mul[v]);
          t = _mm512_add_ps(t, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(rq, rzp)), rmul));
          q[v] = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_set1_ps(kBig), t));
        }
      }
      __m512i o = pack_u8(q[0], q[1], q[2], q[3], zp16, lo, hi);
      o = _mm512_permutexvar_epi32(fix, o);
      uint8_t* dst = static_cast<uint8_t*>(a.out) + m * a.ldo + n0;
      if (cols == 64) _mm512_storeu_si512(dst, o);  // masked stores are slow on some cores
      else if (cols == 48) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_castsi512_si256(o));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 32), _mm512_extracti32x4_epi32(o, 2));
      } else if (cols == 32) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_castsi512_si256(o));
      else if (cols == 16) _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_castsi512_si128(o));
      else _mm512_mask_storeu_epi8(dst, smk, o);
    }
  } else {
    const __m512 zero = _mm512_setzero_ps(), six = _mm512_set1_ps(6.f), rs = _mm512_set1_ps(e.rmul);
    const __m512i rzp = _mm512_set1_epi32(e.rzp);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      if (!mk[v]) break;
      const __m512 mul = _mm512_loadu_ps(e.mul.data() + n0 + v * 16), bs = _mm512_loadu_ps(e.bias.data() + n0 + v * 16);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const int64_t m = m0 + r;
        __m512 y = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][v]), mul), bs);
        if (a.res) {
          const __m512i rq = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk[v], a.res + m * a.ld_res + n0 + v * 16));
          y = _mm512_add_ps(y, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(rq, rzp)), rs));
        }
        if (a.act >= 1) y = _mm512_max_ps(y, zero);
        if (a.act == 2) y = _mm512_min_ps(y, six);
        _mm512_mask_storeu_ps(static_cast<float*>(a.out) + m * a.ldo + n0 + v * 16, mk[v], y);
      }
    }
  }
}

using ConvTile = void (*)(const ConvArgs&, const Epi&, const uint8_t* const*, int64_t, int64_t, int64_t, int64_t);

template <int MR>
ConvTile vnni_nv(int nv) {
  return nv == 1 ? conv_tile_vnni<MR, 1> : nv == 2 ? conv_tile_vnni<MR, 2>
       : nv == 3 ? conv_tile_vnni<MR, 3> : conv_tile_vnni<MR, 4>;
}

ConvTile vnni_tile(int mr, int nv) {
  switch (mr) {
    case 1: return vnni_nv<1>(nv);
    case 2: return vnni_nv<2>(nv);
    case 3: return vnni_nv<3>(nv);
    case 4: return vnni_nv<4>(nv);
    case 5: return vnni_nv<5>(nv);
    default: return vnni_nv<6>(nv);
  }
}

// 1x1 stride-1 rows [m0, m1) x NV column blocks from nb0: the row pointers move with the tile
// (no per-tile dispatch, pointer tables or divisions: small-K layers are short per tile).
template <int NV>
LATHE_T512 void conv_rows_vnni(const ConvArgs& a, const Epi& e, int64_t CB, int64_t m0, int64_t m1, int64_t nb0) {
  const uint8_t* ptrs[6];
  int64_t m = m0;
  for (; m + 6 <= m1; m += 6) {
    for (int r = 0; r < 6; ++r) ptrs[r] = a.x + (m + r) * a.ldc;
    conv_tile_vnni<6, NV>(a, e, ptrs, 1, CB, m, nb0);
  }
  if (m < m1) {
    const int mr = static_cast<int>(m1 - m);
    for (int r = 0; r < mr; ++r) ptrs[r] = a.x + (m + r) * a.ldc;
    vnni_tile(mr, NV)(a, e, ptrs, 1, CB, m, nb0);
  }
}

// Column group g of ngroups = ceil(NB / 4) over NB 16-channel blocks: the blocks split as evenly
// as the groups allow (144 channels: 3 + 3 + 3 blocks, not 4 + 4 + 1: a one-block group runs at
// half the multiply-add density and packs its u8 rows a third of the time for nothing).
inline void column_group(int64_t NB, int64_t ngroups, int64_t g, int64_t* nb0, int* nv) {
  *nb0 = NB * g / ngroups;
  *nv = static_cast<int>(NB * (g + 1) / ngroups - *nb0);
}

// ---------------------------------------------------------------- dense: AVX2 (8 columns)
template <int MR>
LATHE_T256 void conv_tile_avx2(const ConvArgs& a, const Epi& e, const uint8_t* const* ptrs, int64_t T,
                               int64_t CB, int64_t m0, int64_t nb, int half) {
  const int64_t KB = T * CB;
  __m256i lo[MR], hi[MR];
  for (int r = 0; r < MR; ++r) lo[r] = hi[r] = _mm256_setzero_si256();
  const int8_t* bp = a.packed + nb * KB * 64 + half * 32;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t cb = 0; cb < CB; ++cb) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp + (t * CB + cb) * 64));
      const __m256i wlo = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(w));
      const __m256i whi = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(w, 1));
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) {
        int32_t a4;
        std::memcpy(&a4, ptrs[r * T + t] + cb * 4, 4);
        const __m256i av = _mm256_broadcastq_epi64(_mm_cvtepu8_epi16(_mm_cvtsi32_si128(a4)));
        lo[r] = _mm256_add_epi32(lo[r], _mm256_madd_epi16(wlo, av));
        hi[r] = _mm256_add_epi32(hi[r], _mm256_madd_epi16(whi, av));
      }
    }
  }
  const int64_t n0 = nb * 16 + half * 8;
  const int cols = static_cast<int>(std::min<int64_t>(8, a.N - n0));
  for (int r = 0; r < MR; ++r) {
    const __m256i s = _mm256_permute4x64_epi64(_mm256_hadd_epi32(lo[r], hi[r]), 0xD8);
    alignas(32) int32_t acc[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(acc), s);
    for (int c = 0; c < cols; ++c) store_scalar(a, e, m0 + r, n0 + c, acc[c]);
  }
}

void conv_scalar_rows(const ConvArgs& a, const Epi& e, const uint8_t* const* ptrs, int64_t T, int64_t CB,
                      int64_t m0, int mr) {
  const int64_t KB = T * CB;
  for (int64_t n = 0; n < a.N; ++n) {
    const int8_t* col = a.packed + (n / 16) * KB * 64 + (n % 16) * 4;
    for (int r = 0; r < mr; ++r) {
      int32_t acc = 0;
      for (int64_t t = 0; t < T; ++t) {
        const uint8_t* p = ptrs[r * T + t];
        for (int64_t cb = 0; cb < CB; ++cb)
          for (int j = 0; j < 4; ++j) acc += int32_t(p[cb * 4 + j]) * int32_t(col[(t * CB + cb) * 64 + j]);
      }
      store_scalar(a, e, m0 + r, n, acc);
    }
  }
}

void check_common(const ConvArgs& a, const char* who) {
  const std::string w(who);
  check(a.x && a.packed && a.wsum && a.w_scale && a.out, w + ": null pointer");
  check(a.B >= 0 && a.H > 0 && a.W > 0 && a.C > 0 && a.N > 0, w + ": empty shape");
  check(a.ldc >= a.C && a.ldc % 4 == 0, w + ": input channel stride must be >= C and a multiple of 4, got " +
                                            std::to_string(a.ldc));
  check(a.kh >= 1 && a.kw >= 1 && a.kh <= 8 && a.kw <= 8, w + ": kernel size must be 1..8 a side");
  check(a.stride >= 1 && a.pad_t >= 0 && a.pad_l >= 0, w + ": bad stride or padding");
  check(a.OH >= 1 && a.OW >= 1 && (a.OH - 1) * a.stride - a.pad_t + a.kh >= 1 &&
            (a.OW - 1) * a.stride - a.pad_l + a.kw >= 1,
        w + ": output size does not fit the input");
  check(a.ldo >= a.N, w + ": output row stride < N");
  check(a.act >= 0 && a.act <= 2, w + ": act must be 0 none, 1 relu, 2 relu6");
  check(a.x_zp >= 0 && a.x_zp <= 255 && a.out_zp >= 0 && a.out_zp <= 255, w + ": zero points must be 0..255");
  check(a.x_scale > 0 && std::isfinite(a.x_scale) && (!a.out_u8 || (a.out_scale > 0 && std::isfinite(a.out_scale))),
        w + ": scales must be positive and finite");
  for (int64_t n = 0; n < a.N; ++n)
    check(a.w_scale[n] > 0 && std::isfinite(a.w_scale[n]), w + ": weight scales must be positive and finite");
}

// ---------------------------------------------------------------- depthwise
// Channel order of the VNNI accumulators: accumulator j, lane 4L + d holds channel 16L + 4j + d (the
// order the byte unpacks of 4 rows produce, and the order the saturating packs undo).
inline int64_t dw_chan(int j, int lane) { return 16 * (lane / 4) + 4 * j + lane % 4; }
inline int64_t dw_groups(int64_t kh) { return ceil_div(kh, 4); }
inline int64_t dw_vnni_bytes(int64_t C, int64_t kh, int64_t kw) { return ceil_div(C, 64) * dw_groups(kh) * kw * 256; }

// One interleaved column: 64 channels of 4 input rows -> 4 vectors of 16 dwords [row0..row3].
LATHE_T512 inline void dw_interleave(const uint8_t* p0, const uint8_t* p1, const uint8_t* p2, const uint8_t* p3,
                                     __mmask64 mk, __m512i* I) {
  const __m512i a0 = _mm512_maskz_loadu_epi8(mk, p0), a1 = _mm512_maskz_loadu_epi8(mk, p1);
  const __m512i a2 = _mm512_maskz_loadu_epi8(mk, p2), a3 = _mm512_maskz_loadu_epi8(mk, p3);
  const __m512i l01 = _mm512_unpacklo_epi8(a0, a1), h01 = _mm512_unpackhi_epi8(a0, a1);
  const __m512i l23 = _mm512_unpacklo_epi8(a2, a3), h23 = _mm512_unpackhi_epi8(a2, a3);
  I[0] = _mm512_unpacklo_epi16(l01, l23), I[1] = _mm512_unpackhi_epi16(l01, l23);
  I[2] = _mm512_unpacklo_epi16(h01, h23), I[3] = _mm512_unpackhi_epi16(h01, h23);
}

// Interleaved column iw of the 4 rows rp (c0 added by the caller); a column in the padding reads
// the zero-point row instead (branch free, so the accumulators stay in registers).
LATHE_T512 inline void dw_column(const uint8_t* const* rp, const uint8_t* zp, int64_t iw, int64_t W, int64_t ldc,
                                 __mmask64 mk, __m512i* I) {
  const bool in = iw >= 0 && iw < W;
  const int64_t off = in ? iw * ldc : 0;
  dw_interleave(in ? rp[0] + off : zp, in ? rp[1] + off : zp, in ? rp[2] + off : zp, in ? rp[3] + off : zp, mk, I);
}

struct DwRow {  // one output row's input rows (zero-point row where a row falls in the padding)
  const uint8_t* rp[8];
  const uint8_t* zp;  // a zero-point row
};

// OB consecutive outputs of one row, 64 channels from c0. rp: the kh (rounded up to 4) input rows;
// iw0: input column of output 0's first tap. Each interleaved column feeds every output it reaches.
// KW, S > 0: the kernel width and stride known at compile time (the loops unroll and the
// accumulators stay in registers); KW = 0: from a (then OB is 1).
template <int OB, int KW, int S>
LATHE_T512 void dw_block_vnni(const ConvArgs& a, const Epi& e, const DwRow& row, int64_t RG, int64_t iw0,
                              int64_t c0, __mmask64 mk, const int8_t* wcb, const float* mulP, const int32_t* initP,
                              uint8_t* out, int64_t m0) {
  static_assert(KW > 0 || OB == 1, "a run-time kernel width computes one output at a time");
  const int64_t kw = KW > 0 ? KW : a.kw;
  constexpr int NCOL = KW > 0 ? (OB - 1) * S + KW : 0;
  __m512i acc[OB][4];
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    const __m512i i0 = _mm512_loadu_si512(initP + j * 16);
#pragma GCC unroll 8
    for (int o = 0; o < OB; ++o) acc[o][j] = i0;
  }
  for (int64_t g = 0; g < RG; ++g) {
    const int8_t* wg = wcb + g * kw * 256;
    const uint8_t* rp[4] = {row.rp[4 * g] + c0, row.rp[4 * g + 1] + c0, row.rp[4 * g + 2] + c0, row.rp[4 * g + 3] + c0};
    if constexpr (KW > 0) {
#pragma GCC unroll 32
      for (int col = 0; col < NCOL; ++col) {
        __m512i I[4];
        dw_column(rp, row.zp, iw0 + col, a.W, a.ldc, mk, I);
#pragma GCC unroll 8
        for (int o = 0; o < OB; ++o) {
          const int kx = col - o * S;
          if (kx < 0 || kx >= KW) continue;
#pragma GCC unroll 4
          for (int j = 0; j < 4; ++j)
            acc[o][j] = _mm512_dpbusd_epi32(acc[o][j], I[j], _mm512_loadu_si512(wg + kx * 256 + j * 64));
        }
      }
    } else {
      for (int64_t kx = 0; kx < kw; ++kx) {
        __m512i I[4];
        dw_column(rp, row.zp, iw0 + kx, a.W, a.ldc, mk, I);
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j)
          acc[0][j] = _mm512_dpbusd_epi32(acc[0][j], I[j], _mm512_loadu_si512(wg + kx * 256 + j * 64));
      }
    }
  }
  __m512 mul[4];
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) mul[j] = _mm512_loadu_ps(mulP + j * 16);
  if (a.out_u8) {
    const __m512i zp16 = _mm512_set1_epi16(static_cast<int16_t>(a.out_zp));
    const __m512i lo = _mm512_set1_epi8(static_cast<char>(e.lo)), hi = _mm512_set1_epi8(static_cast<char>(e.hi));
#pragma GCC unroll 8
    for (int o = 0; o < OB; ++o) {
      const __m512i q = pack_u8(requant(acc[o][0], mul[0]), requant(acc[o][1], mul[1]), requant(acc[o][2], mul[2]),
                                requant(acc[o][3], mul[3]), zp16, lo, hi);
      if (mk == ~0ULL) _mm512_storeu_si512(out + (m0 + o) * a.ldo + c0, q);
      else _mm512_mask_storeu_epi8(out + (m0 + o) * a.ldo + c0, mk, q);
    }
  } else {
    const int64_t left = a.C - c0;
    for (int o = 0; o < OB; ++o) {
      alignas(64) float tmp[4][16];
      for (int j = 0; j < 4; ++j) {
        const __m512 bs = _mm512_loadu_ps(mulP + 64 + j * 16);  // the bias follows mul in the dw tables
        __m512 y = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[o][j]), mul[j]), bs);
        if (a.act >= 1) y = _mm512_max_ps(y, _mm512_setzero_ps());
        if (a.act == 2) y = _mm512_min_ps(y, _mm512_set1_ps(6.f));
        _mm512_store_ps(tmp[j], y);
      }
      float* dst = static_cast<float*>(a.out) + (m0 + o) * a.ldo + c0;
      for (int j = 0; j < 4; ++j)
        for (int l = 0; l < 16; ++l)
          if (dw_chan(j, l) < left) dst[dw_chan(j, l)] = tmp[j][l];
    }
  }
}

template <int KW, int S>
LATHE_T512 void dw_row_vnni(const ConvArgs& a, const Epi& e, const DwRow& row, int64_t m_row,
                            const float* tabF, const int32_t* tabI) {
  const int64_t CB = ceil_div(a.C, 64), RG = dw_groups(a.kh);
  uint8_t* out = static_cast<uint8_t*>(a.out);
  constexpr int OB = KW > 0 ? 4 : 1;
  for (int64_t cb = 0; cb < CB; ++cb) {
    const int64_t c0 = cb * 64, left = a.C - c0;
    const __mmask64 mk = left >= 64 ? ~0ULL : ((1ULL << left) - 1);
    const int8_t* wcb = a.packed + cb * RG * a.kw * 256;
    const float* mulP = tabF + cb * 128;
    const int32_t* initP = tabI + cb * 64;
    int64_t ow = 0;
    for (; ow + OB <= a.OW; ow += OB)
      dw_block_vnni<OB, KW, S>(a, e, row, RG, ow * a.stride - a.pad_l, c0, mk, wcb, mulP, initP, out, m_row + ow);
    const int64_t iw = ow * a.stride - a.pad_l;
    if constexpr (KW > 0) {  // the row's last 1-3 outputs: one block of them (7x7 and 14x14 maps end so)
      switch (a.OW - ow) {
        case 3: dw_block_vnni<3, KW, S>(a, e, row, RG, iw, c0, mk, wcb, mulP, initP, out, m_row + ow); break;
        case 2: dw_block_vnni<2, KW, S>(a, e, row, RG, iw, c0, mk, wcb, mulP, initP, out, m_row + ow); break;
        case 1: dw_block_vnni<1, KW, S>(a, e, row, RG, iw, c0, mk, wcb, mulP, initP, out, m_row + ow); break;
        default: break;
      }
    } else {
      for (; ow < a.OW; ++ow)
        dw_block_vnni<1, 0, 0>(a, e, row, RG, ow * a.stride - a.pad_l, c0, mk, wcb, mulP, initP, out, m_row + ow);
    }
  }
}

using DwRowFn = void (*)(const ConvArgs&, const Epi&, const DwRow&, int64_t, const float*, const int32_t*);

DwRowFn dw_row_fn(int64_t kw, int64_t s) {
  if (kw == 3 && s == 1) return dw_row_vnni<3, 1>;
  if (kw == 3 && s == 2) return dw_row_vnni<3, 2>;
  if (kw == 5 && s == 1) return dw_row_vnni<5, 1>;
  if (kw == 5 && s == 2) return dw_row_vnni<5, 2>;
  return dw_row_vnni<0, 0>;
}

LATHE_T256 void dw_pixel_avx2(const ConvArgs& a, const Epi& e, const uint8_t* const* p, int64_t T, int64_t m,
                              const int8_t* plain, int64_t ldw) {
  int64_t c = 0;
  for (; c + 8 <= a.C; c += 8) {
    __m256i acc = _mm256_setzero_si256();
    for (int64_t t = 0; t < T; ++t) {
      const __m256i xv = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p[t] + c)));
      const __m256i wv = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(plain + t * ldw + c)));
      acc = _mm256_add_epi32(acc, _mm256_mullo_epi32(xv, wv));
    }
    alignas(32) int32_t s[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(s), acc);
    for (int j = 0; j < 8; ++j) store_scalar(a, e, m, c + j, s[j]);
  }
  for (; c < a.C; ++c) {
    int32_t acc = 0;
    for (int64_t t = 0; t < T; ++t) acc += int32_t(p[t][c]) * int32_t(plain[t * ldw + c]);
    store_scalar(a, e, m, c, acc);
  }
}

void dw_pixel_scalar(const ConvArgs& a, const Epi& e, const uint8_t* const* p, int64_t T, int64_t m,
                     const int8_t* plain, int64_t ldw) {
  for (int64_t c = 0; c < a.C; ++c) {
    int32_t acc = 0;
    for (int64_t t = 0; t < T; ++t) acc += int32_t(p[t][c]) * int32_t(plain[t * ldw + c]);
    store_scalar(a, e, m, c, acc);
  }
}

}  // namespace

// ---------------------------------------------------------------- dense entry points
int64_t conv2d_int8_packed_bytes(int64_t N, int64_t kh, int64_t kw, int64_t C) {
  return int8_packed_bytes(N, kh * kw * c4(C));
}

int64_t conv2d_int8_wsum_len(int64_t N) { return int8_packed_cols(N); }

void conv2d_int8_pack(const int8_t* w, int64_t N, int64_t kh, int64_t kw, int64_t C, int8_t* packed,
                      int32_t* wsum) {
  check(w && packed && wsum, "conv2d_int8_pack: null pointer");
  check(N > 0 && kh > 0 && kw > 0 && C > 0 && kh <= 8 && kw <= 8, "conv2d_int8_pack: bad shape");
  const int64_t T = kh * kw, CP = c4(C), K = T * CP;
  std::vector<int8_t> wide(N * K, 0);  // taps padded to C4 so a 4-k group never spans two taps
  for (int64_t n = 0; n < N; ++n)
    for (int64_t t = 0; t < T; ++t) std::memcpy(&wide[n * K + t * CP], w + (n * T + t) * C, C);
  int8_pack_weight(wide.data(), N, K, K, packed, wsum);
}

void conv2d_int8(const ConvArgs& a) {
  check_common(a, "conv2d_int8");
  check(!a.res || a.ld_res >= a.N, "conv2d_int8: residual row stride < N");
  if (a.B == 0) return;
  const Epi e = make_epi(a);
  const int64_t T = a.kh * a.kw, CB = c4(a.C) / 4, M = a.B * a.OH * a.OW;
  const bool direct = T == 1 && a.stride == 1 && a.pad_t == 0 && a.pad_l == 0 && a.OH == a.H && a.OW == a.W;
  std::vector<uint8_t> zprow(a.ldc, static_cast<uint8_t>(a.x_zp));
  const Isa isa = active_isa();
  const int MR = isa == Isa::Avx512Vnni ? 6 : 4;
  const int64_t NB = ceil_div(a.N, 16);
  const int64_t ngroups = isa == Isa::Avx512Vnni ? ceil_div(NB, 4) : isa == Isa::Avx2 ? ceil_div(a.N, 8) : 1;
  const int64_t mtiles = ceil_div(M, MR), tasks = mtiles * ngroups;
  const int nthreads = threads_for(M * a.N * T * c4(a.C), a.nthreads);
  // The bigger operand is read once: activations bigger than the weights (early layers, large
  // batches): row tile outer, its rows stay in L1 across the column groups and each output row is
  // written whole; weights bigger: column group outer, its panel stays in cache while rows stream.
  const bool rows_outer = M * T * c4(a.C) > T * c4(a.C) * a.N;
  if (isa == Isa::Avx512Vnni && direct) {
    constexpr int64_t kRows = 48;  // rows per task: 8 tiles
    const int64_t mblocks = ceil_div(M, kRows);
    parallel_tasks(nthreads, rows_outer ? mblocks : mblocks * ngroups, [&](int64_t first, int64_t last) {
      for (int64_t t = first; t < last; ++t) {
        const int64_t mb = rows_outer ? t : t % mblocks;
        const int64_t g0 = rows_outer ? 0 : t / mblocks, g1 = rows_outer ? ngroups : g0 + 1;
        const int64_t m0 = mb * kRows, m1 = std::min(M, m0 + kRows);
        for (int64_t g = g0; g < g1; ++g) {
          int64_t nb0;
          int nv;
          column_group(NB, ngroups, g, &nb0, &nv);
          auto* fn = nv == 4 ? conv_rows_vnni<4> : nv == 3 ? conv_rows_vnni<3> : nv == 2 ? conv_rows_vnni<2>
                                                                                        : conv_rows_vnni<1>;
          fn(a, e, CB, m0, m1, nb0);
        }
      }
    });
    return;
  }
  parallel_tasks(nthreads, tasks, [&](int64_t first, int64_t last) {
  for (int64_t task = first; task < last; ++task) {
    const int64_t g = rows_outer ? task % ngroups : task / mtiles;
    const int64_t m0 = (rows_outer ? task / ngroups : task % mtiles) * MR;
    const int mr = static_cast<int>(std::min<int64_t>(MR, M - m0));
    const uint8_t* ptrs[6 * kMaxTaps];
    for (int r = 0; r < mr; ++r) {
      if (direct) ptrs[r] = a.x + (m0 + r) * a.ldc;
      else tap_ptrs(a, m0 + r, zprow.data(), ptrs + r * T);
    }
    if (isa == Isa::Avx512Vnni) {
      int64_t nb0;
      int nv;
      column_group(NB, ngroups, g, &nb0, &nv);
      vnni_tile(mr, nv)(a, e, ptrs, T, CB, m0, nb0);
    } else if (isa == Isa::Avx2) {
      auto* fn = mr == 1 ? conv_tile_avx2<1> : mr == 2 ? conv_tile_avx2<2> : mr == 3 ? conv_tile_avx2<3>
                                                                                      : conv_tile_avx2<4>;
      fn(a, e, ptrs, T, CB, m0, g / 2, static_cast<int>(g % 2));
    } else {
      conv_scalar_rows(a, e, ptrs, T, CB, m0, mr);
    }
  }
  });
}

// ---------------------------------------------------------------- depthwise entry points
int64_t dwconv_int8_packed_bytes(int64_t C, int64_t kh, int64_t kw) {
  return dw_vnni_bytes(C, kh, kw) + kh * kw * ceil_div(C, 64) * 64;
}

// VNNI part: [CB64][RG][kw][4 accumulators][16 lanes][4 rows of the group]; then plain [taps][CB * 64].
void dwconv_int8_pack(const int8_t* w, int64_t C, int64_t kh, int64_t kw, int8_t* packed, int32_t* wsum) {
  check(w && packed && wsum, "dwconv_int8_pack: null pointer");
  check(C > 0 && kh > 0 && kw > 0 && kh <= 8 && kw <= 8, "dwconv_int8_pack: bad shape");
  const int64_t taps = kh * kw, CB = ceil_div(C, 64), RG = dw_groups(kh), ldw = CB * 64;
  std::memset(packed, 0, dwconv_int8_packed_bytes(C, kh, kw));
  int8_t* plain = packed + dw_vnni_bytes(C, kh, kw);
  for (int64_t c = 0; c < C; ++c) {
    int32_t s = 0;
    for (int64_t t = 0; t < taps; ++t) {
      const int8_t v = w[c * taps + t];
      s += v;
      plain[t * ldw + c] = v;
    }
    wsum[c] = s;
  }
  for (int64_t cb = 0; cb < CB; ++cb)
    for (int64_t g = 0; g < RG; ++g)
      for (int64_t kx = 0; kx < kw; ++kx)
        for (int j = 0; j < 4; ++j)
          for (int l = 0; l < 16; ++l) {
            const int64_t c = cb * 64 + dw_chan(j, l);
            for (int i = 0; i < 4; ++i) {
              const int64_t ky = 4 * g + i;
              if (c < C && ky < kh)
                packed[((((cb * RG + g) * kw + kx) * 4 + j) * 16 + l) * 4 + i] = w[c * taps + ky * kw + kx];
            }
          }
}

void dwconv_int8(const ConvArgs& a) {
  check_common(a, "dwconv_int8");
  check(a.N == a.C, "dwconv_int8: depthwise needs as many output channels as input channels");
  check(!a.res, "dwconv_int8: no residual input");
  if (a.B == 0) return;
  const Epi e = make_epi(a);
  const int64_t T = a.kh * a.kw, CB = ceil_div(a.C, 64), ldw = CB * 64;
  const int8_t* plain = a.packed + dw_vnni_bytes(a.C, a.kh, a.kw);
  std::vector<uint8_t> zprow(a.W * a.ldc + 64, static_cast<uint8_t>(a.x_zp));
  const Isa isa = active_isa();
  // per-lane copies of the channel constants, in the VNNI accumulators' channel order:
  // per 64-channel block, mul[64] then bias[64] (fp32), and init[64] (int32)
  std::vector<float> tabF;
  std::vector<int32_t> tabI;
  if (isa == Isa::Avx512Vnni) {
    tabF.assign(CB * 128, 0.f), tabI.assign(CB * 64, 0);
    for (int64_t cb = 0; cb < CB; ++cb)
      for (int j = 0; j < 4; ++j)
        for (int l = 0; l < 16; ++l) {
          const int64_t c = cb * 64 + dw_chan(j, l), o = j * 16 + l;
          if (c >= a.C) continue;
          tabF[cb * 128 + o] = e.mul[c], tabF[cb * 128 + 64 + o] = e.bias[c], tabI[cb * 64 + o] = e.init[c];
        }
  }
  const int64_t rows = a.B * a.OH;
  const DwRowFn row_fn = dw_row_fn(a.kw, a.stride);
  const int nthreads = threads_for(rows * a.OW * a.C * T * 4, a.nthreads);
  parallel_tasks(nthreads, rows, [&](int64_t first, int64_t last) {
  for (int64_t row = first; row < last; ++row) {
    if (isa == Isa::Avx512Vnni) {
      const int64_t b = row / a.OH, oh = row % a.OH;
      DwRow r;
      r.zp = zprow.data();
      for (int64_t i = 0; i < 8; ++i) {
        const int64_t ih = oh * a.stride - a.pad_t + i;
        r.rp[i] = i < a.kh && ih >= 0 && ih < a.H ? a.x + (b * a.H + ih) * a.W * a.ldc : zprow.data();
      }
      row_fn(a, e, r, row * a.OW, tabF.data(), tabI.data());
      continue;
    }
    const uint8_t* p[kMaxTaps];
    for (int64_t ow = 0; ow < a.OW; ++ow) {
      const int64_t m = row * a.OW + ow;
      tap_ptrs(a, m, zprow.data(), p);
      if (isa == Isa::Avx2) dw_pixel_avx2(a, e, p, T, m, plain, ldw);
      else dw_pixel_scalar(a, e, p, T, m, plain, ldw);
    }
  }
  });
}

namespace {

// One image row (all channels) of quantize_nchw_u8; returns whether it held a NaN or Inf.
bool quantize_row_scalar(const float* x, int64_t C, int64_t HW, int64_t W, float inv, int32_t zp, uint8_t* o,
                         int64_t ldc) {
  bool bad = false;
  const float fz = static_cast<float>(zp);
  for (int64_t c = 0; c < C; ++c) {
    const float* xr = x + c * HW;
    for (int64_t w = 0; w < W; ++w) {
      bad |= !std::isfinite(xr[w]);
      const float v = std::nearbyint(xr[w] * inv) + fz;
      o[w * ldc + c] = v == v ? static_cast<uint8_t>(std::min(255.f, std::max(0.f, v))) : static_cast<uint8_t>(zp);
    }
  }
  for (int64_t w = 0; w < W; ++w)
    for (int64_t c = C; c < ldc; ++c) o[w * ldc + c] = static_cast<uint8_t>(zp);
  return bad;
}

// ldc == 4 (images: C <= 4): 16 pixels at a time, 4 channel codes packed into each dword.
LATHE_T512 bool quantize_row_avx512(const float* x, int64_t C, int64_t HW, int64_t W, float inv, int32_t zp,
                                    uint8_t* o) {
  const __m512 vinv = _mm512_set1_ps(inv), lo = _mm512_set1_ps(-1024.f), hi = _mm512_set1_ps(1024.f);
  const __m512i vzp = _mm512_set1_epi32(zp), z = _mm512_setzero_si512(), top = _mm512_set1_epi32(255);
  __mmask16 bad = 0;
  int64_t w = 0;
  for (; w < W; w += 16) {
    const __mmask16 mk = W - w >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (W - w)) - 1);
    __m512i word = _mm512_setzero_si512();
    for (int64_t c = 0; c < 4; ++c) {
      __m512i q = vzp;
      if (c < C) {
        const __m512 v = _mm512_maskz_loadu_ps(mk, x + c * HW + w);
        // |x| = inf: x - x is NaN; a NaN code becomes zp (the caller marks the image)
        bad |= _mm512_mask_cmp_ps_mask(mk, _mm512_sub_ps(v, v), _mm512_sub_ps(v, v), _CMP_UNORD_Q);
        const __m512 t = _mm512_mul_ps(v, vinv);
        const __mmask16 nan = _mm512_cmp_ps_mask(t, t, _CMP_UNORD_Q);
        const __m512i r = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(t, lo), hi));  // half even
        q = _mm512_mask_mov_epi32(_mm512_min_epi32(_mm512_max_epi32(_mm512_add_epi32(r, vzp), z), top), nan, vzp);
      }
      word = _mm512_or_si512(word, _mm512_slli_epi32(q, static_cast<unsigned>(8 * c)));
    }
    _mm512_mask_storeu_epi32(o + w * 4, mk, word);
  }
  return bad != 0;
}

}  // namespace

void quantize_nchw_u8(const float* x, int64_t B, int64_t C, int64_t H, int64_t W, float scale, int32_t zp,
                      uint8_t* out, int64_t ldc, int nthreads, uint8_t* bad) {
  check(x && out, "quantize_nchw_u8: null pointer");
  check(B >= 0 && C > 0 && H > 0 && W > 0 && ldc >= C, "quantize_nchw_u8: bad shape");
  check(scale > 0 && zp >= 0 && zp <= 255, "quantize_nchw_u8: bad scale or zero point");
  const float inv = 1.f / scale;
  if (bad) std::memset(bad, 0, B);
  const bool vec = ldc == 4 && active_isa() == Isa::Avx512Vnni;
  const int nt = threads_for(B * C * H * W * 16, nthreads);
  parallel_tasks(nt, B * H, [&](int64_t first, int64_t last) {
    for (int64_t bh = first; bh < last; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const float* xr = x + (b * C * H + h) * W;
      uint8_t* o = out + bh * W * ldc;
      const bool nf = vec ? quantize_row_avx512(xr, C, H * W, W, inv, zp, o)
                          : quantize_row_scalar(xr, C, H * W, W, inv, zp, o, ldc);
      if (nf && bad) __atomic_store_n(bad + b, static_cast<uint8_t>(1), __ATOMIC_RELAXED);
    }
  });
}

}  // namespace lathe
