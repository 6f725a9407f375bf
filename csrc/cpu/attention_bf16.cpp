// bf16 flash attention on AVX512-BF16 (see attention_bf16.h).
//
// K and V of every (batch, kv head) are first repacked, once per call, into VDPBF16PS operand
// order (zero padded to whole tiles of 64 keys):
//   Kp [tile][D/2 pairs][64 keys][2]: the 16 keys of one vector, each with the pair (d, d+1),
//      so S[row][keys] += dpbf16(broadcast q[row][d, d+1], Kp[tile][d/2][16 keys]).
//   Vp [key pair][Dv][2]: V[j][d], V[j+1][d] side by side, so
//      O[row][d..d+16) += dpbf16(broadcast p[row][j, j+1], Vp[j/2][d..d+16)).
// A task is 48 query rows of one head; it walks the key tiles, and for every 6-row micro-block
// computes a 6 x 64 score tile in registers (24 accumulators), the online softmax on it,
// writes the probabilities as bf16, and adds P.V into the fp32 output rows (O = alpha O + P V).
#include "cpu/attention_bf16.h"

// GCC 12 reports the _mm512_undefined_* placeholders inside the intrinsics headers as
// "may be used uninitialized" (GCC bug 105593), as attention.cpp notes.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/isa.h"
#include "cpu/target_bf16.h"
#include "cpu/vec_math.h"


namespace lathe {
namespace {

constexpr int kTile = 64;           // keys per tile: 4 vectors of 16
constexpr int kMR = 6;              // query rows per micro-block (6 x 4 score accumulators)
constexpr int kMB = 48;             // query rows per task
constexpr int kPVD = 4;             // head-dim vectors per P.V pass (6 x 4 accumulators)
constexpr int64_t kMinRows = 16;    // fewer query rows per head: the generic body
constexpr int64_t kMaxD = 512;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

struct Prob {
  const uint16_t *q, *k, *v;
  uint16_t* out;
  int64_t B, Hq, Hkv, rep, Sq, Sk, D;
  int64_t Dh;     // d pairs: ceil(D / 2)
  int64_t Dv;     // D rounded up to 16 (V / O row length)
  int64_t ntile;  // key tiles: ceil(Sk / 64)
  int64_t sq[4], sk[4], sv[4], so[4];
  const uint8_t* mask;
  int64_t msb;
  bool causal;
  uint16_t qsign;  // XORed into q's bf16 bits: 0, or 0x8000 for a negative scale (exact)
  bool qzero;      // scale 0: every score is 0
  float sscale;    // the positive factor the softmax applies to q.k
  const uint16_t* kp;  // packed K, [B * Hkv][ntile][Dh][64][2]
  const uint16_t* vp;  // packed V, [B * Hkv][ntile * 32][Dv][2]
};

inline int64_t kp_head(const Prob& P) { return P.ntile * P.Dh * kTile * 2; }
inline int64_t vp_head(const Prob& P) { return P.ntile * (kTile / 2) * P.Dv * 2; }

inline __mmask16 lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : n <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << n) - 1);
}

// ---------------------------------------------------------------------------- packing
// Tile t of kv head (b, g): K into Kp order, V into Vp order; keys past Sk and d past D are 0.
LATHE_TBF16 void pack_tile(const Prob& P, int64_t b, int64_t g, int64_t t, uint16_t* kp, uint16_t* vp) {
  const uint16_t* K = P.k + b * P.sk[0] + g * P.sk[1];
  const uint16_t* V = P.v + b * P.sv[0] + g * P.sv[1];
  uint32_t* kt = reinterpret_cast<uint32_t*>(kp) + t * P.Dh * kTile;
  const int64_t j0 = t * kTile;
  const int nk = static_cast<int>(std::min<int64_t>(kTile, P.Sk - j0));
  const int64_t dfull = P.D / 2;  // whole pairs
  for (int i = 0; i < kTile; ++i) {
    if (i >= nk) {
      for (int64_t dp = 0; dp < P.Dh; ++dp) kt[dp * kTile + i] = 0;
      continue;
    }
    const uint16_t* row = K + (j0 + i) * P.sk[2];
    for (int64_t dp = 0; dp < dfull; ++dp) {
      uint32_t pr;
      std::memcpy(&pr, row + 2 * dp, 4);
      kt[dp * kTile + i] = pr;
    }
    if (P.D & 1) kt[dfull * kTile + i] = row[P.D - 1];  // (last d, 0)
  }
  uint16_t* vt = vp + t * (kTile / 2) * P.Dv * 2;
  const __m256i zero = _mm256_setzero_si256();
  for (int jp = 0; jp < kTile / 2; ++jp) {
    const int64_t j = j0 + 2 * jp;
    const uint16_t* r0 = j < P.Sk ? V + j * P.sv[2] : nullptr;
    const uint16_t* r1 = j + 1 < P.Sk ? V + (j + 1) * P.sv[2] : nullptr;
    uint16_t* dst = vt + jp * P.Dv * 2;
    for (int64_t d0 = 0; d0 < P.Dv; d0 += 16) {
      const __mmask16 m = lanes(P.D - d0);
      const __m256i a = r0 ? _mm256_maskz_loadu_epi16(m, r0 + d0) : zero;
      const __m256i c = r1 ? _mm256_maskz_loadu_epi16(m, r1 + d0) : zero;
      const __m256i lo = _mm256_unpacklo_epi16(a, c), hi = _mm256_unpackhi_epi16(a, c);  // per 128-bit lane
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * d0), _mm256_permute2x128_si256(lo, hi, 0x20));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * d0 + 16), _mm256_permute2x128_si256(lo, hi, 0x31));
    }
  }
}

