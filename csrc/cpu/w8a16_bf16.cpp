// W8A16, bf16 activations, AVX512-BF16 body (see w8a16_bf16.h): int8 codes widened into the
// bf16 pair panel of bf16_panel_gemm.h, which does the rest.
#include "cpu/w8a16_bf16.h"

#include "cpu/bf16_panel_gemm.h"
#include "cpu/isa.h"
#include "cpu/w8a16_gemm.h"

namespace lathe {
namespace {

using bf16p::kCols;
constexpr int64_t kChunk = 128;  // per-channel scales: K values summed apart

// Codes of blocks nb0..nb0+nv ([NB][K][16] int8), k in [kb, ke), as bf16 pairs.
struct WidenInt8 {
  const int8_t* codes;
  int64_t K;
  LATHE_TBF16 void operator()(int64_t nb0, int nv, int64_t kb, int64_t ke, uint16_t* panel) const {
    const int64_t np = bf16p::ceil_div(ke - kb, 2);
    for (int v = 0; v < nv; ++v) {
      const int8_t* blk = codes + (nb0 + v) * K * kCols;
      for (int64_t kp = 0; kp < np; ++kp) {
        const int64_t k = kb + 2 * kp;
        const __m128i r0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + k * kCols));
        const __m128i r1 = k + 1 < ke ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + (k + 1) * kCols))
                                      : _mm_setzero_si128();
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_unpacklo_epi8(r0, r1)));  // columns 0-7
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_unpackhi_epi8(r0, r1)));  // columns 8-15
        _mm512_storeu_si512(panel + (kp * nv + v) * 32, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
      }
    }
  }
};

}  // namespace

bool w8a16_bf16_linear(const uint16_t* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* packed, int64_t N,
                       int64_t g, const float* bias, uint16_t* out, int64_t ldo, int nthreads) {
  if (static_cast<int>(active_level()) < static_cast<int>(Isa::Avx512Bf16) || (g & 1) || M < kW8Bf16MinM)
    return false;
  const bf16p::W w{reinterpret_cast<const float*>(packed + w8a16_scale_offset(N, K)), N, K, g, g ? K / g : 1,
                   bf16p::ceil_div(N, kCols), g ? g : kChunk};
  bf16p::gemm(x, M, ldx, w, WidenInt8{reinterpret_cast<const int8_t*>(packed), K}, bias, out, ldo,
              std::max(1, nthreads));
  return true;
}

}  // namespace lathe
