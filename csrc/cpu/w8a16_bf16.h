// W8A16 with bf16 activations on AVX512-BF16 (VDPBF16PS), on w8a16_pack's layout.
//
// The int8 codes are exact in bf16 (|q| <= 127 needs 7 significant bits, bf16 has 8) and so are
// the bf16 activations, so every product is exact in fp32, as in the fp32 body; the sums are
// fp32 (VDPBF16PS adds the two products of a k pair one after the other, flushing denormals),
// per chunk (a group, or 128 values per channel), then y = fma(chunk_sum, scale, y), + bias.
// Each task widens a K block of its column group's codes once into a bf16 panel in VDPBF16PS
// operand order (pairs (k, k+1) per column), which all its rows' tiles read. Every row sums in
// the same order whatever M is (M >= kW8Bf16MinM), so a row gives the same bits in any batch
// this body takes.
//
// Fewer than kW8Bf16MinM rows (decode) stay on the fp32 body: with no rows to share the panel,
// widening int8 to bf16 pairs costs more than widening to fp32 (measured on an AVX512-BF16 EPYC,
// 1 thread: M = 1 ran at 0.6x the fp32 body, M = 16 at 1.4x, M >= 128 at 1.5-2x). Both are
// within the reference's tolerance, but a bf16 row's bits at M < 4 and at M >= 4 differ.
#pragma once
#include <cstdint>

namespace lathe {

// x bf16 [M, K] (row stride ldx), out bf16 [M, N] (row stride ldo), bias fp32 [N] or null;
// packed/N/K/g as w8a16_linear (already checked by it). Returns false without touching
// anything when this body does not apply: the active level is below avx512_bf16, M is below
// kW8Bf16MinM, or the group size is odd.
constexpr int64_t kW8Bf16MinM = 4;
bool w8a16_bf16_linear(const uint16_t* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* packed, int64_t N,
                       int64_t g, const float* bias, uint16_t* out, int64_t ldo, int nthreads);

}  // namespace lathe
