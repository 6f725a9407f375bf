// Fused attention forward (flash style) on the CPU. Three bodies, picked by active_isa():
//   avx512: the generic SIMD body (attention_body.inc) on 16-lane vectors, 48 query rows a block
//   avx2:   the same body on 8-lane vectors, 24 query rows a block
//   scalar: one query row at a time, the same online softmax over key tiles of 64, in double
// The SIMD body is written once against a small set of vector ops and compiled twice, inside
// `#pragma GCC target` regions (no -march flags: the dispatcher picks at run time).
//
// Scores are raw q.k dot products; the softmax rounds s * scale and subtracts the row max, as
// the reference does (the top score gives exactly e^0 = 1, whatever the magnitude), and exp is
// vec_math.h's (Cody-Waite reduction: no eps * |x| error from a multiplication by log2(e)). A key
// tile that is entirely padding (or entirely above the causal diagonal) is skipped; a query row
// with no visible key ends with l = 0 and outputs 0. A NaN among a row's visible inputs, or a
// score that overflows, gives NaN in that row (never zeros), on every body.
#include "cpu/attention.h"
#include "cpu/attention_bf16.h"

// GCC 12 reports the _mm512_undefined_* placeholders inside the intrinsics headers as
// "may be used uninitialized" (GCC bug 105593); the warning is about the headers, not this file.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>

#include "cpu/bf16.h"
#include "cpu/isa.h"
#include "cpu/vec_math.h"

