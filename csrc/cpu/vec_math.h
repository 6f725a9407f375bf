// Vector math for kernel epilogues (exp, erf, GELU, SiLU) and the target attributes that let
// one translation unit hold bodies for several ISAs without -march flags.
#pragma once
#include <immintrin.h>

#define LATHE_T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")))
#define LATHE_T256 __attribute__((target("avx2,fma")))

namespace lathe {

// The one vector exp of lathe's kernels (softmax, GELU, SiLU), on 16 and 8 lanes.
// Cody-Waite reduction: n = round(x log2 e), r = x - n ln2 (two FMAs, exact to ~2^-35), e^r by a
// degree-6 minimax polynomial on |r| <= ln2/2 (1 + r + r^2 q(r), relative error < 4e-9 before
// rounding). Edges as std::exp where it matters: NaN -> NaN, x > 88.72 (and +inf) -> +inf,
// x < -87.3 (and -inf) -> exactly 0 (never a denormal: e^-87.3 is the smallest normal float).
// The target lists only what the body needs, so both the VNNI GEMMs and the attention bodies
// (avx512f/bw/vl/dq) can inline it.
#define LATHE_EXP512 __attribute__((target("avx512f,fma")))
#define LATHE_EXP256 __attribute__((target("avx2,fma")))

// e^r = 1 + r + r^2 q(r) on |r| <= ln2/2, Horner coefficients from the highest degree
constexpr float kExpPoly[7] = {1.3753952791e-3f, 8.3689104519e-3f, 4.1669487155e-2f, 1.6666518524e-1f,
                               4.9999988789e-1f, 1.f, 1.f};

LATHE_EXP512 inline __m512 exp_poly_avx512(__m512 r) {
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[i]));
  return p;
}

LATHE_EXP512 inline __m512 exp_avx512(__m512 x) {
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_LT_OQ);
  // min(89, x) returns x when x is NaN (MINPS returns its second operand then); 89 -> +inf
  const __m512 xc = _mm512_min_ps(_mm512_set1_ps(89.f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  return _mm512_maskz_scalef_ps(static_cast<__mmask16>(~tiny), exp_poly_avx512(r), n);  // NaN stays NaN
}

LATHE_EXP256 inline __m256 exp_avx2(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f), hi = _mm256_set1_ps(88.72283f);
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);  // NaN -> lo; restored below
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 7; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[i]));
  // 2^n as two normal powers of two (n in [-126, 128]: one factor alone may not be normal)
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
  y = _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), y);                                   // tiny -> 0
  y = _mm256_blendv_ps(y, _mm256_set1_ps(__builtin_inff()), _mm256_cmp_ps(x, hi, _CMP_GT_OQ));  // big -> inf
  return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));                           // NaN -> NaN
}

// erf by Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7).
LATHE_T512 inline __m512 erf_avx512(__m512 x) {
  const __m512 ax = _mm512_abs_ps(x);
  const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.f),
                                 _mm512_fmadd_ps(ax, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.f)));
  __m512 p = _mm512_set1_ps(1.061405429f);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
  p = _mm512_mul_ps(p, t);
  const __m512 e = exp_avx512(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), ax), ax));
  const __m512 y = _mm512_fnmadd_ps(p, e, _mm512_set1_ps(1.f));  // 1 - p * e
  // copy the sign of x onto y
  const __m512i sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x80000000));
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(y), sign));
}

// act: 0 none, 1 GELU (erf form, as BERT uses), 2 SiLU.
LATHE_T512 inline __m512 act_avx512(__m512 v, int act) {
  if (act == 1) {
    const __m512 e = erf_avx512(_mm512_mul_ps(v, _mm512_set1_ps(0.70710678118654752f)));
    return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), v), _mm512_add_ps(_mm512_set1_ps(1.f), e));
  }
  if (act == 2) {
    const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), v));
    return _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.f), e));
  }
  return v;
}

}  // namespace lathe
