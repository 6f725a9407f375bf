// W8A16 linear on the CPU: y[M, N] = x[M, K] @ W^T + bias, W in lathe's int8 weight-only
// format (lathe.compress.formats.Int8WeightOnly): qweight int8 [N, K], scales fp32 [N, G],
// W[n, k] = qweight[n, k] * scales[n, k / g]; g = 0 means per output channel (G = 1),
// otherwise g divides K and G = K / g. Activations fp32 or bf16 (dtype code 0 / 1); the
// output has x's dtype.
//
// The weights stay int8 in memory and are widened in registers (int8 -> int32 -> fp32) right
// before the FMA, so a decode step (M = 1..16) reads a quarter of the bytes an fp32 GEMM
// reads. Accumulation is fp32, one FMA chain per output column through each chunk of K (a
// group, or kChunk values per channel), and each chunk meets the output as
// y = fma(chunk_sum, scale, y): every row sums in the same order whatever M is or which tile
// it lands in, so a row gives the same bits alone or in a batch.
//
// Packed layout (built once at load time by w8a16_pack), NB = ceil(N/16) column blocks,
// one uint8 buffer of w8a16_packed_bytes(N, K, g):
//   codes  int8 [NB][K][16]: codes[nb][k][c] = qweight[16nb + c, k] (0 past N). A block's
//          whole K range is one contiguous stream; each k is one 16-byte VPMOVSXBD operand.
//   scales fp32 [NB][G][16] at byte offset w8a16_scale_offset(N, K) (64-aligned):
//          scales[nb][gi][c] = scale[16nb + c, gi] (0 past N).
// Bodies: AVX-512 (16 columns a vector), AVX2 (8), scalar; picked by lathe::active_isa().
#pragma once
#include <cstdint>

namespace lathe {

int64_t w8a16_scale_offset(int64_t N, int64_t K);           // bytes before the scales
int64_t w8a16_packed_bytes(int64_t N, int64_t K, int64_t g);  // the whole packed buffer

// qweight int8 [N, >= K] row stride ldq; scales fp32 [N, >= G] row stride lds.
void w8a16_pack(const int8_t* qweight, int64_t ldq, const float* scales, int64_t lds, int64_t N,
                int64_t K, int64_t g, uint8_t* packed);

// x [M, K] (dtype 0 fp32, 1 bf16) row stride ldx (elements); out [M, N] in the same dtype,
// row stride ldo; bias fp32 [N] or null.
void w8a16_linear(const void* x, int dtype, int64_t M, int64_t K, int64_t ldx,
                  const uint8_t* packed, int64_t N, int64_t g, const float* bias, void* out,
                  int64_t ldo, int nthreads);

}  // namespace lathe
