// Vector math for kernel epilogues (exp, erf, GELU, SiLU) and the target attributes that let
// one translation unit hold bodies for several ISAs without -march flags.
#pragma once
#include <immintrin.h>

#define LATHE_T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")))
#define LATHE_T256 __attribute__((target("avx2,fma")))

namespace lathe {

// exp(x) = 2^n * 2^f, f in [-0.5, 0.5]; degree-7 Taylor of 2^f: relative error < 1e-8.
LATHE_T512 inline __m512 exp_avx512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.525273380e-5f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.540353039e-4f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.333355815e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129108e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265070e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471806e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
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