// ---------------------------------------------------------------------------- micro-kernels
// e^x for the softmax (x <= 0 or NaN): exp_avx512 with x < -87.3 (and -inf) giving exactly 0
// and a NaN staying NaN (exp_avx512 clamps both away).
LATHE_TBF16 inline __m512 softmax_exp(__m512 x) {
  __m512 e = exp_avx512(x);
  e = _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_LT_OQ), _mm512_setzero_ps());
  return _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);
}

LATHE_TBF16 inline __m512bh as_bh(__m512i x) { return reinterpret_cast<__m512bh>(x); }

// Per-row state of a task.
struct Rows {
  float* O;   // [kMB][Dv] unnormalised output
  float* m;   // running max of the scaled scores
  float* l;   // running sum of the probabilities
  const uint16_t* Q;  // [kMB][2 * Dh] q rows, sign applied, zero padded
  int64_t lim[kMB];   // last key each row may see
};

// One micro-block of MR rows (from row r0 of the task) against key tile t: scores, online
// softmax, P.V. valid: the tile's keys that exist and are not padding (bit i = key 64t + i).
template <int MR>
LATHE_TBF16 void micro(const Prob& P, const uint16_t* kt, const uint16_t* vt, Rows& R, int r0, int64_t j0,
                       uint64_t valid, uint16_t* Pb) {
  __m512 s[MR][4];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) s[r][v] = _mm512_setzero_ps();
  const int64_t ldq = 2 * P.Dh;
  const uint16_t* q = R.Q + r0 * ldq;
  for (int64_t dp = 0; dp < P.Dh; ++dp) {
    __m512i kv[4];
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) kv[v] = _mm512_loadu_si512(kt + (dp * kTile + v * 16) * 2);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      int32_t pr;
      std::memcpy(&pr, q + r * ldq + 2 * dp, 4);
      const __m512bh a = as_bh(_mm512_set1_epi32(pr));
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) s[r][v] = _mm512_dpbf16_ps(s[r][v], a, as_bh(kv[v]));
    }
  }
  // Online softmax per row; the last key any row of the block sees bounds the P.V pass.
  const __m512 sc = _mm512_set1_ps(P.sscale), ninf = _mm512_set1_ps(kNegInf);
  float alpha[MR];
  int64_t kend = 0;
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    const int64_t vis = std::min<int64_t>(kTile, R.lim[r0 + r] - j0 + 1);  // causal: keys [0, vis) of the tile
    const uint64_t ok = vis >= kTile ? valid : vis <= 0 ? 0 : valid & ((uint64_t{1} << vis) - 1);
    kend = std::max(kend, vis);
    __m512 x[4];
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) x[v] = _mm512_mask_mov_ps(ninf, static_cast<__mmask16>(ok >> (16 * v)), s[r][v]);
    const float mx = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(x[0], x[1]), _mm512_max_ps(x[2], x[3])));
    const float mo = R.m[r0 + r];
    const float mn = std::max(mo, mx * P.sscale);  // scale > 0: the max commutes with it
    const float ms = mn == kNegInf ? 0.f : mn;     // nothing seen yet: every p is 0
    const __m512 nms = _mm512_set1_ps(-ms);
    __m512 p[4];
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) p[v] = softmax_exp(_mm512_fmadd_ps(x[v], sc, nms));
    const float a = std::exp(mo - ms);  // 0 when mo is -inf
    R.l[r0 + r] = R.l[r0 + r] * a + _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(p[0], p[1]), _mm512_add_ps(p[2], p[3])));
    R.m[r0 + r] = mn;
    alpha[r] = a;
    uint16_t* pr = Pb + r * kTile;
    _mm512_storeu_si512(pr, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(p[1], p[0])));
    _mm512_storeu_si512(pr + 32, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(p[3], p[2])));
  }
  kend = std::min<int64_t>(kend, P.Sk - j0);
  const int npairs = static_cast<int>(std::max<int64_t>(0, (kend + 1) / 2));
  // P.V over the head dim in passes of kPVD vectors.
  for (int64_t d0 = 0; d0 < P.Dv; d0 += kPVD * 16) {
    const int nvd = static_cast<int>(std::min<int64_t>(kPVD, (P.Dv - d0) / 16));
    __m512 acc[MR][kPVD];
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int c = 0; c < kPVD; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int jp = 0; jp < npairs; ++jp) {
      const uint16_t* vr = vt + (jp * P.Dv + d0) * 2;
      __m512i x[kPVD];
#pragma GCC unroll 4
      for (int c = 0; c < kPVD; ++c)
        if (c < nvd) x[c] = _mm512_loadu_si512(vr + c * 32);
#pragma GCC unroll 6
      for (int r = 0; r < MR; ++r) {
        int32_t pp;
        std::memcpy(&pp, Pb + r * kTile + 2 * jp, 4);
        const __m512bh a = as_bh(_mm512_set1_epi32(pp));
#pragma GCC unroll 4
        for (int c = 0; c < kPVD; ++c)
          if (c < nvd) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], a, as_bh(x[c]));
      }
    }
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      float* o = R.O + (r0 + r) * P.Dv + d0;
      const __m512 a = _mm512_set1_ps(alpha[r]);
