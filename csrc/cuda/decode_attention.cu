// Flash-decoding attention for one query per head against a KV cache.
//   q [B, Hq, D], k/v [B, Hkv, S, D] (contiguous, fp16 or bf16), Hq % Hkv == 0 (GQA / MQA),
//   seq_lens int32 [B] optional: keys at positions >= seq_lens[b] are ignored, a batch with no
//   key gives zeros. out [B, Hq, D] in the input dtype, softmax and accumulation in fp32.
//
// Design (split-K over the sequence)
//   * Kernel 1: block (split, kv head x head group, batch) owns a chunk of the keys of one KV
//     head and up to G = 8 of the query heads that share it, so each K/V byte is read once per
//     block whatever the GQA ratio. The chunk is walked in tiles; per tile all K and V loads
//     are issued first (L lanes x VEC elements per key, 16-byte loads), then
//       scores: each lane dots its slice with the G query slices, shuffle-reduced over L lanes;
//       online softmax: per head, tile max -> rescale factor alpha, p = exp2(s - m);
//       P.V: acc[h] = acc[h] * alpha + sum_k p[h, k] * v[k] in fp32 registers.
//     The chunk's (max, sum, unnormalized out) go to an fp32 workspace; if the whole sequence
//     fits one split, kernel 1 normalizes and writes the output itself.
//   * Kernel 2 (one block per (b, q head)) combines the splits in fp32: M = max m_s,
//     out = sum_s o_s 2^(m_s - M) / sum_s l_s 2^(m_s - M). Empty splits (l = 0) are skipped.
//   * Scores are kept in the log2 domain (q pre-scaled by scale * log2(e)) so exp is exp2f.
//   * The number of splits targets ~4 blocks per SM, so small batches still fill the GPU.
//
// Roofline (H100 SXM, 3.35 TB/s HBM3):
//   bytes = 2 * B*Hkv*S_eff*D * 2 (K and V, fp16/bf16) + 2*B*Hq*D*2 (q, out)
//           + splits*B*Hq*(D+2)*4*2 (fp32 partials, written then read; small vs the cache)
//   FLOPs = 4 * B*Hq*S_eff*D (q.k and p.v)  -> Hq/Hkv FLOP per byte of K/V: memory bound.
//   e.g. B = 1, Hq = 32, Hkv = 8, S = 4096, D = 128: K+V = 16.8 MB -> floor 5.0 us;
//   B = 32 with 4096 keys each: 537 MB -> 160 us.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cuda/device_util.cuh"
#include "cuda/launchers.h"

namespace lathe_cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kSteps = 4;  // key steps per tile; a tile's K/V loads are all in flight at once
constexpr int kMaxHeadsPerBlock = 8;
constexpr float kLog2e = 1.4426950408889634f;
constexpr unsigned kFull = 0xffffffffu;

// Per head dim: VEC elements per lane, L lanes per key (a power of two), KPW keys per warp
// step, KPB keys per block step, TILE keys per tile.
template <int D>
struct Cfg {
  static constexpr int VEC = D == 96 ? 6 : 8;
  static constexpr int L = D / VEC;
  static constexpr int KPW = 32 / L;
  static constexpr int KPB = KPW * kWarps;
  static constexpr int TILE = KPB * kSteps;
  static_assert(L * VEC == D && (L & (L - 1)) == 0 && L <= 32, "unsupported head dim");
};

template <class T>
struct Conv;
template <>
struct Conv<__half> {
  __device__ static float2 pair(uint32_t w) { return __half22float2(bits_as<__half2>(w)); }
  __device__ static __half from(float v) { return __float2half_rn(v); }
};
template <>
struct Conv<__nv_bfloat16> {
  __device__ static float2 pair(uint32_t w) {
    return __bfloat1622float2(bits_as<__nv_bfloat162>(w));
  }
  __device__ static __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

template <int VEC>
struct Pack {
  uint32_t w[VEC / 2];
};

template <int VEC>
__device__ __forceinline__ Pack<VEC> load_pack(const void* p) {
  Pack<VEC> r;
  if constexpr (VEC % 8 == 0) {  // 16-byte loads (rows are 16-byte aligned for D % 8 == 0)
#pragma unroll
    for (int i = 0; i < VEC / 8; ++i) {
      const uint4 u = __ldg(static_cast<const uint4*>(p) + i);
      r.w[4 * i] = u.x;
      r.w[4 * i + 1] = u.y;
      r.w[4 * i + 2] = u.z;
      r.w[4 * i + 3] = u.w;
    }
  } else {  // D = 96: 12 bytes a lane, 4-byte aligned
#pragma unroll
    for (int i = 0; i < VEC / 2; ++i) r.w[i] = __ldg(static_cast<const unsigned int*>(p) + i);
  }
  return r;
}

template <int VEC>
__device__ __forceinline__ Pack<VEC> zero_pack() {
  Pack<VEC> r;
#pragma unroll
  for (int i = 0; i < VEC / 2; ++i) r.w[i] = 0;
  return r;
}

template <class T, int VEC>
__device__ __forceinline__ void unpack(const Pack<VEC>& p, float (&f)[VEC]) {
#pragma unroll
  for (int i = 0; i < VEC / 2; ++i) {
    const float2 v = Conv<T>::pair(p.w[i]);
    f[2 * i] = v.x;
    f[2 * i + 1] = v.y;
  }
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, off));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
  return v;
}