namespace lathe {
namespace attn {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// The validated problem. Offsets and strides are in elements; pointers are bytes.
struct Prob {
  const char* q;
  const char* k;
  const char* v;
  char* out;
  int64_t B, Hq, Hkv, rep, Sq, Sk, D, Dp;  // Dp: D rounded up to 16 (scratch row length)
  int64_t sq[4], sk[4], sv[4], so[4];
  bool bf16;     // q and out are bf16
  bool kv_bf16;  // k and v are bf16 (false after the fp32 copy that long row blocks get)
  const uint8_t* mask;
  int64_t msb;
  bool causal;
  float qscale;  // q is packed times this: 1, or -1 / 0 for a negative / zero scale (exact)
  float sscale;  // the positive factor the softmax applies to q.k
};

// How the work is cut: per (batch, kv head) the rep * Sq query rows (all q heads of the group,
// flattened) go in blocks of RB rows; each block may also be split over key ranges.
struct Plan {
  bool decode;   // few rows per kv head: lanes run over the head dim, not over query rows
  int RB;        // rows per block
  int64_t rows;  // rep * Sq
  int64_t ngroups, nsplit, split_len, ntasks;
  float* part_o;   // [U][nsplit][RB][Dp] unnormalised partial outputs (nsplit > 1)
  float* part_ml;  // [U][nsplit][RB][2]  running max (of scaled scores) and sum
};

struct TaskPos {
  int64_t b, g, grp, s, u;
};

// Tasks run heaviest first under a dynamic schedule: for causal attention the last row
// blocks of every head see the most keys, so blocks are walked from the last one down.
inline TaskPos task_pos(const Prob& P, const Plan& L, int64_t t) {
  TaskPos p;
  p.s = t % L.nsplit;
  t /= L.nsplit;
  const int64_t grp_rev = t % L.ngroups;
  t /= L.ngroups;
  p.g = t % P.Hkv;
  p.b = t / P.Hkv;
  p.grp = L.ngroups - 1 - grp_rev;
  p.u = (p.b * P.Hkv + p.g) * L.ngroups + p.grp;
  return p;
}

// Flattened row r of kv head g: q head g * rep + r / Sq, query index r % Sq.
struct RowPos {
  int64_t qoff, ooff, lim;
};

// Whether a row (batch b, last visible key lim) sees any key. A row that does but ends with
// l == 0 had every score at -inf (an overflow, or -inf inputs): that is NaN, as the reference's
// softmax gives, not a row without keys (zeros). Only called on that rare path.
inline bool sees_a_key(const Prob& P, int64_t b, int64_t lim) {
  const int64_t end = std::min(P.Sk, lim + 1);
  if (end <= 0) return false;
  if (!P.mask) return true;
  const uint8_t* m = P.mask + b * P.msb;
  for (int64_t j = 0; j < end; ++j)
    if (m[j]) return true;
  return false;
}

inline RowPos row_pos(const Prob& P, int64_t b, int64_t g, int64_t r) {
  const int64_t h = g * P.rep + r / P.Sq, i = r % P.Sq;
  RowPos p;
  p.qoff = b * P.sq[0] + h * P.sq[1] + i * P.sq[2];
  p.ooff = b * P.so[0] + h * P.so[1] + i * P.so[2];
  p.lim = P.causal ? i + P.Sk - P.Sq : P.Sk - 1;  // last key this row may see
  return p;
}


inline float load_elem(const Prob& P, const char* base, int64_t off) {
  if (P.bf16) return bf16_to_f32(reinterpret_cast<const uint16_t*>(base)[off]);
  return reinterpret_cast<const float*>(base)[off];
}

inline void store_elem(const Prob& P, int64_t off, float x) {
  if (P.bf16) reinterpret_cast<uint16_t*>(P.out)[off] = f32_to_bf16(x);
  else reinterpret_cast<float*>(P.out)[off] = x;
}

// Carves 64-byte aligned float arrays out of one per-thread scratch block.
struct Carver {
  float* p;
  float* take(int64_t n) {
    float* r = p;
    p += round_up(n, 16);
    return r;
  }
};

}  // namespace attn

// ============================================================================ AVX-512 body
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
namespace attn {
namespace v512 {

constexpr int W = 16;
constexpr int NVQ = 4;  // query vectors per prefill block: 64 rows
// keys per QK micro-tile for nv query vectors: 6 x 4 or 8 x 3 (and less) accumulators
constexpr int mrk_for(int nv) { return nv >= 4 ? 6 : 8; }
constexpr int PVR = 6;  // rows per PV micro-tile
constexpr int PVD = 4;  // head-dim vectors per PV micro-tile (6 x 4 accumulators)
using V = __m512;

inline __mmask16 lanes(int n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF)
                 : n <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << n) - 1);
}
inline V vzero() { return _mm512_setzero_ps(); }
inline V vset1(float x) { return _mm512_set1_ps(x); }
inline V vld(const float* p) { return _mm512_loadu_ps(p); }
inline V vldn(const float* p, int n) { return _mm512_maskz_loadu_ps(lanes(n), p); }
inline void vst(float* p, V x) { _mm512_storeu_ps(p, x); }
inline void vstn(float* p, V x, int n) { _mm512_mask_storeu_ps(p, lanes(n), x); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
inline V vsub(V a, V b) { return _mm512_sub_ps(a, b); }
inline V vmul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V vmax(V a, V b) { return _mm512_max_ps(a, b); }
inline float vhmax(V x) { return _mm512_reduce_max_ps(x); }
inline float vhsum(V x) { return _mm512_reduce_add_ps(x); }

// e^x: the one vector exp of lathe (vec_math.h). NaN stays NaN (a NaN score makes its row NaN),
// x < -87.3 (and -inf: masked keys) gives exactly 0.
inline V vexp(V x) { return exp_avx512(x); }

inline V vsafe(V m) {  // a running max of -inf (nothing seen yet) is used as 0
  return _mm512_mask_mov_ps(m, _mm512_cmp_ps_mask(m, vset1(kNegInf), _CMP_EQ_OQ), vzero());
}
// o * s formed in double and rounded once: with s = 1 / l in double this is o / l to within
// double rounding, at a fraction of the cost of a 512-bit division.
inline V vmul_f64(V o, double s) {
  const __m512d sv = _mm512_set1_pd(s);
  const __m512d lo = _mm512_mul_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(o)), sv);
  const __m512d hi = _mm512_mul_pd(_mm512_cvtps_pd(_mm512_extractf32x8_ps(o, 1)), sv);
  return _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(lo)), _mm512_cvtpd_ps(hi), 1);
}

