// W4A16 GEMV / skinny GEMM for decode: y[M, N] = x[M, K] @ W^T (+ bias), M <= 16 per launch,
// W in lathe's int4 format (qweight uint8 [N, K/2], low nibble = even k; scales [N, K/g] in
// the activation dtype; zeros uint8 [N, K/g]; W[n, k] = (code - zero) * scale).
//
// Design
//   * A block owns 16 output rows (n) and its 8 warps split K between them; the warps' partial
//     sums meet in shared memory at the end. 16 rows x 8 warps keeps enough 16-byte loads in
//     flight per SM even when N is only a few thousand.
//   * Each lane streams one 128-bit load of qweight per row it owns and iteration (32 codes),
//     dequantizes in registers to the activation dtype with the "magic number" trick
//     (0x6400|code is the fp16 1024+code, 0x4300|code the bf16 128+code), then
//     (c - z) * s with packed f16x2 / bf16x2 ops. (c - z) is exact and the product is rounded
//     once, so the dequantized W equals the reference's `((c - z) * s).to(dtype)` bit for bit.
//   * The dot products run on tensor cores, mma.m16n8k16 with fp32 accumulation: the W tile is
//     operand A (16 rows n x 16 k), x^T is operand B (16 k x 8 columns m), so M <= 8 costs one
//     mma per k-step and M <= 16 two, and each dequantized weight is reused for every m.
//     A k-sum may visit k in any order as long as A and B agree, so the mma k-slots follow the
//     order the nibbles come out of a 32-bit word ((c0,c4), (c1,c5), ...) and x is permuted to
//     match with byte_perm instead of shuffling nibbles.
//   * x is read with 128-bit __ldg loads (it is small and shared by all blocks: L2/L1 hits);
//     qweight with L1::no_allocate (read once). The next iteration's loads are issued before
//     the current one is computed (register double buffering).
//
// Roofline (H100 SXM, 3.35 TB/s HBM3, ~990 TFLOP/s dense fp16 tensor):
//   bytes  = N*K/2 (qweight) + 3*N*K/g (scales + zeros) + 2*M*K (x) + 2*M*N (y) [+ 2*N bias]
//   FLOPs  = 2*M*N*K
//   e.g. N = K = 4096, g = 128, M = 1: 8.39 MB + 0.39 MB + 8 KB + 8 KB = 8.80 MB, 33.6 MFLOP
//   -> 3.8 FLOP/byte, far below the ridge (~295 FLOP/byte): memory bound, floor 8.80 MB /
//   3.35 TB/s = 2.6 us; M = 16 is still memory bound (59 FLOP/byte, floor 9.05 MB -> 2.7 us).
//   Each 16-row block re-reads x from L2, 2*M*K*N/16 bytes in all: for M <= 4 that is at most
//   the weight traffic, at M = 16 it is 4x the weight bytes, served by L2 (~3x HBM bandwidth).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "cuda/device_util.cuh"
#include "cuda/launchers.h"