// grid (splits, Hkv * hgroups, B). part_o [B*Hq, splits, D], part_ml [B*Hq, splits, 2] (max in
// log2 units, sum); both unused (null) when splits == 1.
template <class T, int D, int G>
__global__ void __launch_bounds__(kThreads)
    attn_split_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                      const int32_t* __restrict__ seq_lens, T* __restrict__ out,
                      float* __restrict__ part_o, float* __restrict__ part_ml, int Hq, int Hkv,
                      int S, int rep, int hgroups, int chunk, int splits, float qscale) {
  using C = Cfg<D>;
  constexpr int VEC = C::VEC, L = C::L, KPW = C::KPW, KPB = C::KPB, TILE = C::TILE;
  __shared__ float sc[G][TILE];       // scores, then probabilities, of the current tile
  __shared__ float red[kWarps][G][D];  // per-warp partial outputs at the end
  __shared__ float s_m[G], s_l[G], s_alpha[G];

  const int split = blockIdx.x;
  const int kvh = blockIdx.y / hgroups;
  const int h0 = (blockIdx.y % hgroups) * G;  // first query head of the group, within the KV head
  const int b = blockIdx.z;
  const int nh = min(G, rep - h0);            // query heads this block really owns
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int kslot = lane / L, li = lane % L;  // key of the warp step, VEC slice of the head dim
  const int64_t row0 = (int64_t)b * Hq + (int64_t)kvh * rep + h0;  // [b, hq] row of head h0

  int len = seq_lens != nullptr ? seq_lens[b] : S;
  len = len < 0 ? 0 : (len > S ? S : len);
  const int c0 = split * chunk;
  const int c1 = min(c0 + chunk, len);

  if (c0 >= c1) {  // no key in this split (uniform over the block, so no barrier is skipped)
    if (splits == 1) {
      for (int idx = threadIdx.x; idx < nh * D; idx += kThreads)
        out[row0 * D + idx] = Conv<T>::from(0.f);
    } else if (threadIdx.x < nh) {
      float* ml = part_ml + ((row0 + threadIdx.x) * splits + split) * 2;
      ml[0] = -INFINITY;
      ml[1] = 0.f;
    }
    return;
  }

  // This lane's slice of the query heads, pre-scaled into log2 units. Heads past nh stay zero.
  float qf[G][VEC];
#pragma unroll
  for (int h = 0; h < G; ++h) {
    if (h < nh) {
      unpack<T, VEC>(load_pack<VEC>(q + (row0 + h) * D + li * VEC), qf[h]);
#pragma unroll
      for (int e = 0; e < VEC; ++e) qf[h][e] *= qscale;
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) qf[h][e] = 0.f;
    }
  }
  float acc[G][VEC];
#pragma unroll
  for (int h = 0; h < G; ++h)
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[h][e] = 0.f;
  if (threadIdx.x < G) {  // visible after the first barrier of the tile loop
    s_m[threadIdx.x] = -INFINITY;
    s_l[threadIdx.x] = 0.f;
  }

  const int64_t head_off = ((int64_t)b * Hkv + kvh) * S * D + li * VEC;
  const T* kb = k + head_off;
  const T* vb = v + head_off;

  for (int t0 = c0; t0 < c1; t0 += TILE) {
    Pack<VEC> kp[kSteps], vp[kSteps];
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      const int key = t0 + s * KPB + warp * KPW + kslot;
      if (key < c1) {
        kp[s] = load_pack<VEC>(kb + (int64_t)key * D);
        vp[s] = load_pack<VEC>(vb + (int64_t)key * D);
      } else {  // never read past the valid keys; zero V keeps 0 * garbage out of acc
        kp[s] = zero_pack<VEC>();
        vp[s] = zero_pack<VEC>();
      }
    }

    // Scores of the tile (log2 units) into shared memory; invalid keys get -inf.
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      float kf[VEC];
      unpack<T, VEC>(kp[s], kf);
      float part[G];