inline V bf16_bits_to_f32(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline V vld_bf16(const uint16_t* p) {
  return bf16_bits_to_f32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline V vldn_bf16(const uint16_t* p, int n) { return bf16_bits_to_f32(_mm256_maskz_loadu_epi16(lanes(n), p)); }
inline __m256i to_bf16(V x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i hi = _mm512_srli_epi32(u, 16);
  __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)),
                               _mm512_and_si512(hi, _mm512_set1_epi32(1)));
  r = _mm512_srli_epi32(r, 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}
inline void vst_bf16(uint16_t* p, V x) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16(x)); }
inline void vstn_bf16(uint16_t* p, V x, int n) { _mm256_mask_storeu_epi16(p, lanes(n), to_bf16(x)); }

// Lanes where lim[lane] < j (the key is above that row's causal limit) become -inf.
inline V vmask_lim(V s, const int32_t* lim, int32_t j) {
  const __mmask16 bad = _mm512_cmplt_epi32_mask(_mm512_loadu_si512(lim), _mm512_set1_epi32(j));
  return _mm512_mask_mov_ps(s, bad, vset1(kNegInf));
}
// Lanes >= n become -inf (n may be <= 0 or >= W).
inline V vmask_keys(V s, int64_t n) {
  const int k = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(n, W)));
  return _mm512_mask_mov_ps(vset1(kNegInf), lanes(k), s);
}
// Lanes whose mask byte is 0 become -inf (reads n <= W bytes).
inline V vmask_bytes(V s, const uint8_t* m, int n) {
  const __m128i b = _mm_maskz_loadu_epi8(lanes(n), m);
  return _mm512_mask_mov_ps(vset1(kNegInf), _mm_test_epi8_mask(b, b), s);
}

// a[0..15] -> one vector whose lane t is the sum of a[t]'s lanes.
inline V vhsum_t(const V* a) {
  V c[8], d[4];
#pragma GCC unroll 8
  for (int k = 0; k < 8; ++k)
    c[k] = vadd(_mm512_unpacklo_ps(a[2 * k], a[2 * k + 1]), _mm512_unpackhi_ps(a[2 * k], a[2 * k + 1]));
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) {
    const __m512d x = _mm512_castps_pd(c[2 * k]), y = _mm512_castps_pd(c[2 * k + 1]);
    d[k] = vadd(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const V e0 = vadd(_mm512_shuffle_f32x4(d[0], d[1], 0x88), _mm512_shuffle_f32x4(d[0], d[1], 0xDD));
  const V e1 = vadd(_mm512_shuffle_f32x4(d[2], d[3], 0x88), _mm512_shuffle_f32x4(d[2], d[3], 0xDD));
  return vadd(_mm512_shuffle_f32x4(e0, e1, 0x88), _mm512_shuffle_f32x4(e0, e1, 0xDD));
}

// In-register 16 x 16 transpose.
inline void vtranspose(V* r) {
  V t[16], u[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    u[4 * i + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  // u[4i + c] block b holds column 4b + c of rows 4i..4i+3.
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    const V v1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88), v2 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);
    const V w1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
    const V w2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
    r[c] = _mm512_shuffle_f32x4(v1, w1, 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(v1, w1, 0xDD);
    r[4 + c] = _mm512_shuffle_f32x4(v2, w2, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(v2, w2, 0xDD);
  }
}

#include "cpu/attention_body.inc"

}  // namespace v512
}  // namespace attn
#pragma GCC pop_options

