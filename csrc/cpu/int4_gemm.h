// W4A16 linear on the CPU: y[M, N] = x[M, K] @ W^T + bias, W in lathe's int4 format
// (lathe.compress.formats.Int4Group): qweight uint8 [N, ceil(K/2)], low nibble = even k;
// scales fp32 [N, G]; zeros uint8 [N, G] codes 0..15 (symmetric: 8); G = ceil(K/g),
// g in {32, 64, 128}; W[n, k] = (code[n, k] - zero[n, k/g]) * scale[n, k/g].
// Activations fp32 or bf16 (dtype code 0 / 1); the output has x's dtype; fp32 accumulation.
//
// Two routes (mode):
//   0 INT8_ACT (default; onnxruntime MatMulNBits accuracy_level=4 does the same):
//     x is quantized on the fly per (row, group) to s8, symmetric: sx = amax/127,
//     q = round_half_even(x * (127/amax)). VPDPBUSD multiplies the u8 weight codes (0..15)
//     by the s8 codes, exactly, in int32; per group
//       y += (sw * sx) * sum_k code*q  -  (zero * sw) * (sx * sum_k q)
//     so the zero point costs one FMA per group with the per-(row, group) sum of q, which
//     the activation quantization produces; no per-group weight sums need storing.
//     Extra error: only the activation rounding, |dx| <= sx/2 per element (relative noise
//     about -45 dB for Gaussian-like rows at g = 32, -43 dB at g = 128).
//   1 EXACT_FP32: weight tiles are dequantized to fp32 exactly as the reference does
//     ((code - zero) * scale, one rounding) into a cache-resident panel and an FMA
//     micro-kernel multiplies them with the fp32 activations. Same numerics class as
//     lathe.kernels.reference.linear_w4a16.
// Bodies: AVX-512 VNNI, AVX2 (VPMADDUBSW + VPMADDWD, exact: 2*15*127 cannot saturate),
// scalar; picked by lathe::active_isa(). All three give the same int32 sums and the same
// fp32 epilogue order in mode 0.
//
// Packed layout (built once at load time by int4_pack), with NB = ceil(N/16),
// Kp = G*g (K padded to whole groups), L = g/8 lines per group:
//   codes  uint8 [NB][G][L][64]: for column block nb, group gi, line j (k = gi*g + 8j ..
//          +8), byte 4*c + i (c = column in the block 0..15, i = 0..3) holds
//          code[16nb + c, k + i] in its low nibble and code[16nb + c, k + 4 + i] in its high
//          nibble. `v & 0x0F` and `(v >> 4) & 0x0F` are each one VPDPBUSD operand
//          (16 int32 lanes = 16 columns, 4 consecutive k per lane); each column block's
//          whole K range is one contiguous stream of Kp*8 bytes.
//   scales fp32  [NB][G][16]: scale[16nb + c, gi] at [nb][gi][c].
//   zeros  uint8 [NB][G][16]: zero point, same order (8 where none was given).
// Padding: columns n >= N get code 0, scale 0, zero 0; k in [K, Kp) gets code = zero point
// (W = 0) and the kernels feed zero activations there.
#pragma once
#include <cstdint>

namespace lathe {

// Element counts of the three packed arrays for (N, K, g): codes bytes, scales floats, zeros bytes.
int64_t int4_packed_code_bytes(int64_t N, int64_t K, int64_t g);
int64_t int4_packed_scale_count(int64_t N, int64_t K, int64_t g);  // also the zeros' count

// qweight uint8 [N, >= ceil(K/2)] row stride ldq; scales fp32 [N, >= G] row stride lds;
// zeros uint8 [N, >= G] row stride ldz, or null for symmetric (zero 8). Zero codes must be
// 0..15 (checked).
void int4_pack(const uint8_t* qweight, int64_t ldq, const float* scales, int64_t lds,
               const uint8_t* zeros, int64_t ldz, int64_t N, int64_t K, int64_t g,
               uint8_t* p_codes, float* p_scales, uint8_t* p_zeros);

// x [M, K] (dtype 0 fp32, 1 bf16) row stride ldx (elements); out [M, N] in the same dtype,
// row stride ldo; bias fp32 [N] or null; mode 0 INT8_ACT, 1 EXACT_FP32.
void int4_linear(const void* x, int dtype, int64_t M, int64_t K, int64_t ldx,
                 const uint8_t* p_codes, const float* p_scales, const uint8_t* p_zeros,
                 int64_t N, int64_t g, const float* bias, void* out, int64_t ldo, int mode,
                 int nthreads);

}  // namespace lathe
