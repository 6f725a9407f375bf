// Fused softmax attention forward on the CPU, flash style: QK^T is computed a tile of keys at a
// time with an online softmax, then P V is accumulated into the output rows; the Sq x Sk score
// matrix is never materialised.
//
//   q   [B, Hq,  Sq, D]   k, v [B, Hkv, Sk, D]   out [B, Hq, Sq, D]
//
// Every tensor is given by a pointer and four element strides (so views of a [B, S, H, D]
// layout work without copies); the head dim must be contiguous (stride 1). Hq must be a multiple
// of Hkv (GQA / MQA: q head h reads kv head h / (Hq / Hkv)).
// dtype: 0 float32, 1 bfloat16 (q, k, v and out share it; the math is fp32 either way).
// mask:  uint8 [B, Sk] (1 = real key, 0 = padding), row stride mask_stride, or null. A query
//        row that sees no real key outputs zeros.
// causal: query i sees keys j <= i + Sk - Sq (the last query is aligned with the last key).
// scale: the softmax scale (the caller picks 1/sqrt(D) by default).
//
// Bodies: AVX-512 and AVX2 (register-blocked micro-kernels) and a scalar one, chosen at run time
// by lathe::active_isa(). Work is split over (batch, kv head, block of query rows) and, when
// that gives too few tasks (decode), also over key ranges whose partial results are combined
// afterwards (flash-decoding).
#pragma once
#include <cstdint>

namespace lathe {

struct AttentionArgs {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  int64_t B = 0, Hq = 0, Hkv = 0, Sq = 0, Sk = 0, D = 0;
  int64_t q_strides[4] = {0, 0, 0, 1};
  int64_t k_strides[4] = {0, 0, 0, 1};
  int64_t v_strides[4] = {0, 0, 0, 1};
  int64_t out_strides[4] = {0, 0, 0, 1};
  int dtype = 0;                   // 0 float32, 1 bfloat16
  const uint8_t* mask = nullptr;   // [B, Sk] or null
  int64_t mask_stride = 0;         // elements between batch rows of the mask
  bool causal = false;
  float scale = 1.f;
  int nthreads = 1;
};

// Validates every argument (std::invalid_argument naming the bad values) before touching memory.
void attention_fwd(const AttentionArgs& args);

// What every attention body's problem struct copies from the arguments: the pointers (as
// element type T), sizes, element strides, the mask and causality, and sscale, the positive
// factor the softmax applies to q.k (a negative or zero scale is folded into q by the body).
template <class T, class Prob>
inline void copy_problem(Prob& P, const AttentionArgs& a) {
  P.q = static_cast<const T*>(a.q);
  P.k = static_cast<const T*>(a.k);
  P.v = static_cast<const T*>(a.v);
  P.out = static_cast<T*>(a.out);
  P.B = a.B;
  P.Hq = a.Hq;
  P.Hkv = a.Hkv;
  P.rep = a.Hq / a.Hkv;
  P.Sq = a.Sq;
  P.Sk = a.Sk;
  P.D = a.D;
  for (int i = 0; i < 4; ++i) {
    P.sq[i] = a.q_strides[i];
    P.sk[i] = a.k_strides[i];
    P.sv[i] = a.v_strides[i];
    P.so[i] = a.out_strides[i];
  }
  P.mask = a.mask;
  P.msb = a.mask_stride;
  P.causal = a.causal;
  P.sscale = a.scale > 0.f ? a.scale : a.scale < 0.f ? -a.scale : 1.f;
}

}  // namespace lathe
