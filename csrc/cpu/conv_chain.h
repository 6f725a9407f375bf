// A chain of int8 convolutions (csrc/cpu/conv_int8.h) run in one call: the fp32 NCHW images are
// quantized to u8 NHWC, then each layer reads its producer's u8 output (and, optionally, an
// earlier layer's as the residual) and the last layer writes the caller's buffer. The
// intermediate activations live in one arena kept between calls (reused by liveness, resized
// when the batch or image size grows): no per-layer allocation, page faults or Python.
#pragma once
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "cpu/conv_f32_u8.h"
#include "cpu/conv_int8.h"
#include "cpu/task_pool.h"

namespace lathe {

// The chain's activation arena: 2 MiB-aligned and advised as transparent huge pages, so a batch's
// tens of MB of activations cost few TLB misses and every run sees the same cache-set layout
// (a plain vector's base address changes which buffers alias from one process to the next).
class Arena {
 public:
  Arena() = default;
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  ~Arena();
  void reserve(int64_t bytes);  // grows (contents not kept)
  uint8_t* data() const { return p_; }
  int64_t size() const { return n_; }

 private:
  uint8_t* p_ = nullptr;
  int64_t n_ = 0;
};

struct ChainLayer {
  int depthwise = 0;
  int64_t C = 0, N = 0, kh = 1, kw = 1, stride = 1;
  int64_t pad = -1;                 // -1: TF "same"; else symmetric
  const int8_t* packed = nullptr;   // the layer's kernel layout (conv2d_int8_pack / dwconv_int8_pack)
  const int32_t* wsum = nullptr;
  const float* w_scale = nullptr;
  const float* bias = nullptr;
  const float* fpacked = nullptr;   // non-null: an fp32 first layer on the fp32 images (conv_f32_u8_pack)
  int src = -1;                     // producer layer, -1: the images
  int res = -1;                     // residual producer layer, -1: none
  int act = 0;
  float out_scale = 0.f;            // 0: fp32 output (the last layer only)
  int32_t out_zp = 0;
};

class ConvChain {
 public:
  ConvChain(int64_t in_channels, float in_scale, int32_t in_zp);
  void add(const ChainLayer& l);  // checked against the layers before it
  // (OH, OW, channel stride, is_u8) of the last layer for B images of H x W.
  std::vector<int64_t> out_shape(int64_t H, int64_t W) const;
  // x: fp32 NCHW [B, in_channels, H, W]; out: the last layer's u8 [B, OH, OW, N4] or fp32 [B, OH, OW, N];
  // bad: u8 [B], 1 for the images that held a NaN or Inf. codes (x null): the input already as u8
  // NHWC [B, H, W, in_channels rounded up to 4] codes at (in_scale, in_zp), e.g. written by an fp32
  // first layer; bad is then all 0 (the caller knows its own).
  void run(const float* x, const uint8_t* codes, int64_t B, int64_t H, int64_t W, void* out, uint8_t* bad,
           int nthreads);
  int64_t arena_bytes() const { return arena_.size(); }
  // Per-layer wall time: off by default (a clock read a layer); on, each run adds each layer's
  // nanoseconds (index 0: the images' quantization, i + 1: layer i) until profile_reset().
  void set_profile(bool on) { profile_ = on; }
  std::vector<int64_t> profile_ns() const { return prof_ns_; }
  void profile_reset() { prof_ns_.assign(layers_.size() + 1, 0); }
  void set_solo_fallback(bool on) { solo_fallback_ = on, solo_runs_ = 0; }
  int solo_runs() const { return solo_runs_; }

 private:
  struct Geo {
    int64_t H, W, OH, OW, pt, pl;
  };
  std::vector<Geo> geometry(int64_t H, int64_t W) const;
  void plan(int64_t B, int64_t H, int64_t W);

  int64_t in_c_;
  float in_scale_;
  int32_t in_zp_;
  std::vector<ChainLayer> layers_;
  std::mutex mu_;  // one run at a time: the arena is shared
  int64_t key_B_ = -1, key_H_ = -1, key_W_ = -1;
  std::vector<Geo> geo_;
  std::vector<int64_t> off_;  // arena offset of the images' codes (0) and of each layer's output (1..)
  Arena arena_;
  std::unique_ptr<TaskPool> pool_;  // the layers' chunks, served by the OpenMP team (TaskPool::host)
  int solo_runs_ = 0;
  bool solo_fallback_ = true;
  bool profile_ = false;
  std::vector<int64_t> prof_ns_;  // runs left on one thread after the workers stalled the last parallel one
};

}  // namespace lathe
