// bf16 attention with AVX512-BF16 dot products (VDPBF16PS): the prefill body that
// attention_fwd hands bf16 problems to when lathe::active_level() >= Isa::Avx512Bf16.
//
// Numerics: q.k is summed in fp32 from exact bf16 x bf16 products (VDPBF16PS); the online
// softmax runs in fp32; the probabilities are rounded to bf16 for the P.V product (as torch's
// CPU flash attention and flash-attn do), whose sums are fp32; the row sum l is the fp32 sum of
// the unrounded probabilities. A NaN anywhere in a row's visible scores or values gives NaN.
#pragma once

#include "cpu/attention.h"

namespace lathe {

// Runs the problem (already validated by attention_fwd, dtype bf16) and returns true, or
// returns false without touching anything when this body does not take it: the active level
// is below avx512_bf16, or there are fewer than 16 query rows per head (decode: the generic
// body reads K/V in place instead of packing them), or the head dim exceeds 512.
bool attention_bf16_fwd(const AttentionArgs& a, int nthreads);

}  // namespace lathe