// ============================================================================ AVX2 body
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace attn {
namespace v256 {

constexpr int W = 8;
constexpr int NVQ = 3;  // 24 rows a block
constexpr int mrk_for(int) { return 4; }  // 4 x 3 accumulators
constexpr int PVR = 4;
constexpr int PVD = 3;  // 4 x 3 accumulators
using V = __m256;

inline __m256i lanes(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline V vzero() { return _mm256_setzero_ps(); }
inline V vset1(float x) { return _mm256_set1_ps(x); }
inline V vld(const float* p) { return _mm256_loadu_ps(p); }
inline V vldn(const float* p, int n) { return _mm256_maskload_ps(p, lanes(n)); }
inline void vst(float* p, V x) { _mm256_storeu_ps(p, x); }
inline void vstn(float* p, V x, int n) { _mm256_maskstore_ps(p, lanes(n), x); }
inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V vadd(V a, V b) { return _mm256_add_ps(a, b); }
inline V vsub(V a, V b) { return _mm256_sub_ps(a, b); }
inline V vmul(V a, V b) { return _mm256_mul_ps(a, b); }
inline V vmax(V a, V b) { return _mm256_max_ps(a, b); }
inline float vhmax(V x) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float vhsum(V x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline V vexp(V x) { return exp_avx2(x); }  // vec_math.h, as the AVX-512 one

inline V vsafe(V m) { return _mm256_blendv_ps(m, vzero(), _mm256_cmp_ps(m, vset1(kNegInf), _CMP_EQ_OQ)); }
inline V vmul_f64(V o, double s) {
  const __m256d sv = _mm256_set1_pd(s);
  const __m256d lo = _mm256_mul_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(o)), sv);
  const __m256d hi = _mm256_mul_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(o, 1)), sv);
  return _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo));
}

inline V vld_bf16(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline V vldn_bf16(const uint16_t* p, int n) {
  alignas(16) uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::memcpy(tmp, p, sizeof(uint16_t) * std::max(0, std::min(n, W)));
  return vld_bf16(tmp);
}
inline __m128i to_bf16(V x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i hi = _mm256_srli_epi32(u, 16);
  __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)),
                               _mm256_and_si256(hi, _mm256_set1_epi32(1)));
  r = _mm256_srli_epi32(r, 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(hi, _mm256_set1_epi32(0x40)), nan);
  const __m256i pk = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  return _mm256_castsi256_si128(pk);
}
inline void vst_bf16(uint16_t* p, V x) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16(x)); }
inline void vstn_bf16(uint16_t* p, V x, int n) {
  alignas(16) uint16_t tmp[8];
  _mm_store_si128(reinterpret_cast<__m128i*>(tmp), to_bf16(x));
  std::memcpy(p, tmp, sizeof(uint16_t) * std::max(0, std::min(n, W)));
}

inline V vmask_lim(V s, const int32_t* lim, int32_t j) {
  const __m256i L = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lim));
  const __m256i bad = _mm256_cmpgt_epi32(_mm256_set1_epi32(j), L);
  return _mm256_blendv_ps(s, vset1(kNegInf), _mm256_castsi256_ps(bad));
}
inline V vmask_keys(V s, int64_t n) {
  const int k = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(n, W)));
  return _mm256_blendv_ps(vset1(kNegInf), s, _mm256_castsi256_ps(lanes(k)));
}
inline V vmask_bytes(V s, const uint8_t* m, int n) {
  uint64_t bytes = 0;
  std::memcpy(&bytes, m, std::max(0, std::min(n, W)));
  const __m256i w = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(bytes)));
  const __m256i pad = _mm256_cmpeq_epi32(w, _mm256_setzero_si256());
  return _mm256_blendv_ps(s, vset1(kNegInf), _mm256_castsi256_ps(pad));
}

inline V vhsum_t(const V* a) {
  const V h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
  const V h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
  const V x = _mm256_hadd_ps(h01, h23), y = _mm256_hadd_ps(h45, h67);
  return vadd(_mm256_permute2f128_ps(x, y, 0x20), _mm256_permute2f128_ps(x, y, 0x31));
}

