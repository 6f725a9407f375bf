// AMX-INT8 W8A8 GEMM (see int8_gemm_amx.h). A block is 32 rows x 32 columns: accumulator tiles
// 0-3 (C[mi][ni], 16 x 16 int32), A tiles 4-5 (the two 16-row halves), B tiles 6-7 (the two
// 16-column blocks); one k step (64 k) is four TDPBUSD. The accumulators go through a 4 KiB
// int32 buffer to the AVX-512 epilogue. Tile numbers are immediates, so each case of the
// block (one or two row halves, one or two column blocks) is its own instantiation.
//
// The tile configuration is per thread and other code (oneDNN inside torch) may load its own
// between two calls on the same OpenMP thread, so each thread loads it at the start of every
// call and releases the tiles at the end.
#include "cpu/int8_gemm_amx.h"

// GCC 12 reports the _mm512_undefined_* placeholders inside the intrinsics headers as
// "may be used uninitialized" (GCC bug 105593), as attention.cpp notes.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>

#include "cpu/isa.h"
#include "cpu/vec_math.h"

#define LATHE_TAMX \
  __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")))

namespace lathe {
namespace {

constexpr int kLine = 64;                   // bytes in a packed line = one tile row
constexpr int kTileLines = 16;              // tile rows
constexpr int kTileBytes = kLine * kTileLines;
constexpr int kCols = 16;                   // output channels per B tile
constexpr int kBlockM = 32, kBlockN = 32;   // rows x columns per block (2 x 2 C tiles)

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ldtilecfg's 64-byte operand, palette 1: every tile used is 16 rows x 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// The tile operations a block uses, on the hardware (Hw) or emulated in plain C++ (Emu: the
// same tile semantics on arrays, so the blocking, tail and epilogue logic is tested on CPUs
// without AMX). A tile is 16 rows x 64 bytes. step() is one k step of 64: A tiles from rows
// [0, 16) and [16, 32) of a (row stride lda), B tiles from b0 / b1 (row stride 64), then
// C[mi][ni] += A[mi] . B[ni], where C[i][j] += sum_{r < 16, t < 4} A[i][4r + t] * B[r][4j + t].
struct Hw {
  LATHE_TAMX static void begin() {
    TileConfig cfg;
    std::memset(&cfg, 0, sizeof(cfg));
    cfg.palette_id = 1;
    for (int t = 0; t < 8; ++t) {
      cfg.colsb[t] = kLine;
      cfg.rows[t] = kTileLines;
    }
    _tile_loadconfig(&cfg);
  }
  LATHE_TAMX static void end() { _tile_release(); }
  template <bool TWO_M, bool TWO_N>
  LATHE_TAMX static inline void zero() {
    _tile_zero(0);
    if (TWO_N) _tile_zero(1);
    if (TWO_M) _tile_zero(2);
    if (TWO_M && TWO_N) _tile_zero(3);
  }
  template <bool TWO_M, bool TWO_N>
  LATHE_TAMX static inline void step(const uint8_t* a, int64_t lda, const int8_t* b0, const int8_t* b1) {
    _tile_loadd(4, a, lda);
    if (TWO_M) _tile_loadd(5, a + kTileLines * lda, lda);
    _tile_loadd(6, b0, kLine);
    if (TWO_N) _tile_loadd(7, b1, kLine);
    _tile_dpbusd(0, 4, 6);
    if (TWO_N) _tile_dpbusd(1, 4, 7);
    if (TWO_M) _tile_dpbusd(2, 5, 6);
    if (TWO_M && TWO_N) _tile_dpbusd(3, 5, 7);
  }
  // C tiles into c [32][32] int32 (row stride 128 bytes).
  template <bool TWO_M, bool TWO_N>
  LATHE_TAMX static inline void store(int32_t* c) {
    constexpr int64_t ldc = kBlockN * sizeof(int32_t);
    _tile_stored(0, c, ldc);
    if (TWO_N) _tile_stored(1, c + kCols, ldc);
    if (TWO_M) _tile_stored(2, c + kTileLines * kBlockN, ldc);
    if (TWO_M && TWO_N) _tile_stored(3, c + kTileLines * kBlockN + kCols, ldc);
  }
};

struct Emu {
  static thread_local int32_t C[4][kTileLines][kCols];
  static void begin() {}
  static void end() {}
  // Compiled with the AVX-512 epilogue's target (int8_use_amx asks for avx512_vnni), never AMX.
  template <bool TWO_M, bool TWO_N>
  static void zero() {
    std::memset(C, 0x7f, sizeof(C));  // tiles left unused hold garbage, as on the hardware
    for (int t = 0; t < 4; ++t)
      if ((t & 1 ? TWO_N : true) && (t & 2 ? TWO_M : true)) std::memset(C[t], 0, sizeof(C[t]));
  }
  static void dp(int c, const uint8_t* a, int64_t lda, const int8_t* b) {
    for (int i = 0; i < kTileLines; ++i)
      for (int j = 0; j < kCols; ++j) {
        int32_t s = 0;
        for (int r = 0; r < kTileLines; ++r)
          for (int t = 0; t < 4; ++t) s += int32_t(a[i * lda + 4 * r + t]) * int32_t(b[r * kLine + 4 * j + t]);
        C[c][i][j] += s;
      }
  }
  template <bool TWO_M, bool TWO_N>
  static void step(const uint8_t* a, int64_t lda, const int8_t* b0, const int8_t* b1) {
    dp(0, a, lda, b0);
    if (TWO_N) dp(1, a, lda, b1);
    if (TWO_M) dp(2, a + kTileLines * lda, lda, b0);
    if (TWO_M && TWO_N) dp(3, a + kTileLines * lda, lda, b1);
  }
  template <bool TWO_M, bool TWO_N>
  static void store(int32_t* c) {
    for (int t = 0; t < 4; ++t) {
      if (!((t & 1 ? TWO_N : true) && (t & 2 ? TWO_M : true))) continue;
      for (int i = 0; i < kTileLines; ++i)
        std::memcpy(c + ((t >> 1) * kTileLines + i) * kBlockN + (t & 1) * kCols, C[t][i], sizeof(C[t][i]));
    }
  }
};
thread_local int32_t Emu::C[4][kTileLines][kCols];

// C tiles of one block over all k steps. b0/b1: the B panels (column blocks nb0, nb0 + 1) at
// k step 0, one tile per kTileBytes; the last step, when K is not a multiple of 64, reads the
// zero-padded copies t0/t1 instead (past the panel's end lies the next panel, or nothing).
// cbuf: [32][32] int32.
template <class Ops, bool TWO_M, bool TWO_N>
LATHE_TAMX void block_tiles(const uint8_t* A, int64_t lda, const int8_t* b0, const int8_t* b1, int64_t kfull, int64_t ksteps,
                 const int8_t* t0, const int8_t* t1, int32_t* cbuf) {
  Ops::template zero<TWO_M, TWO_N>();
  for (int64_t ks = 0; ks < ksteps; ++ks) {
    const bool full = ks < kfull;
    Ops::template step<TWO_M, TWO_N>(A + ks * kLine, lda, full ? b0 + ks * kTileBytes : t0,
                                     full ? b1 + ks * kTileBytes : t1);
  }
  Ops::template store<TWO_M, TWO_N>(cbuf);
}

using BlockFn = void (*)(const uint8_t*, int64_t, const int8_t*, const int8_t*, int64_t, int64_t, const int8_t*,
                         const int8_t*, int32_t*);

template <class Ops>
BlockFn pick_block(bool two_m, bool two_n) {
  if (two_m) return two_n ? block_tiles<Ops, true, true> : block_tiles<Ops, true, false>;
  return two_n ? block_tiles<Ops, false, true> : block_tiles<Ops, false, false>;
}

// The VNNI body's epilogue, in the same order: y = cvt(acc - zp * colsum) * ascale * ws + bias.
LATHE_TAMX void epilogue(const int32_t* cbuf, int rows, int64_t n0, int64_t N, const float* ascale,
                         const int32_t* azp, const int32_t* colsum, const float* wsc, const float* bias,
                         float* out, int64_t ldo, int act) {
  for (int v = 0; v < kBlockN / kCols; ++v) {
    const int64_t c0 = n0 + v * kCols;
    if (c0 >= N) break;
    const __mmask16 m = N - c0 >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (N - c0)) - 1);
    const __m512i cs = _mm512_loadu_si512(colsum + c0);
    const __m512 ws = _mm512_maskz_loadu_ps(m, wsc + c0);
    const __m512 bs = bias ? _mm512_maskz_loadu_ps(m, bias + c0) : _mm512_setzero_ps();
    for (int r = 0; r < rows; ++r) {
      const __m512i acc = _mm512_loadu_si512(cbuf + r * kBlockN + v * kCols);
      const __m512i corr = _mm512_mullo_epi32(cs, _mm512_set1_epi32(azp[r]));
      __m512 y = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc, corr));
      y = _mm512_mul_ps(_mm512_mul_ps(y, _mm512_set1_ps(ascale[r])), ws);
      y = _mm512_add_ps(y, bs);
      y = act_avx512(y, act);
      _mm512_mask_storeu_ps(out + r * ldo + c0, m, y);
    }
  }
}