namespace lathe_cuda {
namespace {

constexpr int kWarps = 8;          // warps per block; they split K
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerBlock = 16;  // one mma A tile of output rows
constexpr int kKPerIter = 128;     // k covered by a warp per iteration: 4 lanes x 32 codes
constexpr int kMaxM = 16;          // rows of x per launch: two mma B tiles of 8

// Element-type policy: the magic exponent for the nibble trick, packed ops, the mma flavour.
struct F16 {
  using T = __half;
  static constexpr uint32_t kMagic = 0x6400u;  // fp16 1024.0; 1024 + c is exact for c < 1024
  __device__ static uint32_t sub2(uint32_t a, uint32_t b) {
    return bits_as<uint32_t>(__hsub2(bits_as<__half2>(a), bits_as<__half2>(b)));
  }
  __device__ static uint32_t mul2(uint32_t a, uint32_t b) {
    return bits_as<uint32_t>(__hmul2(bits_as<__half2>(a), bits_as<__half2>(b)));
  }
  __device__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ static float to_float(T v) { return __half2float(v); }
  __device__ static T from_float(float v) { return __float2half_rn(v); }
};

struct BF16 {
  using T = __nv_bfloat16;
  static constexpr uint32_t kMagic = 0x4300u;  // bf16 128.0; 128 + c is exact for c < 128
  __device__ static uint32_t sub2(uint32_t a, uint32_t b) {
    return bits_as<uint32_t>(
        __hsub2(bits_as<__nv_bfloat162>(a), bits_as<__nv_bfloat162>(b)));
  }
  __device__ static uint32_t mul2(uint32_t a, uint32_t b) {
    return bits_as<uint32_t>(
        __hmul2(bits_as<__nv_bfloat162>(a), bits_as<__nv_bfloat162>(b)));
  }
  __device__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ static float to_float(T v) { return __bfloat162float(v); }
  __device__ static T from_float(float v) { return __float2bfloat16_rn(v); }
};

// qweight is read exactly once: keep it out of L1.
__device__ __forceinline__ uint4 load_stream(const void* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Everything one lane needs for one iteration: its 32 codes of rows g and g+8, their
// (scale, magic+zero) pairs, and 32 activations of rows m = g (and g+8) of x.
template <int MT>
struct Stage {
  uint4 w[2];
  uint32_t s2[2], z2[2];  // scale and (magic | zero), duplicated into both halves
  uint4 x[MT][4];
};

// MT = number of 8-column B tiles of x (1: M <= 8, 2: M <= 16). DEPTH = stages of the
// register pipeline (2 for MT = 1; MT = 2 keeps 1, its stage already holds 44 registers).
template <class P, int MT, int DEPTH>
__global__ void __launch_bounds__(kThreads)
    w4a16_kernel(const typename P::T* __restrict__ x, const uint8_t* __restrict__ qweight,
                 const typename P::T* __restrict__ scales, const uint8_t* __restrict__ zeros,
                 const typename P::T* __restrict__ bias, typename P::T* __restrict__ out, int M,
                 int N, int K, int group_size) {
  using T = typename P::T;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, t = lane & 3;  // mma groupID / thread-in-group
  const int n0 = blockIdx.x * kRowsPerBlock;
  const int n_groups = K / group_size;
  const int n_iter = (K + kKPerIter - 1) / kKPerIter;
  const uint32_t magic2 = P::kMagic | (P::kMagic << 16);

  auto load = [&](int it, Stage<MT>& st) {
    const int k = it * kKPerIter + t * 32;  // first of this lane's 32 k; K % 32 == 0
    const bool k_ok = k < K;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int n = n0 + g + 8 * r;
      if (k_ok && n < N) {
        st.w[r] = load_stream(qweight + (int64_t)n * (K / 2) + k / 2);
        // The lane's 32 codes sit in one group: g >= 32 and k is a multiple of 32.
        const int64_t gi = (int64_t)n * n_groups + k / group_size;
        const uint32_t s = bits_as<uint16_t>(scales[gi]);
        const uint32_t z = P::kMagic | zeros[gi];
        st.s2[r] = s | (s << 16);
        st.z2[r] = z | (z << 16);
      } else {  // rows past N or k past K contribute exact zeros
        st.w[r] = make_uint4(0, 0, 0, 0);
        st.s2[r] = 0;
        st.z2[r] = magic2;
      }
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int m = mt * 8 + g;
      if (k_ok && m < M) {
        const uint4* px = reinterpret_cast<const uint4*>(x + (int64_t)m * K + k);
#pragma unroll
        for (int j = 0; j < 4; ++j) st.x[mt][j] = __ldg(px + j);
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) st.x[mt][j] = make_uint4(0, 0, 0, 0);
      }
    }
  };

