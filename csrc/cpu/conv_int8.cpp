// int8 convolutions (see conv_int8.h). Three bodies per kernel, picked at run time:
//   avx512_vnni: VPDPBUSD on u8 activations x s8 weights;
//   avx2:        VPMADDWD / VPMULLD on widened operands (exact);
//   scalar:      plain loops over the same layouts (the portable reference).
// The integer sums are exact on every path; the fp32 epilogue does the same operations in the
// same order on every path (the build uses -ffp-contract=off), so the paths agree bit for bit.
#include "cpu/conv_int8.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/int8_gemm.h"
#include "cpu/isa.h"
#include "cpu/vec_math.h"

namespace lathe {
namespace {

constexpr int kMaxTaps = 64;  // up to 8x8 kernels
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t c4(int64_t c) { return ceil_div(c, 4) * 4; }

// ---------------------------------------------------------------- shared epilogue (scalar)
inline float act_scalar(float y, int act) {
  if (act >= 1) y = std::max(y, 0.f);
  if (act == 2) y = std::min(y, 6.f);
  return y;
}

inline void store_scalar(const ConvArgs& a, int64_t m, int64_t n, int32_t acc, float wsc, float bias,
                         int32_t wsum) {
  float y = static_cast<float>(acc - a.x_zp * wsum) * a.x_scale * wsc + bias;
  if (a.res)
    y += static_cast<float>(static_cast<int32_t>(a.res[m * a.ld_res + n]) - a.res_zp) * a.res_scale;
  y = act_scalar(y, a.act);
  if (a.out_u8) {
    const float q = std::nearbyint(y * (1.f / a.out_scale)) + static_cast<float>(a.out_zp);
    static_cast<uint8_t*>(a.out)[m * a.ldo + n] = static_cast<uint8_t>(std::min(255.f, std::max(0.f, q)));
  } else {
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

// ---------------------------------------------------------------- dense: AVX-512 VNNI
template <int MR, int NV>
LATHE_T512 void conv_tile_vnni(const ConvArgs& a, const uint8_t* const* ptrs, int64_t T, int64_t CB,
                               int64_t m0, int64_t nb0) {
  const int64_t KB = T * CB, bstride = KB * 64;
  __m512i acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_si512();
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
  const __m512 xs = _mm512_set1_ps(a.x_scale), inv = _mm512_set1_ps(1.f / a.out_scale);
  const __m512i xzp = _mm512_set1_epi32(a.x_zp), ozp = _mm512_set1_epi32(a.out_zp);
  const __m512 six = _mm512_set1_ps(6.f), zero = _mm512_setzero_ps();
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const int64_t n0 = (nb0 + v) * 16;
    if (n0 >= a.N) break;
    const __mmask16 mk = a.N - n0 >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (a.N - n0)) - 1);
    const __m512i corr = _mm512_mullo_epi32(_mm512_loadu_si512(a.wsum + n0), xzp);
    const __m512 ws = _mm512_maskz_loadu_ps(mk, a.w_scale + n0);
    const __m512 bs = a.bias ? _mm512_maskz_loadu_ps(mk, a.bias + n0) : zero;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const int64_t m = m0 + r;
      __m512 y = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][v], corr));
      y = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(y, xs), ws), bs);
      if (a.res) {
        const __m512i rq = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, a.res + m * a.ld_res + n0));
        y = _mm512_add_ps(y, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(rq, _mm512_set1_epi32(a.res_zp))),
                                           _mm512_set1_ps(a.res_scale)));
      }
      if (a.act >= 1) y = _mm512_max_ps(y, zero);
      if (a.act == 2) y = _mm512_min_ps(y, six);
      if (a.out_u8) {
        __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(y, inv)), ozp);
        q = _mm512_min_epi32(_mm512_max_epi32(q, _mm512_setzero_si512()), _mm512_set1_epi32(255));
        _mm_mask_storeu_epi8(static_cast<uint8_t*>(a.out) + m * a.ldo + n0, mk, _mm512_cvtepi32_epi8(q));
      } else {
        _mm512_mask_storeu_ps(static_cast<float*>(a.out) + m * a.ldo + n0, mk, y);
      }
    }
  }
}

