// int4 weight-only linear with bf16 activations on AVX512-BF16 (VDPBF16PS): the EXACT_FP32
// route (mode 1) of int4_linear for bf16 inputs, on int4_pack's layout.
//
// (code - zero) is a small integer, exact in bf16, and so are the bf16 activations: every
// product is exact in fp32. Per group, s = fp32 sum of x (code - zero) (VDPBF16PS), then
// y = fma(s, scale, y), + bias (bf16_panel_gemm.h). The reference instead rounds each weight
// (code - zero) * scale to fp32 first; this order rounds once per group instead of once per
// weight, so it is at least as accurate.
#pragma once
#include <cstdint>

namespace lathe {

// Fewer rows (decode) stay on the fp32 body: with no rows to share the widened panel it costs
// more than it saves (as for W8A16, see w8a16_bf16.h).
constexpr int64_t kI4Bf16MinM = 4;

// x bf16 [M, K] (row stride ldx), out bf16 [M, N] (row stride ldo), bias fp32 [N] or null;
// the packed arrays and N/K/g as int4_linear (already checked by it). Returns false without
// touching anything when this body does not apply: the active level is below avx512_bf16, or
// M < kI4Bf16MinM.
bool int4_bf16_linear(const uint16_t* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* p_codes,
                      const float* p_scales, const uint8_t* p_zeros, int64_t N, int64_t g, const float* bias,
                      uint16_t* out, int64_t ldo, int nthreads);

}  // namespace lathe