#pragma GCC unroll 4
      for (int c = 0; c < kPVD; ++c)
        if (c < nvd) _mm512_storeu_ps(o + c * 16, _mm512_fmadd_ps(_mm512_loadu_ps(o + c * 16), a, acc[r][c]));
    }
  }
}

using MicroFn = void (*)(const Prob&, const uint16_t*, const uint16_t*, Rows&, int, int64_t, uint64_t, uint16_t*);
constexpr MicroFn kMicro[kMR + 1] = {nullptr, micro<1>, micro<2>, micro<3>, micro<4>, micro<5>, micro<6>};

// Keys of tile [j0, j0 + 64) that exist and are real (mask byte != 0).
LATHE_TBF16 uint64_t tile_valid(const Prob& P, int64_t b, int64_t j0) {
  const int64_t n = std::min<int64_t>(kTile, P.Sk - j0);
  const uint64_t exist = n >= 64 ? ~uint64_t{0} : (uint64_t{1} << n) - 1;
  if (!P.mask) return exist;
  const __m512i bytes = _mm512_maskz_loadu_epi8(exist, P.mask + b * P.msb + j0);
  return _mm512_test_epi8_mask(bytes, bytes) & exist;
}

struct Scratch {
  std::vector<float> O, ml;
  std::vector<uint16_t> Q, Pb;
};

