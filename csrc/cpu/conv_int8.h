// int8 convolutions on NHWC u8 activations with static per-tensor (scale, zero point)
// quantization and symmetric per-output-channel int8 weights (BatchNorm folded in).
//
// Activations: u8 [B, H, W, ldc] (ldc >= C, ldc % 4 == 0; real value = (q - zp) * scale).
// With acc[n] = sum (q - x_zp) * w (exact) and s[n] = x_scale * w_scale[n] (fp32):
//   u8 out:   t = float(acc + bq[n]) * (s[n] * (1 / out_scale)) (+ float(res - res_zp) * (res_scale / out_scale)),
//             q = clamp(round_half_even(t) + out_zp, lo, hi) with bq[n] = round(bias[n] / s[n]) (int32, as in
//             ONNX's QLinearConv) and the activation folded into [lo, hi] (relu: lo = out_zp; relu6: also
//             hi = out_zp + round(6 / out_scale)): int8 stays between layers;
//   fp32 out: y = float(acc) * s[n] + bias[n] (+ float(res - res_zp) * res_scale), then act (none/relu/relu6).
// kernels/conv_ops.py's reference does exactly these operations, so every path matches it bit for bit.
//
// conv2d_int8: dense convolutions (groups = 1) as an implicit GEMM over K = taps * C4
// (C4 = C rounded up to 4) on the int8_gemm packed weight layout: 1x1 stride 1 reads the
// activation rows directly; k x k reads its rows through per-pixel tap pointers (no im2col).
// dwconv_int8: depthwise kh x kw (groups = C), its own layout: on AVX-512 VNNI, 4 input rows of
// one column interleaved per VPDPBUSD group, each interleaved column reused by every output of
// the row that needs it; widened int32 multiply-adds on AVX2; plain loops on scalar.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

namespace lathe {

struct ConvArgs {
  const uint8_t* x = nullptr;
  int64_t B = 0, H = 0, W = 0, C = 0, ldc = 0;
  float x_scale = 1.f;
  int32_t x_zp = 0;
  int64_t kh = 1, kw = 1, stride = 1, pad_t = 0, pad_l = 0, OH = 0, OW = 0;
  const int8_t* packed = nullptr;   // conv2d: int8_gemm layout over K; dwconv: dw layout
  const int32_t* wsum = nullptr;    // per output channel sum of the weight codes
  const float* w_scale = nullptr;   // [N], > 0
  const float* bias = nullptr;      // [N] or null
  int64_t N = 0;                    // output channels
  const uint8_t* res = nullptr;     // u8 [B, OH, OW, ld_res] or null (conv2d only)
  int64_t ld_res = 0;
  float res_scale = 1.f;
  int32_t res_zp = 0;
  int act = 0;
  int out_u8 = 0;
  float out_scale = 1.f;
  int32_t out_zp = 0;
  void* out = nullptr;              // u8 or fp32 [B, OH, OW, ldo]
  int64_t ldo = 0;
  int nthreads = 1;
};

// |t| past this clamps to lo or hi anyway: keeps the float -> int32 conversion in range.
constexpr float kRequantBig = 1048576.f;

// The u8 clamp [lo, hi] with the activation folded in (act 1 relu: lo = zp; 2 relu6: also
// hi = zp + round(6 / out_scale), at most 255); inv = 1 / out_scale. Shared by every kernel that
// writes u8 codes, so their activations clamp alike.
inline void u8_act_bounds(int act, float inv, int32_t zp, int32_t* lo, int32_t* hi) {
  *lo = act >= 1 ? zp : 0;
  const float h = act == 2 ? std::min(255.f, static_cast<float>(zp) + std::nearbyint(6.f * inv)) : 255.f;
  *hi = std::max(*lo, static_cast<int32_t>(h));
}

// Dense weights int8 OHWI [N, kh, kw, C] -> int8_gemm layout over K = kh * kw * C4.
int64_t conv2d_int8_packed_bytes(int64_t N, int64_t kh, int64_t kw, int64_t C);
int64_t conv2d_int8_wsum_len(int64_t N);
void conv2d_int8_pack(const int8_t* w, int64_t N, int64_t kh, int64_t kw, int64_t C,
                      int8_t* packed, int32_t* wsum);
void conv2d_int8(const ConvArgs& a);

// Depthwise weights int8 [C, kh, kw] -> the dw layout (VNNI row groups, then a plain [taps][C64]).
int64_t dwconv_int8_packed_bytes(int64_t C, int64_t kh, int64_t kw);
void dwconv_int8_pack(const int8_t* w, int64_t C, int64_t kh, int64_t kw, int8_t* packed, int32_t* wsum);
void dwconv_int8(const ConvArgs& a);

// fp32 NCHW images -> u8 NHWC codes [B, H, W, ldc] in one pass (q = clamp(round(x * (1 / scale)) + zp);
// NaN -> zp); channels C..ldc get zp. bad (optional, u8 [B]): 1 for the images holding a NaN or Inf.
void quantize_nchw_u8(const float* x, int64_t B, int64_t C, int64_t H, int64_t W, float scale, int32_t zp,
                      uint8_t* out, int64_t ldc, int nthreads, uint8_t* bad = nullptr);

}  // namespace lathe
