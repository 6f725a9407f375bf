// fp32 convolution writing u8 codes (see conv_f32_u8.h). Two bodies:
//   avx512: MR output pixels x NV 16-channel vectors in registers, one broadcast input value a
//           tap and pixel, the weights of a tap loaded once for the MR pixels; the pixels whose
//           taps reach into the left/right padding take the scalar body;
//   scalar: plain loops (also the AVX2 level's body: 3-channel first layers are a small part of
//           a network).
// Both add the taps in the same order with separate multiplies and adds (the build uses
// -ffp-contract=off), so they agree bit for bit.
#include "cpu/conv_f32_u8.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/conv_int8.h"
#include "cpu/isa.h"
#include "cpu/task_pool.h"
#include "cpu/vec_math.h"

namespace lathe {
namespace {

constexpr float kBig = kRequantBig;
inline int64_t np16(int64_t n) { return (n + 15) / 16 * 16; }

struct Quant {  // the epilogue's constants
  float inv;
  int32_t zp, lo, hi;
};

Quant make_quant(const ConvF32Args& a) {
  Quant q;
  q.inv = 1.f / a.out_scale;
  q.zp = a.out_zp;
  u8_act_bounds(a.act, q.inv, a.out_zp, &q.lo, &q.hi);
  return q;
}

inline uint8_t code_scalar(float y, const Quant& q) {
  float t = y * q.inv;
  t = std::isnan(t) ? -kBig : std::min(kBig, std::max(-kBig, t));
  const int32_t v = static_cast<int32_t>(std::nearbyint(t)) + q.zp;
  return static_cast<uint8_t>(std::min(q.hi, std::max(q.lo, v)));
}

// One output pixel, every channel, taps in the padding skipped. Returns true if a y was not finite.
bool pixel_scalar(const ConvF32Args& a, const Quant& q, const float* img, int64_t oh, int64_t ow, uint8_t* dst) {
  const int64_t NP = np16(a.N);
  float y[4096];  // N <= 4096, checked at the entry
  for (int64_t n = 0; n < a.N; ++n) y[n] = a.bias ? a.bias[n] : 0.f;
  for (int64_t c = 0; c < a.C; ++c)
    for (int64_t ky = 0; ky < a.kh; ++ky) {
      const int64_t ih = oh * a.stride - a.pad_t + ky;
      if (ih < 0 || ih >= a.H) continue;
      for (int64_t kx = 0; kx < a.kw; ++kx) {
        const int64_t iw = ow * a.stride - a.pad_l + kx;
        if (iw < 0 || iw >= a.W) continue;
        const float xv = img[(c * a.H + ih) * a.W + iw];
        const float* w = a.packed + ((c * a.kh + ky) * a.kw + kx) * NP;
        for (int64_t n = 0; n < a.N; ++n) y[n] = y[n] + xv * w[n];
      }
    }
  bool bad = false;
  for (int64_t n = 0; n < a.N; ++n) {
    bad |= !std::isfinite(y[n]);
    dst[n] = code_scalar(y[n], q);
  }
  for (int64_t n = a.N; n < a.ldo; ++n) dst[n] = static_cast<uint8_t>(a.out_zp);
  return bad;
}

// MR pixels from ow0 (every tap inside the row: no column checks) x NV vectors from channel 16 * nb0.
// rows[c * kh + ky]: the input row of that tap, null where it falls in the padding.
template <int MR, int NV>
LATHE_T512 bool tile_avx512(const ConvF32Args& a, const Quant& q, const float* const* rows, int64_t oh, int64_t ow0,
                            int64_t nb0) {
  const int64_t NP = np16(a.N), s = a.stride;
  __m512 acc[MR][NV];
  for (int v = 0; v < NV; ++v) {
    const int64_t n0 = (nb0 + v) * 16;
    const __mmask16 m = static_cast<__mmask16>(n0 + 16 <= a.N ? 0xFFFF : n0 >= a.N ? 0 : (1u << (a.N - n0)) - 1);
    const __m512 b0 = a.bias ? _mm512_maskz_loadu_ps(m, a.bias + n0) : _mm512_setzero_ps();
    for (int r = 0; r < MR; ++r) acc[r][v] = b0;
  }
  for (int64_t ck = 0; ck < a.C * a.kh; ++ck) {
    if (!rows[ck]) continue;
    const float* p = rows[ck] + ow0 * s - a.pad_l;
    const float* wt = a.packed + ck * a.kw * NP + nb0 * 16;
    for (int64_t kx = 0; kx < a.kw; ++kx) {
      __m512 w[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) w[v] = _mm512_loadu_ps(wt + kx * NP + v * 16);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m512 xv = _mm512_set1_ps(p[r * s + kx]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_add_ps(acc[r][v], _mm512_mul_ps(xv, w[v]));
      }
    }
  }
  const __m512 inv = _mm512_set1_ps(q.inv), big = _mm512_set1_ps(kBig), nbig = _mm512_set1_ps(-kBig);
  const __m512i zp = _mm512_set1_epi32(q.zp), lo = _mm512_set1_epi32(q.lo), hi = _mm512_set1_epi32(q.hi);
  __mmask16 bad = 0;
  for (int r = 0; r < MR; ++r) {
    uint8_t* dst = a.out + ((oh + 0) * a.OW + ow0 + r) * a.ldo;  // the caller offsets a.out to image b
    for (int v = 0; v < NV; ++v) {
      const int64_t n0 = (nb0 + v) * 16;
      if (n0 >= a.ldo) break;
      bad |= _mm512_cmp_ps_mask(_mm512_sub_ps(acc[r][v], acc[r][v]), _mm512_setzero_ps(), _CMP_NEQ_UQ);
      __m512 t = _mm512_mul_ps(acc[r][v], inv);
      t = _mm512_min_ps(big, _mm512_max_ps(t, nbig));  // max(NaN, -big) = -big: a NaN gives lo
      __m512i c = _mm512_add_epi32(_mm512_cvtps_epi32(t), zp);
      c = _mm512_min_epi32(hi, _mm512_max_epi32(lo, c));
      const int64_t valid = std::min<int64_t>(16, a.N - n0), lanes = std::min<int64_t>(16, a.ldo - n0);
      if (valid < 16) c = _mm512_mask_blend_epi32(static_cast<__mmask16>((1u << std::max<int64_t>(valid, 0)) - 1), zp, c);
      _mm_mask_storeu_epi8(dst + n0, static_cast<__mmask16>(lanes >= 16 ? 0xFFFF : (1u << lanes) - 1),
                           _mm512_cvtepi32_epi8(c));
    }
  }
  return bad != 0;
}

template <int NV>
LATHE_T512 bool row_avx512(const ConvF32Args& a, const Quant& q, const float* const* rows, int64_t oh, int64_t ow0,
                           int64_t ow1, int64_t nb0) {
  bool bad = false;
  int64_t ow = ow0;
  for (; ow + 6 <= ow1; ow += 6) bad |= tile_avx512<6, NV>(a, q, rows, oh, ow, nb0);
  for (; ow < ow1; ++ow) bad |= tile_avx512<1, NV>(a, q, rows, oh, ow, nb0);
  return bad;
}

}  // namespace

int64_t conv_f32_u8_packed_floats(int64_t N, int64_t C, int64_t kh, int64_t kw) { return C * kh * kw * np16(N); }

void conv_f32_u8_pack(const float* w, int64_t N, int64_t C, int64_t kh, int64_t kw, float* packed) {
  check(w && packed && N > 0 && C > 0 && kh > 0 && kw > 0, "conv_f32_u8_pack: bad arguments");
  const int64_t NP = np16(N), T = C * kh * kw;
  std::fill(packed, packed + T * NP, 0.f);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t t = 0; t < T; ++t) packed[t * NP + n] = w[n * T + t];
}