LATHE_TBF16 void run_task(const Prob& P, int64_t t, int64_t nblk, Scratch& S) {
  const int64_t blk = nblk - 1 - t % nblk;  // causal: the last rows see the most keys, run them first
  const int64_t h = (t / nblk) % P.Hq, b = t / (nblk * P.Hq), g = h / P.rep;
  const int64_t i0 = blk * kMB;
  const int nr = static_cast<int>(std::min<int64_t>(kMB, P.Sq - i0));
  const int64_t ldq = 2 * P.Dh;
  Rows R;
  R.O = S.O.data();
  R.m = S.ml.data();
  R.l = S.ml.data() + kMB;
  uint16_t* Q = S.Q.data();
  R.Q = Q;
  int64_t maxlim = -1;
  for (int r = 0; r < nr; ++r) {
    const int64_t i = i0 + r;
    R.lim[r] = P.causal ? i + P.Sk - P.Sq : P.Sk - 1;
    maxlim = std::max(maxlim, R.lim[r]);
    R.m[r] = kNegInf;
    R.l[r] = 0.f;
    const uint16_t* src = P.q + b * P.sq[0] + h * P.sq[1] + i * P.sq[2];
    uint16_t* dst = Q + r * ldq;
    for (int64_t d = 0; d < P.D; ++d) dst[d] = P.qzero ? 0 : static_cast<uint16_t>(src[d] ^ P.qsign);
    for (int64_t d = P.D; d < ldq; ++d) dst[d] = 0;
  }
  std::memset(R.O, 0, sizeof(float) * nr * P.Dv);
  const uint16_t* kh = P.kp + (b * P.Hkv + g) * kp_head(P);
  const uint16_t* vh = P.vp + (b * P.Hkv + g) * vp_head(P);
  const int64_t kend = std::min(P.Sk, maxlim + 1);
  for (int64_t j0 = 0; j0 < kend; j0 += kTile) {
    const uint64_t valid = tile_valid(P, b, j0);
    if (!valid) continue;  // all padding
    const int64_t t0 = j0 / kTile;
    const uint16_t* kt = kh + t0 * P.Dh * kTile * 2;
    const uint16_t* vt = vh + t0 * (kTile / 2) * P.Dv * 2;
    for (int r0 = 0; r0 < nr; r0 += kMR) {
      const int mr = std::min(kMR, nr - r0);
      if (R.lim[r0 + mr - 1] < j0) continue;  // above the diagonal for every row of the block
      kMicro[mr](P, kt, vt, R, r0, j0, valid, S.Pb.data());
    }
  }
  for (int r = 0; r < nr; ++r) {
    const float l = R.l[r];
    // no visible key: 0; a NaN sum stays NaN
    const __m512 inv = _mm512_set1_ps(l == 0.f ? 0.f : static_cast<float>(1.0 / static_cast<double>(l)));
    uint16_t* o = P.out + b * P.so[0] + h * P.so[1] + (i0 + r) * P.so[2];
    for (int64_t d0 = 0; d0 < P.D; d0 += 16) {
      const __m512 y = _mm512_mul_ps(_mm512_loadu_ps(R.O + r * P.Dv + d0), inv);
      _mm256_mask_storeu_epi16(o + d0, lanes(P.D - d0), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(y)));
    }
  }
}

}  // namespace

bool attention_bf16_fwd(const AttentionArgs& a, int nthreads) {
  if (a.dtype != 1 || static_cast<int>(active_level()) < static_cast<int>(Isa::Avx512Bf16)) return false;
  if (a.Sq < kMinRows || a.D > kMaxD || a.B == 0 || a.Sk == 0) return false;
  Prob P;
  copy_problem<uint16_t>(P, a);
  P.Dh = ceil_div(a.D, 2);
  P.Dv = round_up(a.D, 16);
  P.ntile = ceil_div(a.Sk, kTile);
  P.qsign = a.scale < 0.f ? 0x8000 : 0;
  P.qzero = a.scale == 0.f;
  nthreads = std::max(1, nthreads);

  // Packed K and V, kept by the calling thread between calls up to 64 MiB (no page faults on
  // every call); a larger one is freed when the call ends.
  const int64_t heads = P.B * P.Hkv;
  const size_t need = static_cast<size_t>(heads * (kp_head(P) + vp_head(P)));
  constexpr size_t kKeep = size_t{32} << 20;  // elements
  thread_local std::vector<uint16_t> kept;
  std::vector<uint16_t> temp;
  std::vector<uint16_t>& packed = need <= kKeep ? kept : temp;
  if (packed.size() < need) packed.resize(need);
  uint16_t* kp = packed.data();
  uint16_t* vp = kp + heads * kp_head(P);
  P.kp = kp;
  P.vp = vp;
  const int64_t npack = heads * P.ntile;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (npack > 1 && P.Sk * P.D * heads > 65536)
  for (int64_t c = 0; c < npack; ++c) {
    const int64_t hd = c / P.ntile, t = c % P.ntile;
    pack_tile(P, hd / P.Hkv, hd % P.Hkv, t, kp + hd * kp_head(P), vp + hd * vp_head(P));
  }

  const int64_t nblk = ceil_div(P.Sq, kMB), ntasks = P.B * P.Hq * nblk;
#pragma omp parallel num_threads(nthreads) if (ntasks > 1)
  {
    Scratch S;
    S.O.resize(kMB * P.Dv);
    S.ml.resize(2 * kMB);
    S.Q.resize(kMB * 2 * P.Dh);
    S.Pb.resize(kMR * kTile);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < ntasks; ++t) run_task(P, t, nblk, S);
  }
  return true;
}

}  // namespace lathe