template <class Ops>
void gemm(const uint8_t* A, int64_t lda, const float* ascale, const int32_t* azp, int64_t M, const int8_t* packed,
          int64_t K, const int32_t* colsum, const float* w_scale, const float* bias, int64_t N, float* out,
          int64_t ldo, int act, int nthreads) {
  const int64_t KB = ceil_div(K, 4);                       // packed lines per column block
  const int64_t kfull = KB / kTileLines;                   // whole B tiles down K
  const int64_t ksteps = ceil_div(KB, kTileLines);         // A tile steps (lda >= 64 * ksteps)
  const int tail_lines = static_cast<int>(KB - kfull * kTileLines);
  const int64_t NB = ceil_div(N, kCols);
  const int64_t ngroups = ceil_div(NB, kBlockN / kCols), mtiles = ceil_div(M, kBlockM);
  const int64_t tasks = ngroups * mtiles;
#pragma omp parallel num_threads(std::max(1, nthreads)) if (tasks > 1)
  {
    Ops::begin();
    alignas(64) int32_t cbuf[kBlockM * kBlockN];
    alignas(64) int8_t tail[2][kTileBytes];
    std::memset(tail, 0, sizeof(tail));
    int64_t tail_group = -1;  // the column group whose K tail `tail` holds
    // n-major: a thread walks down the row blocks of one weight panel, which stays in cache.
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t g = t / mtiles, mt = t % mtiles;
      const int64_t nb0 = g * 2, m0 = mt * kBlockM;
      const bool two_n = nb0 + 1 < NB;
      const int rows = static_cast<int>(std::min<int64_t>(kBlockM, M - m0));
      const int8_t* b0 = packed + nb0 * KB * kLine;
      const int8_t* b1 = two_n ? b0 + KB * kLine : b0;
      if (tail_lines && tail_group != g) {
        std::memcpy(tail[0], b0 + kfull * kTileBytes, tail_lines * kLine);
        if (two_n) std::memcpy(tail[1], b1 + kfull * kTileBytes, tail_lines * kLine);
        tail_group = g;
      }
      pick_block<Ops>(rows > kTileLines, two_n)(A + m0 * lda, lda, b0, b1, kfull, ksteps, tail[0], tail[1], cbuf);
      epilogue(cbuf, rows, nb0 * kCols, N, ascale + m0, azp + m0, colsum, w_scale, bias, out + m0 * ldo, ldo,
               act);
    }
    Ops::end();
  }
}