void conv_f32_u8(const ConvF32Args& a) {
  check(a.x && a.packed && a.out, "conv_f32_u8: null pointer");
  check(a.B >= 0 && a.C > 0 && a.H > 0 && a.W > 0 && a.N > 0 && a.N <= 4096, "conv_f32_u8: bad shape");
  check(a.kh >= 1 && a.kw >= 1 && a.kh <= 8 && a.kw <= 8 && a.stride >= 1 && a.pad_t >= 0 && a.pad_l >= 0,
        "conv_f32_u8: bad geometry");
  check(a.OH >= 1 && a.OW >= 1 && a.ldo >= (a.N + 3) / 4 * 4, "conv_f32_u8: bad output shape");
  check(a.out_scale > 0 && a.out_zp >= 0 && a.out_zp <= 255 && a.act >= 0 && a.act <= 2,
        "conv_f32_u8: bad output quantization");
  if (a.B == 0) return;
  const Quant q = make_quant(a);
  const bool simd = active_isa() == Isa::Avx512Vnni;
  // columns whose taps all lie inside the row: [ow_lo, ow_hi)
  const int64_t ow_lo = std::min(a.OW, (a.pad_l + a.stride - 1) / a.stride);
  const int64_t span = a.W + a.pad_l - a.kw;  // the last column's first tap may start at span
  const int64_t ow_hi = span < 0 ? ow_lo : std::max(ow_lo, std::min(a.OW, span / a.stride + 1));
  const int64_t NB = np16(a.N) / 16, rows_total = a.B * a.OH;
  std::vector<uint8_t> row_bad(rows_total, 0);
  const int nthreads = rows_total * a.OW * a.N * a.C * a.kh * a.kw < (1 << 18) ? 1 : a.nthreads;
  parallel_tasks(nthreads, rows_total, [&](int64_t first, int64_t last) {
    std::vector<const float*> rows(a.C * a.kh);
    for (int64_t t = first; t < last; ++t) {
      const int64_t b = t / a.OH, oh = t % a.OH;
      const float* img = a.x + b * a.C * a.H * a.W;
      ConvF32Args ab = a;
      ab.out = a.out + b * a.OH * a.OW * a.ldo;
      bool bad = false;
      const int64_t lo = simd ? ow_lo : a.OW, hi = simd ? ow_hi : a.OW;
      for (int64_t ow = 0; ow < lo; ++ow) bad |= pixel_scalar(ab, q, img, oh, ow, ab.out + (oh * a.OW + ow) * a.ldo);
      if (simd && lo < hi) {
        for (int64_t c = 0; c < a.C; ++c)
          for (int64_t ky = 0; ky < a.kh; ++ky) {
            const int64_t ih = oh * a.stride - a.pad_t + ky;
            rows[c * a.kh + ky] = ih >= 0 && ih < a.H ? img + (c * a.H + ih) * a.W : nullptr;
          }
        for (int64_t nb = 0; nb < NB; nb += 2)
          bad |= NB - nb >= 2 ? row_avx512<2>(ab, q, rows.data(), oh, lo, hi, nb)
                              : row_avx512<1>(ab, q, rows.data(), oh, lo, hi, nb);
      }
      for (int64_t ow = std::max(lo, hi); ow < a.OW; ++ow)
        bad |= pixel_scalar(ab, q, img, oh, ow, ab.out + (oh * a.OW + ow) * a.ldo);
      row_bad[t] = bad;
    }
  });
  if (a.bad)
    for (int64_t b = 0; b < a.B; ++b)
      a.bad[b] = std::any_of(row_bad.begin() + b * a.OH, row_bad.begin() + (b + 1) * a.OH, [](uint8_t v) { return v; });
}

}  // namespace lathe
