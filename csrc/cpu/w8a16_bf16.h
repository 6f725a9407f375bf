// W8A16 with bf16 activations on AVX512-BF16 (VDPBF16PS), on w8a16_pack's layout.
//
// The int8 codes are exact in bf16 (|q| <= 127 needs 7 significant bits, bf16 has 8) and so are
// the bf16 activations, so every product is exact in fp32, as in the fp32 body; the sums are
// fp32 (VDPBF16PS adds the two products of a k pair one after the other, flushing denormals),
// per chunk (a group, or 128 values per channel), then y = fma(chunk_sum, scale, y), + bias.
// Each task widens a K block of its column group's codes once into a bf16 panel in VDPBF16PS
// operand order (pairs (k, k+1) per column), which all its rows' tiles read. Every row sums in
// the same order whatever M is, so a row gives the same bits alone or in a batch.
#pragma once
#include <cstdint>

namespace lathe {

// x bf16 [M, K] (row stride ldx), out bf16 [M, N] (row stride ldo), bias fp32 [N] or null;
// packed/N/K/g as w8a16_linear (already checked by it). Returns false without touching
// anything when this body does not apply: the active level is below avx512_bf16, or the group
// size is odd.
bool w8a16_bf16_linear(const uint16_t* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* packed, int64_t N,
                       int64_t g, const float* bias, uint16_t* out, int64_t ldo, int nthreads);

}  // namespace lathe
