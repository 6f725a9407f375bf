// ConvChain (see conv_chain.h).
#include "cpu/conv_chain.h"

#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <new>
#include <exception>
#include <string>

#include "cpu/isa.h"
#include "cpu/task_pool.h"

namespace lathe {
namespace {

inline int64_t c4(int64_t c) { return (c + 3) / 4 * 4; }
inline int64_t align64(int64_t n) { return (n + 63) / 64 * 64; }

// (pad_before, out) along one axis: TF "same" (pad < 0; the extra pixel after) or symmetric.
void axis(int64_t size, int64_t k, int64_t s, int64_t pad, int64_t* before, int64_t* out) {
  if (pad < 0) {
    *out = (size + s - 1) / s;
    *before = std::max<int64_t>((*out - 1) * s + k - size, 0) / 2;
  } else {
    *before = pad;
    const int64_t span = size + 2 * pad - k;
    *out = span >= 0 ? span / s + 1 : 0;
  }
}

}  // namespace

Arena::~Arena() { std::free(p_); }

void Arena::reserve(int64_t bytes) {
  if (bytes <= n_) return;
  constexpr int64_t kHuge = int64_t{2} << 20;
  const int64_t n = (bytes + kHuge - 1) / kHuge * kHuge;
  void* p = std::aligned_alloc(kHuge, static_cast<size_t>(n));
  if (!p) throw std::bad_alloc();
  (void)madvise(p, static_cast<size_t>(n), MADV_HUGEPAGE);  // advice only: fine where refused
  std::free(p_);
  p_ = static_cast<uint8_t*>(p), n_ = n;
}

ConvChain::ConvChain(int64_t in_channels, float in_scale, int32_t in_zp)
    : in_c_(in_channels), in_scale_(in_scale), in_zp_(in_zp) {
  check(in_channels > 0 && in_scale > 0 && in_zp >= 0 && in_zp <= 255, "conv chain: bad input quantization");
}

void ConvChain::add(const ChainLayer& l) {
  const int i = static_cast<int>(layers_.size());
  const std::string who = "conv chain layer " + std::to_string(i) + ": ";
  if (l.fpacked) {
    check(i == 0 && l.src == -1 && l.res == -1 && !l.depthwise && l.out_scale > 0,
          who + "an fp32 layer must be the first, read the images and write u8 codes");
  } else {
    check(l.packed && l.wsum && l.w_scale, who + "null pointer");
    check(l.src >= 0 || layers_.empty() || !layers_[0].fpacked,
          who + "reads the images, which the fp32 first layer reads in fp32 (no codes of them exist)");
  }
  check(l.src >= -1 && l.src < i && l.res >= -1 && l.res < i, who + "its inputs must come before it");
  const int64_t cin = l.src < 0 ? in_c_ : layers_[l.src].N;
  check(cin == l.C, who + "takes " + std::to_string(l.C) + " channels, its producer gives " + std::to_string(cin));
  check(!l.depthwise || l.N == l.C, who + "depthwise needs as many outputs as inputs");
  check(l.src < 0 || layers_[l.src].out_scale > 0, who + "its producer has no u8 output");
  if (l.res >= 0) {
    check(!l.depthwise && layers_[l.res].out_scale > 0 && layers_[l.res].N == l.N,
          who + "the residual must be a u8 output with as many channels");
  }
  check(l.kh >= 1 && l.kw >= 1 && l.kh <= 8 && l.kw <= 8 && l.stride >= 1 && l.pad >= -1, who + "bad geometry");
  if (!layers_.empty()) check(layers_.back().out_scale > 0, who + "only the last layer may have an fp32 output");
  layers_.push_back(l);
  key_B_ = -1;
}

std::vector<ConvChain::Geo> ConvChain::geometry(int64_t H, int64_t W) const {
  std::vector<Geo> g(layers_.size());
  for (size_t i = 0; i < layers_.size(); ++i) {
    const ChainLayer& l = layers_[i];
    Geo& o = g[i];
    o.H = l.src < 0 ? H : g[l.src].OH;
    o.W = l.src < 0 ? W : g[l.src].OW;
    axis(o.H, l.kh, l.stride, l.pad, &o.pt, &o.OH);
    axis(o.W, l.kw, l.stride, l.pad, &o.pl, &o.OW);
    check(o.OH >= 1 && o.OW >= 1, "conv chain layer " + std::to_string(i) + ": the image (" + std::to_string(H) +
                                      "x" + std::to_string(W) + ") is too small for it");
    if (l.res >= 0)
      check(g[l.res].OH == o.OH && g[l.res].OW == o.OW,
            "conv chain layer " + std::to_string(i) + ": residual spatial size differs");
  }
  return g;
}

std::vector<int64_t> ConvChain::out_shape(int64_t H, int64_t W) const {
  check(!layers_.empty(), "conv chain: no layers");
  const Geo g = geometry(H, W).back();
  const ChainLayer& l = layers_.back();
  return {g.OH, g.OW, l.out_scale > 0 ? c4(l.N) : l.N, l.out_scale > 0 ? 1 : 0};
}

// Arena slots by liveness: a buffer is free again after its last consumer ran.
void ConvChain::plan(int64_t B, int64_t H, int64_t W) {
  if (B == key_B_ && H == key_H_ && W == key_W_) return;
  geo_ = geometry(H, W);
  const int L = static_cast<int>(layers_.size());
  std::vector<int64_t> bytes(L + 1, 0);  // 0: the images' codes, i + 1: layer i (the last writes `out`)
  bytes[0] = layers_[0].fpacked ? 0 : B * H * W * c4(in_c_);
  for (int i = 0; i + 1 < L; ++i) bytes[i + 1] = B * geo_[i].OH * geo_[i].OW * c4(layers_[i].N);
  std::vector<int> last(L + 1, -1);
  for (int i = 0; i < L; ++i) {
    last[layers_[i].src + 1] = std::max(last[layers_[i].src + 1], i);
    if (layers_[i].res >= 0) last[layers_[i].res + 1] = std::max(last[layers_[i].res + 1], i);
  }
  std::vector<int64_t> slot_size;
  std::vector<int> slot_of(L + 1, -1), free_slots;
  auto take = [&](int buf) {
    int s;
    if (free_slots.empty()) {
      s = static_cast<int>(slot_size.size());
      slot_size.push_back(0);
    } else {  // the free slot closest in size (fewest bytes grown)
      auto best = std::min_element(free_slots.begin(), free_slots.end(), [&](int x, int y) {
        return std::abs(slot_size[x] - bytes[buf]) < std::abs(slot_size[y] - bytes[buf]);
      });
      s = *best;
      free_slots.erase(best);
    }
    slot_size[s] = std::max(slot_size[s], align64(bytes[buf]));
    slot_of[buf] = s;
  };
  take(0);
  for (int i = 0; i < L; ++i) {
    if (i + 1 < L) take(i + 1);
    for (int b = 0; b <= i; ++b)  // buffers whose last consumer is layer i
      if (slot_of[b] >= 0 && last[b] == i) free_slots.push_back(slot_of[b]);
  }
  std::vector<int64_t> slot_off(slot_size.size(), 0);
  int64_t total = 0;
  for (size_t s = 0; s < slot_size.size(); ++s) slot_off[s] = total, total += slot_size[s];
  off_.assign(L + 1, 0);
  for (int b = 0; b <= L; ++b)
    if (slot_of[b] >= 0) off_[b] = slot_off[slot_of[b]];
  arena_.reserve(total + 64);  // + 64: vector over-reads
  key_B_ = B, key_H_ = H, key_W_ = W;
}

void ConvChain::run(const float* x, const uint8_t* codes, int64_t B, int64_t H, int64_t W, void* out, uint8_t* bad,
                     int nthreads) {
  check((x || codes) && out && bad && !layers_.empty(), "conv chain: null pointer or no layers");
  check(x || !layers_[0].fpacked, "conv chain: its fp32 first layer needs the fp32 images, not codes");
  check(B >= 0 && H > 0 && W > 0, "conv chain: bad image shape");
  if (B == 0) return;
  std::lock_guard<std::mutex> lock(mu_);
  plan(B, H, W);
  nthreads = std::max(1, nthreads);
  uint8_t* base = arena_.data();  // 2 MiB-aligned
  // The calling thread runs the layers; the OpenMP team's other threads claim chunks of each
  // layer's loop through the pool (TaskPool::host): no threads of the chain's own.
  if (profile_ && prof_ns_.size() != layers_.size() + 1) profile_reset();
  using clock = std::chrono::steady_clock;
  auto lap = [&](clock::time_point* t, size_t slot) {
    if (!profile_) return;
    const clock::time_point now = clock::now();
    prof_ns_[slot] += std::chrono::duration_cast<std::chrono::nanoseconds>(now - *t).count();
    *t = now;
  };
  auto body = [&] {
    clock::time_point t = profile_ ? clock::now() : clock::time_point{};
    const uint8_t* in = codes;
    if (codes) {
      std::fill(bad, bad + B, uint8_t{0});
    } else if (!layers_[0].fpacked) {
      quantize_nchw_u8(x, B, in_c_, H, W, in_scale_, in_zp_, base + off_[0], c4(in_c_), nthreads, bad);
      in = base + off_[0];
    }
    lap(&t, 0);
    const int L = static_cast<int>(layers_.size());
    for (int i = 0; i < L; ++i) {
      const ChainLayer& l = layers_[i];
      const Geo& g = geo_[i];
      if (l.fpacked) {  // the fp32 first layer: images in, u8 codes out, bad images flagged
        ConvF32Args f;
        f.x = x, f.B = B, f.C = l.C, f.H = g.H, f.W = g.W, f.kh = l.kh, f.kw = l.kw, f.stride = l.stride;
        f.pad_t = g.pt, f.pad_l = g.pl, f.OH = g.OH, f.OW = g.OW, f.packed = l.fpacked, f.bias = l.bias;
        f.N = l.N, f.act = l.act, f.out_scale = l.out_scale, f.out_zp = l.out_zp;
        f.out = i + 1 == L ? static_cast<uint8_t*>(out) : base + off_[i + 1], f.ldo = c4(l.N);
        f.bad = bad, f.nthreads = nthreads;
        conv_f32_u8(f);
        lap(&t, i + 1);
        continue;
      }
      ConvArgs a;
      a.x = l.src < 0 ? in : base + off_[l.src + 1];
      a.B = B, a.H = g.H, a.W = g.W, a.C = l.C, a.ldc = c4(l.C);
      a.x_scale = l.src < 0 ? in_scale_ : layers_[l.src].out_scale;
      a.x_zp = l.src < 0 ? in_zp_ : layers_[l.src].out_zp;
      a.kh = l.kh, a.kw = l.kw, a.stride = l.stride, a.pad_t = g.pt, a.pad_l = g.pl, a.OH = g.OH, a.OW = g.OW;
      a.packed = l.packed, a.wsum = l.wsum, a.w_scale = l.w_scale, a.bias = l.bias, a.N = l.N;
      if (l.res >= 0) {
        a.res = base + off_[l.res + 1], a.ld_res = c4(l.N);
        a.res_scale = layers_[l.res].out_scale, a.res_zp = layers_[l.res].out_zp;
      }
      a.act = l.act, a.out_u8 = l.out_scale > 0, a.out_scale = l.out_scale > 0 ? l.out_scale : 1.f;
      a.out_zp = l.out_zp;
      a.out = i + 1 == L ? out : static_cast<void*>(base + off_[i + 1]);
      a.ldo = l.out_scale > 0 ? c4(l.N) : l.N;
      a.nthreads = nthreads;
      if (l.depthwise) dwconv_int8(a);
      else conv2d_int8(a);
      lap(&t, i + 1);
    }
  };
  if (nthreads == 1) {
    body();
    return;
  }
  // More runnable threads than cores (a shared machine): a worker preempted in the middle of its
  // chunk stalls the whole layer. When the waits for workers ate a quarter of a run, the next
  // runs go on one thread, then the workers are tried again.
  if (solo_runs_ > 0) {
    --solo_runs_;
    nthreads = 1;
    body();
    return;
  }
  if (!pool_) pool_ = std::make_unique<TaskPool>();
  pool_->take_wait_ns();
  const auto t0 = std::chrono::steady_clock::now();
  pool_->host(nthreads, body);
  const int64_t total =
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
  if (solo_fallback_ && pool_->take_wait_ns() * 4 > total) solo_runs_ = 8;
}

}  // namespace lathe