#pragma unroll
      for (int h = 0; h < G; ++h) {
        float d = 0.f;
#pragma unroll
        for (int e = 0; e < VEC; ++e) d = fmaf(qf[h][e], kf[e], d);
        part[h] = d;
      }
#pragma unroll
      for (int off = L / 2; off > 0; off >>= 1)
#pragma unroll
        for (int h = 0; h < G; ++h) part[h] += __shfl_xor_sync(kFull, part[h], off);
      const int kl = s * KPB + warp * KPW + kslot;
      if (li == 0) {
        const bool valid = t0 + kl < c1;
#pragma unroll
        for (int h = 0; h < G; ++h) sc[h][kl] = valid ? part[h] : -INFINITY;
      }
    }
    __syncthreads();

    // Online softmax, one warp per head: new running max, p = 2^(s - m), rescale factor.
    for (int h = warp; h < G; h += kWarps) {
      float mx = -INFINITY;
      for (int i = lane; i < TILE; i += 32) mx = fmaxf(mx, sc[h][i]);
      mx = warp_max(mx);
      const float m_old = s_m[h];
      const float m_new = fmaxf(m_old, mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // avoids (-inf) - (-inf)
      float sum = 0.f;
      for (int i = lane; i < TILE; i += 32) {
        const float p = exp2f(sc[h][i] - m_use);
        sc[h][i] = p;
        sum += p;
      }
      sum = warp_sum(sum);
      if (lane == 0) {
        const float alpha = exp2f(m_old - m_use);
        s_alpha[h] = alpha;
        s_l[h] = s_l[h] * alpha + sum;
        s_m[h] = m_new;
      }
    }
    __syncthreads();

    // acc = acc * alpha + P.V over this lane's keys and head-dim slice.
#pragma unroll
    for (int h = 0; h < G; ++h) {
      const float a = s_alpha[h];
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[h][e] *= a;
    }
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      float vf[VEC];
      unpack<T, VEC>(vp[s], vf);
      const int kl = s * KPB + warp * KPW + kslot;
#pragma unroll
      for (int h = 0; h < G; ++h) {
        const float p = sc[h][kl];
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[h][e] = fmaf(p, vf[e], acc[h][e]);
      }
    }
    __syncthreads();  // sc is rewritten by the next tile
  }

  // Sum the KPW key slots of each warp (lanes L apart), then the warps through shared memory.
#pragma unroll
  for (int off = L; off < 32; off <<= 1)
#pragma unroll
    for (int h = 0; h < G; ++h)
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[h][e] += __shfl_xor_sync(kFull, acc[h][e], off);
  if (kslot == 0) {
#pragma unroll
    for (int h = 0; h < G; ++h)
#pragma unroll
      for (int e = 0; e < VEC; ++e) red[warp][h][li * VEC + e] = acc[h][e];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < nh * D; idx += kThreads) {
    const int h = idx / D, d = idx % D;
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) o += red[w][h][d];
    if (splits == 1) {
      const float l = s_l[h];
      out[(row0 + h) * D + d] = Conv<T>::from(l > 0.f ? o / l : 0.f);
    } else {
      part_o[((row0 + h) * splits + split) * D + d] = o;
    }
  }
  if (splits > 1 && threadIdx.x < nh) {
    float* ml = part_ml + ((row0 + threadIdx.x) * splits + split) * 2;
    ml[0] = s_m[threadIdx.x];
    ml[1] = s_l[threadIdx.x];
  }
}

// grid (B*Hq), block D threads: merges the splits of one (b, q head) in fp32.
template <class T, int D>
__global__ void __launch_bounds__(D)
    attn_combine_kernel(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                        T* __restrict__ out, int splits) {
  const int64_t row = blockIdx.x;
  const float* ml = part_ml + row * splits * 2;
  float m = -INFINITY;
  for (int s = 0; s < splits; ++s)
    if (ml[2 * s + 1] > 0.f) m = fmaxf(m, ml[2 * s]);
  const int d = threadIdx.x;
  float o = 0.f, l = 0.f;
  for (int s = 0; s < splits; ++s) {
    const float ls = ml[2 * s + 1];
    if (ls > 0.f) {  // an empty split never wrote part_o: skip it, do not multiply by 0
      const float w = exp2f(ml[2 * s] - m);
      l += ls * w;
      o += w * part_o[(row * splits + s) * D + d];
    }
  }
  out[row * D + d] = Conv<T>::from(l > 0.f ? o / l : 0.f);
}

