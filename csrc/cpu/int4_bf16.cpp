// int4 x bf16 activations, AVX512-BF16 body (see int4_bf16.h): (code - zero) widened into the
// bf16 pair panel of bf16_panel_gemm.h, which does the rest.
#include "cpu/int4_bf16.h"

#include "cpu/bf16_panel_gemm.h"
#include "cpu/isa.h"

namespace lathe {
namespace {

using bf16p::kCols;
constexpr int kLine = 64;  // bytes per packed line: 16 columns x 8 k (int4_gemm.h)

// int4_pack's layout: line j of group gi of block nb holds k = gi*g + 8j + i (i < 4) in the low
// nibble of byte 4c + i and k + 4 in its high nibble, for column c. A k pair (k, k+1), k even,
// is one 32-bit lane per column: nibbles at bit shift sh and sh + 8 of the column's dword,
// sh = 8 (k % 4) + 4 ((k % 8) / 4). Codes past K are the zero point (weight 0).
struct WidenInt4 {
  const uint8_t* codes;
  const uint8_t* zeros;
  int64_t g, G, L;
  LATHE_TBF16 void operator()(int64_t nb0, int nv, int64_t kb, int64_t ke, uint16_t* panel) const {
    const int64_t np = bf16p::ceil_div(ke - kb, 2);
    const __m512i nib = _mm512_set1_epi32(0x0F), hi16 = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    for (int v = 0; v < nv; ++v) {
      const int64_t nb = nb0 + v;
      const uint8_t* blk = codes + nb * G * L * kLine;
      int64_t gi_cached = -1;
      __m512i z = _mm512_setzero_si512();
      for (int64_t kp = 0; kp < np; ++kp) {
        const int64_t k = kb + 2 * kp, gi = k / g, kk = k % g;
        if (gi != gi_cached) {
          z = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zeros + (nb * G + gi) * kCols)));
          gi_cached = gi;
        }
        const __m512i line = _mm512_loadu_si512(blk + (gi * L + kk / 8) * kLine);
        const int sh = static_cast<int>(8 * (kk % 4) + 4 * ((kk % 8) / 4));
        const __m512i a = _mm512_and_si512(_mm512_srl_epi32(line, _mm_cvtsi32_si128(sh)), nib);
        const __m512i b = _mm512_and_si512(_mm512_srl_epi32(line, _mm_cvtsi32_si128(sh + 8)), nib);
        // small integers: their fp32 bits' upper half is their exact bf16
        const __m512i fa = _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_sub_epi32(a, z)));
        const __m512i fb = _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_sub_epi32(b, z)));
        _mm512_storeu_si512(panel + (kp * nv + v) * 32,
                            _mm512_or_si512(_mm512_srli_epi32(fa, 16), _mm512_and_si512(fb, hi16)));
      }
    }
  }
};

}  // namespace

bool int4_bf16_linear(const uint16_t* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* p_codes,
                      const float* p_scales, const uint8_t* p_zeros, int64_t N, int64_t g, const float* bias,
                      uint16_t* out, int64_t ldo, int nthreads) {
  if (static_cast<int>(active_level()) < static_cast<int>(Isa::Avx512Bf16) || M < kI4Bf16MinM) return false;
  const int64_t G = bf16p::ceil_div(K, g);
  const bf16p::W w{p_scales, N, K, g, G, bf16p::ceil_div(N, kCols), g};
  bf16p::gemm(x, M, ldx, w, WidenInt4{p_codes, p_zeros, g, G, g / 8}, bias, out, ldo, std::max(1, nthreads));
  return true;
}

}  // namespace lathe
