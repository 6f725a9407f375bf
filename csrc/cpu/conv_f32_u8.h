// A dense convolution in fp32 that writes u8 codes: a network's first layer kept in fp32 (it
// reads the images, whose 8-bit quantization costs the most accuracy) feeding int8 layers.
//
// x: fp32 NCHW [B, C, H, W] (the images as they come); weights fp32 in conv_f32_u8_pack's layout;
// per output channel n, in this order and without fused multiply-adds:
//   y = bias[n]; for c, ky, kx: y = y + x[c, ih, iw] * w[n, c, ky, kx]   (taps in the padding skipped)
//   q = clamp(round_half_even(min(max(y * inv_out_scale, -2^20), 2^20)) + out_zp, lo, hi)
// with the activation folded into [lo, hi] as in conv_int8.h (relu: lo = out_zp; relu6: also
// hi = out_zp + round(6 / out_scale)); a NaN y gives lo. kernels/conv_ops.py's reference does
// the same operations in the same order, so every path matches it code for code.
// out: u8 NHWC [B, OH, OW, ldo] (ldo >= N rounded up to 4; channels N..ldo get out_zp).
// bad (optional, u8 [B]): 1 for the images whose outputs were not all finite (a NaN or Inf in).
#pragma once
#include <cstdint>

namespace lathe {

struct ConvF32Args {
  const float* x = nullptr;
  int64_t B = 0, C = 0, H = 0, W = 0;
  int64_t kh = 1, kw = 1, stride = 1, pad_t = 0, pad_l = 0, OH = 0, OW = 0;
  const float* packed = nullptr;  // conv_f32_u8_pack's layout
  const float* bias = nullptr;    // [N] or null
  int64_t N = 0;
  int act = 0;  // 0 none, 1 relu, 2 relu6
  float out_scale = 1.f;
  int32_t out_zp = 0;
  uint8_t* out = nullptr;
  int64_t ldo = 0;
  uint8_t* bad = nullptr;
  int nthreads = 1;
};

// fp32 OIHW [N, C, kh, kw] -> [C * kh * kw taps][N rounded up to 16] (zeros past N).
int64_t conv_f32_u8_packed_floats(int64_t N, int64_t C, int64_t kh, int64_t kw);
void conv_f32_u8_pack(const float* w, int64_t N, int64_t C, int64_t kh, int64_t kw, float* packed);
void conv_f32_u8(const ConvF32Args& a);

}  // namespace lathe
