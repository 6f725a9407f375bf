// Host launchers of lathe's CUDA kernels (defined in csrc/cuda/*.cu, compiled by nvcc).
// This header is also read by g++ (bindings_cuda.cpp), so it holds declarations only: no
// device code, no torch. Callers validate arguments first; the launchers assume valid shapes
// and aligned pointers, enqueue on `stream`, and return the first CUDA error (cudaGetLastError
// after each launch) or cudaSuccess.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace lathe_cuda {

// Activation dtype codes shared with Python (lathe.kernels.cuda_ops).
enum DType : int { kFloat16 = 0, kBFloat16 = 1 };

// Head dims decode_attention is instantiated for.
inline bool attention_head_dim_supported(int64_t d) {
  return d == 32 || d == 64 || d == 96 || d == 128 || d == 256;
}

// y[M, N] = x[M, K] @ W^T (+ bias), W in lathe's int4 format: qweight uint8 [N, K/2] (low
// nibble = even k), scales [N, K/g] and bias [N] in the activation dtype, zeros uint8 [N, K/g].
// bias may be null. x and qweight 16-byte aligned; K % group_size == 0; group_size 32/64/128.
// M > 16 runs in slices of 16 rows (each re-reads W: meant for decode, not prefill).
cudaError_t w4a16_linear(const void* x, const uint8_t* qweight, const void* scales,
                         const uint8_t* zeros, const void* bias, void* out, int64_t M, int64_t N,
                         int64_t K, int64_t group_size, int dtype, cudaStream_t stream);

// Decode attention (one query per head): q [B, Hq, D], k/v [B, Hkv, S, D], out [B, Hq, D],
// contiguous, 16-byte aligned. seq_lens int32 [B] or null (all S keys valid); keys at
// positions >= seq_lens[b] are ignored, a batch with no key gives zeros. Uses a temporary
// stream-ordered workspace (cudaMallocAsync) when S is split across blocks.
cudaError_t decode_attention(const void* q, const void* k, const void* v, const int32_t* seq_lens,
                             void* out, int64_t B, int64_t Hq, int64_t Hkv, int64_t S, int64_t D,
                             float scale, int dtype, cudaStream_t stream);

}  // namespace lathe_cuda