  float acc[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[mt][i] = 0.f;

  auto compute = [&](const Stage<MT>& st) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // 32-bit word j: codes c0..c7 of k = base + 8j .. +7
      uint32_t a[2][4];            // a[row][p] = dequantized (c_p, c_{p+4}) of row g / g+8
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const uint32_t wd = word(st.w[r], j);
#pragma unroll
        for (int p = 0; p < 4; ++p) {
          const uint32_t biased = ((wd >> (4 * p)) & 0x000F000Fu) | magic2;  // magic + c
          a[r][p] = P::mul2(P::sub2(biased, st.z2[r]), st.s2[r]);         // (c - z) * s
        }
      }
      // k-step 0 uses slots {2t, 2t+1} = (c0, c4) and {2t+8, 2t+9} = (c1, c5);
      // k-step 1 uses (c2, c6) and (c3, c7). A regs: {row g lo, row g+8 lo, row g hi, g+8 hi}.
      const uint32_t A0[4] = {a[0][0], a[1][0], a[0][1], a[1][1]};
      const uint32_t A1[4] = {a[0][2], a[1][2], a[0][3], a[1][3]};
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const uint4 xv = st.x[mt][j];  // x[m, base + 8j .. +7] as pairs (x0,x1) .. (x6,x7)
        P::mma(acc[mt], A0, __byte_perm(xv.x, xv.z, 0x5410), __byte_perm(xv.x, xv.z, 0x7632));
        P::mma(acc[mt], A1, __byte_perm(xv.y, xv.w, 0x5410), __byte_perm(xv.y, xv.w, 0x7632));
      }
    }
  };

  // Register pipeline: DEPTH - 1 iterations of loads stay in flight behind the one being
  // computed. With K = 4096 a warp runs only 4 iterations, so each one waiting a full DRAM
  // latency (depth 1) left the H200 at ~0.8-1.2 TB/s; depth 2 doubles the bytes in flight.
  Stage<MT> cur, nxt, nxt2;
  if (warp < n_iter) load(warp, cur);
  if (DEPTH > 1 && warp + kWarps < n_iter) load(warp + kWarps, nxt);
  for (int it = warp; it < n_iter; it += kWarps) {
    if (DEPTH > 1) {
      if (it + 2 * kWarps < n_iter) load(it + 2 * kWarps, nxt2);
      compute(cur);
      cur = nxt;
      nxt = nxt2;
    } else {
      if (it + kWarps < n_iter) load(it + kWarps, nxt);
      compute(cur);
      cur = nxt;
    }
  }

  // Split-K across the block's warps: sum the C fragments in shared memory.
  __shared__ float red[kWarps][MT * 4][32];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < 4; ++i) red[warp][mt * 4 + i][lane] = acc[mt][i];
  __syncthreads();
  for (int idx = threadIdx.x; idx < MT * 4 * 32; idx += kThreads) {
    const int i = idx / 32, l = idx % 32;
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += red[w][i][l];
    // C fragment: c0,c1 -> (row g, cols 2t, 2t+1); c2,c3 -> (row g+8, same cols).
    const int r = i % 4;
    const int n = n0 + (l >> 2) + (r >= 2 ? 8 : 0);
    const int m = (i / 4) * 8 + 2 * (l & 3) + (r & 1);
    if (m < M && n < N) {
      if (bias != nullptr) s += P::to_float(bias[n]);
      out[(int64_t)m * N + n] = P::from_float(s);
    }
  }
}

template <class P>
cudaError_t run(const void* x, const uint8_t* qweight, const void* scales, const uint8_t* zeros,
                const void* bias, void* out, int64_t M, int64_t N, int64_t K, int64_t group_size,
                cudaStream_t stream) {
  using T = typename P::T;
  const dim3 grid(static_cast<unsigned>((N + kRowsPerBlock - 1) / kRowsPerBlock));
  for (int64_t m0 = 0; m0 < M; m0 += kMaxM) {
    const int mc = static_cast<int>(M - m0 < kMaxM ? M - m0 : kMaxM);
    const T* xs = static_cast<const T*>(x) + m0 * K;
    T* os = static_cast<T*>(out) + m0 * N;
    auto kernel = mc <= 8 ? w4a16_kernel<P, 1, 2> : w4a16_kernel<P, 2, 1>;
    kernel<<<grid, kThreads, 0, stream>>>(xs, qweight, static_cast<const T*>(scales), zeros,
                                          static_cast<const T*>(bias), os, mc,
                                          static_cast<int>(N), static_cast<int>(K),
                                          static_cast<int>(group_size));
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t w4a16_linear(const void* x, const uint8_t* qweight, const void* scales,
                         const uint8_t* zeros, const void* bias, void* out, int64_t M, int64_t N,
                         int64_t K, int64_t group_size, int dtype, cudaStream_t stream) {
  if (dtype == kFloat16)
    return run<F16>(x, qweight, scales, zeros, bias, out, M, N, K, group_size, stream);
  if (dtype == kBFloat16)
    return run<BF16>(x, qweight, scales, zeros, bias, out, M, N, K, group_size, stream);
  return cudaErrorInvalidValue;
}

}  // namespace lathe_cuda