std::atomic<bool> g_emulate{false};

}  // namespace

void amx_emulate(bool on) { g_emulate.store(on); }
bool amx_emulated() { return g_emulate.load(std::memory_order_relaxed); }

bool int8_use_amx(int64_t M) {
  if (M < kAmxMinM) return false;
  const Isa l = active_level();
  return l == Isa::Amx || (amx_emulated() && static_cast<int>(l) >= static_cast<int>(Isa::Avx512Vnni));
}

void int8_gemm_amx(const uint8_t* A, int64_t lda, const float* ascale, const int32_t* azp, int64_t M,
                   const int8_t* packed, int64_t K, const int32_t* colsum, const float* w_scale,
                   const float* bias, int64_t N, float* out, int64_t ldo, int act, int nthreads) {
  check(lda % kAmxKPad == 0 && lda >= K, "int8_gemm_amx: A row stride must be a multiple of 64 and >= K");
  if (amx_emulated()) {
    check(static_cast<int>(active_level()) >= static_cast<int>(Isa::Avx512Vnni),
          "int8_gemm_amx: the emulation runs the AVX-512 epilogue; this level is below avx512_vnni");
    gemm<Emu>(A, lda, ascale, azp, M, packed, K, colsum, w_scale, bias, N, out, ldo, act, nthreads);
    return;
  }
  check(active_level() == Isa::Amx, "int8_gemm_amx: AMX is not the active ISA level");
  gemm<Hw>(A, lda, ascale, azp, M, packed, K, colsum, w_scale, bias, N, out, ldo, act, nthreads);
}

// ---------------------------------------------------------------- peak (for the benchmark)
namespace {
LATHE_TAMX int64_t amx_loop(int64_t iters) {
  alignas(64) int8_t buf[kTileBytes];
  for (int i = 0; i < kTileBytes; ++i) buf[i] = static_cast<int8_t>(i % 7);
  Hw::begin();
  _tile_loadd(4, buf, kLine);
  _tile_loadd(5, buf, kLine);
  _tile_loadd(6, buf, kLine);
  _tile_loadd(7, buf, kLine);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t it = 0; it < iters; ++it) {  // four independent accumulators
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(1, 4, 7);
    _tile_dpbusd(2, 5, 6);
    _tile_dpbusd(3, 5, 7);
  }
  alignas(64) int32_t c[kTileLines * kCols];
  _tile_stored(0, c, kCols * sizeof(int32_t));
  Hw::end();
  return c[0];
}
}  // namespace

double amx_peak_gops(int nthreads) {
  check(best_isa() == Isa::Amx, "amx_peak_gops: this CPU lacks amx_int8 (flags: " + cpu_flags() + ")");
  nthreads = std::max(1, nthreads);
  const int64_t iters = 200'000;
  volatile int64_t sink = 0;
  const double t0 = omp_get_wtime();
#pragma omp parallel num_threads(nthreads)
  { sink += amx_loop(iters); }
  const double dt = omp_get_wtime() - t0;
  // 4 TDPBUSD x (16 x 16 outputs x 64 u8*s8 MACs) x 2 ops each, per iteration, per thread
  return 4.0 * 16 * 16 * 64 * 2 * iters * nthreads / dt / 1e9;
}

}  // namespace lathe