using ConvTile = void (*)(const ConvArgs&, const uint8_t* const*, int64_t, int64_t, int64_t, int64_t);

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

// ---------------------------------------------------------------- dense: AVX2 (8 columns)
template <int MR>
LATHE_T256 void conv_tile_avx2(const ConvArgs& a, const uint8_t* const* ptrs, int64_t T, int64_t CB,
                               int64_t m0, int64_t nb, int half) {
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
    for (int c = 0; c < cols; ++c)
      store_scalar(a, m0 + r, n0 + c, acc[c], a.w_scale[n0 + c], a.bias ? a.bias[n0 + c] : 0.f, a.wsum[n0 + c]);
  }
}

void conv_scalar_rows(const ConvArgs& a, const uint8_t* const* ptrs, int64_t T, int64_t CB, int64_t m0,
                      int mr) {
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
      store_scalar(a, m0 + r, n, acc, a.w_scale[n], a.bias ? a.bias[n] : 0.f, a.wsum[n]);
    }
  }
}

void check_common(const ConvArgs& a, const char* who) {
  const std::string w(who);
  check(a.x && a.packed && a.wsum && a.w_scale && a.out, w + ": null pointer");
  check(a.B >= 0 && a.H > 0 && a.W > 0 && a.C > 0 && a.N > 0, w + ": empty shape");
  check(a.ldc >= a.C && a.ldc % 4 == 0, w + ": input channel stride must be >= C and a multiple of 4, got " +
                                            std::to_string(a.ldc));
  check(a.kh >= 1 && a.kw >= 1 && a.kh * a.kw <= kMaxTaps, w + ": kernel size must be 1..8 a side");
  check(a.stride >= 1 && a.pad_t >= 0 && a.pad_l >= 0, w + ": bad stride or padding");
  check(a.OH >= 1 && a.OW >= 1 && (a.OH - 1) * a.stride - a.pad_t + a.kh >= 1 &&
            (a.OW - 1) * a.stride - a.pad_l + a.kw >= 1,
        w + ": output size does not fit the input");
  check(a.ldo >= a.N, w + ": output row stride < N");
  check(a.act >= 0 && a.act <= 2, w + ": act must be 0 none, 1 relu, 2 relu6");
  check(a.x_zp >= 0 && a.x_zp <= 255 && a.out_zp >= 0 && a.out_zp <= 255, w + ": zero points must be 0..255");
  check(a.x_scale > 0 && (!a.out_u8 || a.out_scale > 0), w + ": scales must be positive");
}

// ---------------------------------------------------------------- depthwise
// VNNI layout: [CB64][TG][4 accumulators][16 lanes][4 taps]; accumulator j, lane 4L + d holds
// channel 16L + 4j + d (the order the byte unpacks of 4 tap rows produce, see dw_pixel_vnni).
inline int64_t dw_chan(int j, int lane) { return 16 * (lane / 4) + 4 * j + lane % 4; }