struct AttnArgs {
  const void *q, *k, *v;
  const int32_t* seq_lens;
  void* out;
  int64_t B, Hq, Hkv, S, D;
  float scale;
  cudaStream_t stream;
};

template <class T, int D, int G>
cudaError_t run(const AttnArgs& a) {
  using C = Cfg<D>;
  const int64_t rep = a.Hq / a.Hkv;
  const int64_t hgroups = (rep + G - 1) / G;

  int dev = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;

  // Enough splits for ~4 blocks per SM, whole tiles per split, no empty trailing split.
  const int64_t base_blocks = a.B * a.Hkv * hgroups;
  const int64_t n_tiles = (a.S + C::TILE - 1) / C::TILE;
  int64_t splits = (4 * (int64_t)sms + base_blocks - 1) / base_blocks;
  splits = splits < 1 ? 1 : (splits > n_tiles ? n_tiles : splits);
  const int64_t chunk = (n_tiles + splits - 1) / splits * C::TILE;
  splits = (a.S + chunk - 1) / chunk;

  float* ws = nullptr;
  if (splits > 1) {
    const size_t bytes = sizeof(float) * (size_t)(a.B * a.Hq * splits * (a.D + 2));
    err = cudaMallocAsync(reinterpret_cast<void**>(&ws), bytes, a.stream);
    if (err != cudaSuccess) return err;
  }
  float* part_o = ws;
  float* part_ml = ws != nullptr ? ws + a.B * a.Hq * splits * a.D : nullptr;

  const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(a.Hkv * hgroups),
                  static_cast<unsigned>(a.B));
  attn_split_kernel<T, D, G><<<grid, kThreads, 0, a.stream>>>(
      static_cast<const T*>(a.q), static_cast<const T*>(a.k), static_cast<const T*>(a.v),
      a.seq_lens, static_cast<T*>(a.out), part_o, part_ml, static_cast<int>(a.Hq),
      static_cast<int>(a.Hkv), static_cast<int>(a.S), static_cast<int>(rep),
      static_cast<int>(hgroups), static_cast<int>(chunk), static_cast<int>(splits),
      a.scale * kLog2e);
  err = cudaGetLastError();
  if (err == cudaSuccess && splits > 1) {
    attn_combine_kernel<T, D><<<static_cast<unsigned>(a.B * a.Hq), D, 0, a.stream>>>(
        part_o, part_ml, static_cast<T*>(a.out), static_cast<int>(splits));
    err = cudaGetLastError();
  }
  if (ws != nullptr) {
    const cudaError_t free_err = cudaFreeAsync(ws, a.stream);
    if (err == cudaSuccess) err = free_err;
  }
  return err;
}

// G = query heads per block: the GQA ratio rounded up to a power of two, at most 8 (padding
// heads cost a few FMAs, never memory traffic).
template <class T, int D>
cudaError_t run_heads(const AttnArgs& a) {
  const int64_t rep = a.Hq / a.Hkv;
  if (rep <= 1) return run<T, D, 1>(a);
  if (rep <= 2) return run<T, D, 2>(a);
  if (rep <= 4) return run<T, D, 4>(a);
  return run<T, D, kMaxHeadsPerBlock>(a);
}

template <class T>
cudaError_t run_dim(const AttnArgs& a) {
  switch (a.D) {
    case 32: return run_heads<T, 32>(a);
    case 64: return run_heads<T, 64>(a);
    case 96: return run_heads<T, 96>(a);
    case 128: return run_heads<T, 128>(a);
    case 256: return run_heads<T, 256>(a);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t decode_attention(const void* q, const void* k, const void* v, const int32_t* seq_lens,
                             void* out, int64_t B, int64_t Hq, int64_t Hkv, int64_t S, int64_t D,
                             float scale, int dtype, cudaStream_t stream) {
  const AttnArgs a{q, k, v, seq_lens, out, B, Hq, Hkv, S, D, scale, stream};
  if (dtype == kFloat16) return run_dim<__half>(a);
  if (dtype == kBFloat16) return run_dim<__nv_bfloat16>(a);
  return cudaErrorInvalidValue;
}

}  // namespace lathe_cuda
