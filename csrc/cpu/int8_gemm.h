// W8A8 linear on the CPU: y = dequant(quant_per_token(x) @ Wq^T) * scales + bias.
// Activations are quantized per token to u8 codes with a zero point: symmetric (zp = 128,
// s = amax/127) or asymmetric (s = (max - min)/255 over a range that includes 0).
//
// Weight layout (packed once at load time by int8_pack_weight):
//   packed int8 [NB][KB][16][4] with NB = ceil(N/16), KB = ceil(K/4), zero padded:
//   one 64-byte line holds 4 consecutive k for 16 consecutive output channels, which is
//   exactly one VPDPBUSD operand. colsum int32 [NB*16] holds sum_k W[n,k] so the kernel
//   can feed u8 codes q and subtract zp * colsum afterwards: sum (q - zp) w.
#pragma once
#include <cstdint>

namespace lathe {

int64_t int8_packed_bytes(int64_t N, int64_t K);
int64_t int8_packed_cols(int64_t N);  // NB * 16: the length of colsum

// w: int8 [N, K] row-major (nn.Linear layout), row stride ldw.
void int8_pack_weight(const int8_t* w, int64_t N, int64_t K, int64_t ldw, int8_t* packed,
                      int32_t* colsum);

// x: fp32 [M, K] with row stride ldx. out: fp32 [M, N] with row stride ldo.
// smooth: fp32 [K] or null; x is quantized as x * smooth (SmoothQuant's 1/s, fused here).
// w_scale: fp32 [N] per output channel. bias: fp32 [N] or null. act: 0 none, 1 gelu(erf), 2 silu.
void int8_linear(const float* x, const float* smooth, int64_t M, int64_t K, int64_t ldx, const int8_t* packed,
                 const int32_t* colsum, const float* w_scale, const float* bias, int64_t N,
                 float* out, int64_t ldo, int act, int asym, int nthreads);

// Per-token quantization, exposed for tests: q u8 [M, K], scale fp32 [M], zp int32 [M].
void quantize_rows_u8(const float* x, int64_t M, int64_t K, int64_t ldx, uint8_t* q,
                      float* scale, int32_t* zp, int asym, int nthreads);

// The machine's int8 peak (GOP/s) from a VPDPBUSD loop with no memory traffic.
double vnni_peak_gops(int nthreads);

}  // namespace lathe