LATHE_T512 void dw_pixel_vnni(const ConvArgs& a, const uint8_t* const* p, int64_t TG, int64_t m,
                              const float* wsP, const float* bsP, const int32_t* wsumP) {
  const int64_t CB = ceil_div(a.C, 64);
  const __m512 xs = _mm512_set1_ps(a.x_scale), inv = _mm512_set1_ps(1.f / a.out_scale);
  const __m512i xzp = _mm512_set1_epi32(a.x_zp), ozp = _mm512_set1_epi32(a.out_zp);
  for (int64_t cb = 0; cb < CB; ++cb) {
    const int64_t c0 = cb * 64, left = a.C - c0;
    const __mmask64 mk = left >= 64 ? ~0ULL : ((1ULL << left) - 1);
    __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                      _mm512_setzero_si512()};
    const int8_t* wb = a.packed + cb * TG * 256;
    for (int64_t g = 0; g < TG; ++g) {
      const __m512i a0 = _mm512_maskz_loadu_epi8(mk, p[4 * g] + c0);
      const __m512i a1 = _mm512_maskz_loadu_epi8(mk, p[4 * g + 1] + c0);
      const __m512i a2 = _mm512_maskz_loadu_epi8(mk, p[4 * g + 2] + c0);
      const __m512i a3 = _mm512_maskz_loadu_epi8(mk, p[4 * g + 3] + c0);
      const __m512i l01 = _mm512_unpacklo_epi8(a0, a1), h01 = _mm512_unpackhi_epi8(a0, a1);
      const __m512i l23 = _mm512_unpacklo_epi8(a2, a3), h23 = _mm512_unpackhi_epi8(a2, a3);
      const int8_t* w = wb + g * 256;
      acc[0] = _mm512_dpbusd_epi32(acc[0], _mm512_unpacklo_epi16(l01, l23), _mm512_loadu_si512(w));
      acc[1] = _mm512_dpbusd_epi32(acc[1], _mm512_unpackhi_epi16(l01, l23), _mm512_loadu_si512(w + 64));
      acc[2] = _mm512_dpbusd_epi32(acc[2], _mm512_unpacklo_epi16(h01, h23), _mm512_loadu_si512(w + 128));
      acc[3] = _mm512_dpbusd_epi32(acc[3], _mm512_unpackhi_epi16(h01, h23), _mm512_loadu_si512(w + 192));
    }
    __m512 y[4];
    for (int j = 0; j < 4; ++j) {
      const int64_t o = (cb * 4 + j) * 16;
      const __m512i corr = _mm512_mullo_epi32(_mm512_loadu_si512(wsumP + o), xzp);
      y[j] = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[j], corr));
      y[j] = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(y[j], xs), _mm512_loadu_ps(wsP + o)), _mm512_loadu_ps(bsP + o));
      if (a.act >= 1) y[j] = _mm512_max_ps(y[j], _mm512_setzero_ps());
      if (a.act == 2) y[j] = _mm512_min_ps(y[j], _mm512_set1_ps(6.f));
    }
    if (a.out_u8) {
      __m128i x[4];
      for (int j = 0; j < 4; ++j) {
        __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(y[j], inv)), ozp);
        q = _mm512_min_epi32(_mm512_max_epi32(q, _mm512_setzero_si512()), _mm512_set1_epi32(255));
        x[j] = _mm512_cvtepi32_epi8(q);  // byte 4L + d = channel 16L + 4j + d
      }
      // 4x4 transpose of dwords: row L = channels 16L .. 16L + 15
      const __m128i t0 = _mm_unpacklo_epi32(x[0], x[1]), t1 = _mm_unpacklo_epi32(x[2], x[3]);
      const __m128i t2 = _mm_unpackhi_epi32(x[0], x[1]), t3 = _mm_unpackhi_epi32(x[2], x[3]);
      __m512i o = _mm512_castsi128_si512(_mm_unpacklo_epi64(t0, t1));
      o = _mm512_inserti32x4(o, _mm_unpackhi_epi64(t0, t1), 1);
      o = _mm512_inserti32x4(o, _mm_unpacklo_epi64(t2, t3), 2);
      o = _mm512_inserti32x4(o, _mm_unpackhi_epi64(t2, t3), 3);
      _mm512_mask_storeu_epi8(static_cast<uint8_t*>(a.out) + m * a.ldo + c0, mk, o);
    } else {
      alignas(64) float tmp[4][16];
      for (int j = 0; j < 4; ++j) _mm512_store_ps(tmp[j], y[j]);
      float* out = static_cast<float*>(a.out) + m * a.ldo + c0;
      for (int j = 0; j < 4; ++j)
        for (int l = 0; l < 16; ++l)
          if (dw_chan(j, l) < left) out[dw_chan(j, l)] = tmp[j][l];
    }
  }
}

LATHE_T256 void dw_pixel_avx2(const ConvArgs& a, const uint8_t* const* p, int64_t T, int64_t m,
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
    for (int j = 0; j < 8; ++j)
      store_scalar(a, m, c + j, s[j], a.w_scale[c + j], a.bias ? a.bias[c + j] : 0.f, a.wsum[c + j]);
  }
  for (; c < a.C; ++c) {
    int32_t acc = 0;
    for (int64_t t = 0; t < T; ++t) acc += int32_t(p[t][c]) * int32_t(plain[t * ldw + c]);
    store_scalar(a, m, c, acc, a.w_scale[c], a.bias ? a.bias[c] : 0.f, a.wsum[c]);
  }
}