inline void vtranspose(V* r) {
  const V t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const V t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const V t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const V t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const V u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const V u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const V u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const V u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

#include "cpu/attention_body.inc"

}  // namespace v256
}  // namespace attn
#pragma GCC pop_options

namespace attn {
namespace {

// ============================================================================ scalar body
constexpr int kScalarTile = 64;
constexpr double kF32Max = std::numeric_limits<float>::max();

inline double f32_range(double x) {  // beyond fp32's range: +-Inf, as an fp32 result would be
  return std::fabs(x) > kF32Max ? std::copysign(std::numeric_limits<double>::infinity(), x) : x;
}

void run_scalar(const Prob& P, int nthreads) {
  const int64_t total = P.B * P.Hq * P.Sq;
  const bool par = total > 1 && total * std::max<int64_t>(P.Sk, 1) * P.D > 65536;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 8) if (par)
  for (int64_t t = 0; t < total; ++t) {
    const int64_t i = t % P.Sq, h = (t / P.Sq) % P.Hq, b = t / (P.Sq * P.Hq), g = h / P.rep;
    // The portable body works in double (scores, softmax, sums): slower, and never less
    // accurate than fp32 math; only the output is rounded.
    double q[1024], o[1024], s[kScalarTile];
    const int64_t qoff = b * P.sq[0] + h * P.sq[1] + i * P.sq[2];
    const double scale = static_cast<double>(P.qscale) * P.sscale;
    for (int64_t d = 0; d < P.D; ++d) {
      q[d] = load_elem(P, P.q, qoff + d);  // the scale comes after the dot, as in fp32
      o[d] = 0.0;
    }
    const int64_t lim = P.causal ? i + P.Sk - P.Sq : P.Sk - 1;
    const int64_t kend = std::min(P.Sk, lim + 1);
    const uint8_t* mrow = P.mask ? P.mask + b * P.msb : nullptr;
    const double ninf = -std::numeric_limits<double>::infinity();
    double m = ninf, l = 0.0;
    bool nan_score = false, seen = false;
    for (int64_t j0 = 0; j0 < kend; j0 += kScalarTile) {
      const int nk = static_cast<int>(std::min<int64_t>(kScalarTile, kend - j0));
      double mx = ninf;
      for (int jj = 0; jj < nk; ++jj) {
        const int64_t j = j0 + jj;
        if (mrow && !mrow[j]) {
          s[jj] = ninf;
          continue;
        }
        seen = true;
        const int64_t koff = b * P.sk[0] + g * P.sk[1] + j * P.sk[2];
        double acc = 0.0;
        bool pinf = false, minf = false;
        for (int64_t d = 0; d < P.D; ++d) {
          const double t = q[d] * load_elem(P, P.k, koff + d);
          pinf |= t > kF32Max;
          minf |= t < -kF32Max;
          acc += t;
        }
        // Scores as fp32 holds them (the other bodies and the reference compute in fp32): a
        // product or a sum beyond its range is +-Inf (both signs: NaN), never a finite double.
        if (acc == acc && (pinf || minf)) acc = pinf && minf ? std::numeric_limits<double>::quiet_NaN()
                                                             : pinf ? -ninf : ninf;
        acc = f32_range(f32_range(acc) * scale);
        s[jj] = acc;
        nan_score |= acc != acc;  // std::max drops NaN: remember it (the row is NaN)
        mx = std::max(mx, acc);
      }
      const double mn = std::max(m, mx);
      if (mn == ninf) continue;  // nothing visible yet
      const double alpha = std::exp(m - mn);  // 0 when m is -inf
      l *= alpha;
      for (int64_t d = 0; d < P.D; ++d) o[d] *= alpha;
      for (int jj = 0; jj < nk; ++jj) {
        if (s[jj] == ninf) continue;
        const double p = std::exp(s[jj] - mn);
        l += p;
        const int64_t voff = b * P.sv[0] + g * P.sv[1] + (j0 + jj) * P.sv[2];
        for (int64_t d = 0; d < P.D; ++d) o[d] += p * load_elem(P, P.v, voff + d);
      }
      m = mn;
    }
    const int64_t ooff = b * P.so[0] + h * P.so[1] + i * P.so[2];
    const float qnan = std::numeric_limits<float>::quiet_NaN();
    for (int64_t d = 0; d < P.D; ++d)
      store_elem(P, ooff + d, nan_score || (l == 0.0 && seen) ? qnan : l != 0.0 ? static_cast<float>(o[d] / l) : 0.f);
  }
}

// ============================================================================ SIMD driver
struct Body {
  int MB, RD, KC, NBK;
  int64_t (*scratch_floats)(const Prob&, bool decode);
  void (*task)(const Prob&, const Plan&, float* scratch, int64_t t);
  void (*convert_kv)(const Prob&, int64_t b, int64_t g, int64_t j0, int64_t j1, float* k32, float* v32);
};

Plan make_plan(const Prob& P, const Body& body, int nthreads) {
  Plan L{};
  L.rows = P.rep * P.Sq;
  L.decode = L.rows <= body.RD;
  L.RB = L.decode ? static_cast<int>(L.rows) : body.MB;
  L.ngroups = ceil_div(L.rows, L.RB);
  const int64_t U = P.B * P.Hkv * L.ngroups;
  const int64_t align = L.decode ? body.KC : body.NBK;
  // Flash-decoding: with fewer blocks than about two per thread, split the keys too.
  int64_t nsplit = 1;
  if (nthreads > 1 && U < 2 * nthreads && P.Sk >= 1024)
    nsplit = std::max<int64_t>(1, std::min(ceil_div(4 * nthreads, U), P.Sk / 512));
  L.split_len = round_up(std::max<int64_t>(1, ceil_div(P.Sk, nsplit)), align);
  L.nsplit = std::max<int64_t>(1, ceil_div(P.Sk, L.split_len));
  L.ntasks = U * L.nsplit;
  return L;
}

// Merges the key-range partials of every row: o = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s.
void combine(const Prob& P, const Plan& L, int nthreads) {
  const int64_t U = P.B * P.Hkv * L.ngroups;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (U > 1)
  for (int64_t u = 0; u < U; ++u) {
    const int64_t grp = u % L.ngroups, g = (u / L.ngroups) % P.Hkv, b = u / (L.ngroups * P.Hkv);
    const int64_t r0 = grp * L.RB;
    const int nr = static_cast<int>(std::min<int64_t>(L.RB, L.rows - r0));
    float acc[1024];
    for (int lane = 0; lane < nr; ++lane) {
      const RowPos rp = row_pos(P, b, g, r0 + lane);
      float M = kNegInf;
      bool nan_part = false;  // std::max drops NaN: a NaN partial max or sum makes the row NaN
      for (int64_t s = 0; s < L.nsplit; ++s) {
        const float* ml = L.part_ml + ((u * L.nsplit + s) * L.RB + lane) * 2;
        nan_part |= ml[0] != ml[0] || ml[1] != ml[1];
        M = std::max(M, ml[0]);
      }
      std::fill(acc, acc + P.D, 0.f);
      float lsum = 0.f;
      if (M != kNegInf) {
        for (int64_t s = 0; s < L.nsplit; ++s) {
          const int64_t idx = (u * L.nsplit + s) * L.RB + lane;
          const float w = std::exp(L.part_ml[idx * 2] - M);
          if (w == 0.f) continue;
          lsum += w * L.part_ml[idx * 2 + 1];
          const float* os = L.part_o + idx * P.Dp;
          for (int64_t d = 0; d < P.D; ++d) acc[d] += w * os[d];
        }
      }
      const float qnan = std::numeric_limits<float>::quiet_NaN();
      for (int64_t d = 0; d < P.D; ++d)
        store_elem(P, rp.ooff + d, nan_part || (lsum == 0.f && sees_a_key(P, b, rp.lim)) ? qnan
                                   : lsum != 0.f ? acc[d] / lsum : 0.f);
    }
  }
}

// Working memory of one call: per-thread scratch, key-split partials, the fp32 copy of bf16
// K/V. It is kept per calling thread between calls (up to kKeepFloats): a fresh multi-MB
// allocation would be page-faulted in again on every call, by all threads at once.
constexpr int64_t kKeepFloats = int64_t{16} << 20;  // 64 MiB

float* call_arena(int64_t nfloats, std::unique_ptr<float[]>& temp) {
  thread_local std::unique_ptr<float[]> kept;
  thread_local int64_t kept_n = 0;
  const int64_t n = nfloats + 16;  // room to align to 64 bytes
  float* p;
  if (n <= kept_n) {
    p = kept.get();
  } else if (n <= kKeepFloats) {
    kept.reset(new float[n]);
    kept_n = n;
    p = kept.get();
  } else {
    temp.reset(new float[n]);
    p = temp.get();
  }
  return reinterpret_cast<float*>(round_up(reinterpret_cast<int64_t>(p), 64));
}

void run_simd(const Prob& P0, const Body& body, int nthreads) {
  Prob P = P0;
  Plan L = make_plan(P, body, nthreads);
  // bf16 K/V read by several row blocks are converted to fp32 once (a bandwidth-bound pass),
  // not once per block and tile.
  const bool widen = P.kv_bf16 && L.ngroups > 1 && P.Sk > 0;
  const int64_t nkv = widen ? P.B * P.Hkv * P.Sk * P.D : 0;
  const int64_t per = round_up(body.scratch_floats(P, L.decode), 16);
  const int64_t npart = L.nsplit > 1 ? L.ntasks * L.RB : 0;
  std::unique_ptr<float[]> temp;
  float* base = call_arena(per * nthreads + round_up(npart * (P.Dp + 2), 16) + 2 * nkv, temp);
  float* part = base + per * nthreads;
  float* k32 = part + round_up(npart * (P.Dp + 2), 16);
  if (widen) {
    float* v32 = k32 + nkv;
    const int64_t per_head = ceil_div(P.Sk, 256), nchunk = P.B * P.Hkv * per_head;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nkv > 65536)
    for (int64_t c = 0; c < nchunk; ++c) {
      const int64_t j0 = (c % per_head) * 256, bg = c / per_head;
      body.convert_kv(P, bg / P.Hkv, bg % P.Hkv, j0, std::min(P.Sk, j0 + 256), k32, v32);
    }
    P.k = reinterpret_cast<const char*>(k32);
    P.v = reinterpret_cast<const char*>(v32);
    const int64_t st[4] = {P.Hkv * P.Sk * P.D, P.Sk * P.D, P.D, 1};
    std::copy(st, st + 4, P.sk);
    std::copy(st, st + 4, P.sv);
    P.kv_bf16 = false;
  }
  if (L.nsplit > 1) {
    L.part_o = part;
    L.part_ml = part + npart * P.Dp;
  }
  const int64_t ntasks = L.ntasks;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1) if (ntasks > 1)
  for (int64_t t = 0; t < ntasks; ++t) body.task(P, L, base + omp_get_thread_num() * per, t);
  if (L.nsplit > 1) combine(P, L, nthreads);
}