void dw_pixel_scalar(const ConvArgs& a, const uint8_t* const* p, int64_t T, int64_t m, const int8_t* plain,
                     int64_t ldw) {
  for (int64_t c = 0; c < a.C; ++c) {
    int32_t acc = 0;
    for (int64_t t = 0; t < T; ++t) acc += int32_t(p[t][c]) * int32_t(plain[t * ldw + c]);
    store_scalar(a, m, c, acc, a.w_scale[c], a.bias ? a.bias[c] : 0.f, a.wsum[c]);
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
  check(N > 0 && kh > 0 && kw > 0 && C > 0 && kh * kw <= kMaxTaps, "conv2d_int8_pack: bad shape");
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
  const int nthreads = std::max(1, a.nthreads);
  const int64_t T = a.kh * a.kw, CB = c4(a.C) / 4, M = a.B * a.OH * a.OW;
  const bool direct = T == 1 && a.stride == 1 && a.pad_t == 0 && a.pad_l == 0 && a.OH == a.H && a.OW == a.W;
  std::vector<uint8_t> zprow(a.ldc, static_cast<uint8_t>(a.x_zp));
  const Isa isa = active_isa();
  const int MR = isa == Isa::Avx512Vnni ? 6 : 4;
  const int64_t NB = ceil_div(a.N, 16);
  const int64_t ngroups = isa == Isa::Avx512Vnni ? ceil_div(NB, 4) : isa == Isa::Avx2 ? ceil_div(a.N, 8) : 1;
  const int64_t mtiles = ceil_div(M, MR), tasks = mtiles * ngroups;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (tasks > 1)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t g = task / mtiles, m0 = (task % mtiles) * MR;
    const int mr = static_cast<int>(std::min<int64_t>(MR, M - m0));
    const uint8_t* ptrs[6 * kMaxTaps];
    for (int r = 0; r < mr; ++r) {
      if (direct) ptrs[r] = a.x + (m0 + r) * a.ldc;
      else tap_ptrs(a, m0 + r, zprow.data(), ptrs + r * T);
    }
    if (isa == Isa::Avx512Vnni) {
      const int nv = static_cast<int>(std::min<int64_t>(4, NB - g * 4));
      vnni_tile(mr, nv)(a, ptrs, T, CB, m0, g * 4);
    } else if (isa == Isa::Avx2) {
      auto* fn = mr == 1 ? conv_tile_avx2<1> : mr == 2 ? conv_tile_avx2<2> : mr == 3 ? conv_tile_avx2<3>
                                                                                      : conv_tile_avx2<4>;
      fn(a, ptrs, T, CB, m0, g / 2, static_cast<int>(g % 2));
    } else {
      conv_scalar_rows(a, ptrs, T, CB, m0, mr);
    }
  }
}

// ---------------------------------------------------------------- depthwise entry points
int64_t dwconv_int8_packed_bytes(int64_t C, int64_t taps) {
  const int64_t CB = ceil_div(C, 64), TG = ceil_div(taps, 4);
  return CB * TG * 256 + taps * CB * 64;
}

void dwconv_int8_pack(const int8_t* w, int64_t C, int64_t taps, int8_t* packed, int32_t* wsum) {
  check(w && packed && wsum, "dwconv_int8_pack: null pointer");
  check(C > 0 && taps > 0 && taps <= kMaxTaps, "dwconv_int8_pack: bad shape");
  const int64_t CB = ceil_div(C, 64), TG = ceil_div(taps, 4), ldw = CB * 64;
  std::memset(packed, 0, dwconv_int8_packed_bytes(C, taps));
  int8_t* plain = packed + CB * TG * 256;
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
    for (int64_t g = 0; g < TG; ++g)
      for (int j = 0; j < 4; ++j)
        for (int l = 0; l < 16; ++l) {
          const int64_t c = cb * 64 + dw_chan(j, l);
          for (int i = 0; i < 4; ++i) {
            const int64_t t = 4 * g + i;
            if (c < C && t < taps) packed[(((cb * TG + g) * 4 + j) * 16 + l) * 4 + i] = w[c * taps + t];
          }
        }
}

void dwconv_int8(const ConvArgs& a) {
  check_common(a, "dwconv_int8");
  check(a.N == a.C, "dwconv_int8: depthwise needs as many output channels as input channels");
  check(!a.res, "dwconv_int8: no residual input");
  if (a.B == 0) return;
  const int nthreads = std::max(1, a.nthreads);
  const int64_t T = a.kh * a.kw, TG = ceil_div(T, 4), CB = ceil_div(a.C, 64), ldw = CB * 64;
  const int8_t* plain = a.packed + CB * TG * 256;
  std::vector<uint8_t> zprow(a.ldc + 64, static_cast<uint8_t>(a.x_zp));
  const Isa isa = active_isa();
  // per-lane copies of the channel constants, in the VNNI accumulators' channel order
  std::vector<float> wsP, bsP;
  std::vector<int32_t> wsumP;
  if (isa == Isa::Avx512Vnni) {
    wsP.assign(CB * 64, 0.f), bsP.assign(CB * 64, 0.f), wsumP.assign(CB * 64, 0);
    for (int64_t cb = 0; cb < CB; ++cb)
      for (int j = 0; j < 4; ++j)
        for (int l = 0; l < 16; ++l) {
          const int64_t c = cb * 64 + dw_chan(j, l), o = (cb * 4 + j) * 16 + l;
          if (c >= a.C) continue;
          wsP[o] = a.w_scale[c], bsP[o] = a.bias ? a.bias[c] : 0.f, wsumP[o] = a.wsum[c];
        }
  }
  const int64_t rows = a.B * a.OH;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (rows > 1)
  for (int64_t row = 0; row < rows; ++row) {
    const uint8_t* p[kMaxTaps + 4];
    for (int64_t ow = 0; ow < a.OW; ++ow) {
      const int64_t m = row * a.OW + ow;
      tap_ptrs(a, m, zprow.data(), p);
      for (int64_t t = T; t < TG * 4; ++t) p[t] = zprow.data();  // zero weights meet them
      if (isa == Isa::Avx512Vnni) dw_pixel_vnni(a, p, TG, m, wsP.data(), bsP.data(), wsumP.data());
      else if (isa == Isa::Avx2) dw_pixel_avx2(a, p, T, m, plain, ldw);
      else dw_pixel_scalar(a, p, T, m, plain, ldw);
    }
  }
}

void quantize_nchw_u8(const float* x, int64_t B, int64_t C, int64_t H, int64_t W, float scale, int32_t zp,
                      uint8_t* out, int64_t ldc, int nthreads) {
  check(x && out, "quantize_nchw_u8: null pointer");
  check(B >= 0 && C > 0 && H > 0 && W > 0 && ldc >= C, "quantize_nchw_u8: bad shape");
  check(scale > 0 && zp >= 0 && zp <= 255, "quantize_nchw_u8: bad scale or zero point");
  const float inv = 1.f / scale, fz = static_cast<float>(zp);
#pragma omp parallel for num_threads(std::max(1, nthreads)) schedule(static) if (B * H > 1)
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const int64_t b = bh / H, h = bh % H;
    uint8_t* o = out + bh * W * ldc;
    for (int64_t c = 0; c < C; ++c) {
      const float* xr = x + ((b * C + c) * H + h) * W;
      for (int64_t w = 0; w < W; ++w) {
        const float v = std::nearbyint(xr[w] * inv) + fz;
        o[w * ldc + c] = v == v ? static_cast<uint8_t>(std::min(255.f, std::max(0.f, v))) : static_cast<uint8_t>(zp);
      }
    }
    for (int64_t w = 0; w < W; ++w)
      for (int64_t c = C; c < ldc; ++c) o[w * ldc + c] = static_cast<uint8_t>(zp);
  }
}

}  // namespace lathe