const Body kBody512{v512::MB, v512::RD, v512::KC, v512::NBK, v512::scratch_floats, v512::run_task,
                    v512::convert_kv};
const Body kBody256{v256::MB, v256::RD, v256::KC, v256::NBK, v256::scratch_floats, v256::run_task,
                    v256::convert_kv};

std::string dims(const int64_t* s) {
  return "(" + std::to_string(s[0]) + ", " + std::to_string(s[1]) + ", " + std::to_string(s[2]) + ", " +
         std::to_string(s[3]) + ")";
}

}  // namespace
}  // namespace attn

// The message is only built when the check fails (this runs on every call).
#define LATHE_ATT_REQUIRE(ok, msg)                 \
  do {                                             \
    if (!(ok)) throw std::invalid_argument(msg);   \
  } while (0)

void attention_fwd(const AttentionArgs& a) {
  using std::to_string;
  LATHE_ATT_REQUIRE(a.dtype == 0 || a.dtype == 1,
                    "attention: dtype code " + to_string(a.dtype) + " must be 0 (float32) or 1 (bfloat16)");
  LATHE_ATT_REQUIRE(a.B >= 0 && a.Sq >= 0 && a.Sk >= 0,
                    "attention: sizes must be >= 0, got B=" + to_string(a.B) + " Sq=" + to_string(a.Sq) +
                        " Sk=" + to_string(a.Sk));
  LATHE_ATT_REQUIRE(a.Hq >= 1 && a.Hkv >= 1, "attention: head counts must be >= 1, got q heads " +
                                                 to_string(a.Hq) + ", kv heads " + to_string(a.Hkv));
  LATHE_ATT_REQUIRE(a.Hq % a.Hkv == 0, "attention: q heads " + to_string(a.Hq) +
                                           " not a multiple of kv heads " + to_string(a.Hkv));
  LATHE_ATT_REQUIRE(a.D >= 1 && a.D <= 1024,
                    "attention: head dim D=" + to_string(a.D) + " out of range 1..1024");
  LATHE_ATT_REQUIRE(a.Sq < (int64_t{1} << 30) && a.Sk < (int64_t{1} << 30),
                    "attention: sequence lengths Sq=" + to_string(a.Sq) + ", Sk=" + to_string(a.Sk) +
                        " exceed 2^30");
  const struct {
    const char* name;
    const int64_t* s;
  } views[] = {{"q", a.q_strides}, {"k", a.k_strides}, {"v", a.v_strides}, {"out", a.out_strides}};
  for (const auto& vw : views) {
    LATHE_ATT_REQUIRE(vw.s[3] == 1, std::string("attention: ") + vw.name +
                                        " must have a contiguous head dim (stride 1), got strides " +
                                        attn::dims(vw.s));
    LATHE_ATT_REQUIRE(vw.s[0] >= 0 && vw.s[1] >= 0 && vw.s[2] >= 0,
                      std::string("attention: ") + vw.name + " strides must be >= 0, got " + attn::dims(vw.s));
  }
  LATHE_ATT_REQUIRE(std::isfinite(a.scale), "attention: scale " + to_string(a.scale) + " is not finite");
  LATHE_ATT_REQUIRE(!a.mask || a.mask_stride >= 0,
                    "attention: mask row stride " + to_string(a.mask_stride) + " < 0");
  if (a.B == 0 || a.Sq == 0) return;
  LATHE_ATT_REQUIRE(a.q && a.out, "attention: null q or out pointer");
  LATHE_ATT_REQUIRE(a.Sk == 0 || (a.k && a.v), "attention: null k or v pointer");

  attn::Prob P;
  copy_problem<char>(P, a);
  P.Dp = attn::round_up(a.D, 16);
  P.bf16 = a.dtype == 1;
  P.kv_bf16 = P.bf16;
  if (a.Sk == 0) P.mask = nullptr;
  // The softmax needs a positive factor; a negative or zero scale is folded into q exactly.
  P.qscale = a.scale > 0.f ? 1.f : a.scale < 0.f ? -1.f : 0.f;
  const int nthreads = std::max(1, a.nthreads);
  if (P.bf16 && attention_bf16_fwd(a, nthreads)) return;  // AVX512-BF16 prefill (attention_bf16.cpp)
  switch (active_isa()) {
    case Isa::Avx512Vnni: attn::run_simd(P, attn::kBody512, nthreads); break;
    case Isa::Avx2: attn::run_simd(P, attn::kBody256, nthreads); break;
    default: attn::run_scalar(P, nthreads);
  }
}

#undef LATHE_ATT_REQUIRE

}  // namespace lathe
