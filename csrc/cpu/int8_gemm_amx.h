// AMX-INT8 body of the W8A8 linear (int8_gemm.h): TDPBUSD on 16 x 64-byte tiles, chosen by
// int8_linear when lathe::active_level() is Isa::Amx and M >= kAmxMinM.
//
// Weights: the VNNI packing of int8_pack_weight is already the AMX B-tile layout. One packed
// 64-byte line holds 4 consecutive k (one int32 of a tile row) for 16 output channels, and a
// column block's lines run down K contiguously, so 16 consecutive lines (1 KiB, row stride
// 64 bytes) are one B tile: K x N = 64 x 16. No second copy of the weights is packed.
// Activations: int8_linear quantizes each row to u8 codes straight into a buffer whose row
// stride lda is K rounded up to 64 and whose row count is M rounded up to 32, so every A tile
// (16 rows x 64 codes) is one strided tile load from it.
#pragma once
#include <cstdint>

namespace lathe {

// Below this many rows the VNNI body runs instead. UNMEASURED: this machine has no AMX; 16 is
// where an A tile is full. Measure the crossover on an AMX machine (bench/kernels.py) and set it.
constexpr int64_t kAmxMinM = 16;
constexpr int64_t kAmxRowPad = 32;  // rows of the quantized A buffer are a multiple of this
constexpr int64_t kAmxKPad = 64;    // its row stride is a multiple of this

// A: u8 codes [round_up(M, 32)][lda], lda % 64 == 0, lda >= K (rows >= M and codes >= K may
// hold anything: they meet zero weights or are never stored). ascale/azp [M]: the per-row
// quantization. packed/colsum: int8_pack_weight's output for (N, K). Epilogue as the VNNI
// body's: (acc - azp * colsum) * ascale * w_scale + bias, then act (0 none, 1 gelu, 2 silu).
void int8_gemm_amx(const uint8_t* A, int64_t lda, const float* ascale, const int32_t* azp, int64_t M,
                   const int8_t* packed, int64_t K, const int32_t* colsum, const float* w_scale,
                   const float* bias, int64_t N, float* out, int64_t ldo, int act, int nthreads);

// Whether int8_linear takes this body for M rows: the active level is amx (or the emulation is
// on and the level is at least avx512_vnni) and M >= kAmxMinM.
bool int8_use_amx(int64_t M);

// Tests only: run the same blocking with the tile operations emulated in C++ (exact integer
// semantics of TDPBUSD), so the AMX driver is checked on CPUs without AMX. Off by default.
void amx_emulate(bool on);
bool amx_emulated();

// The machine's AMX int8 peak (GOP/s): TDPBUSD on four accumulator tiles, no memory traffic.
// Throws where the CPU has no AMX.
double amx_peak_gops(int nthreads);

}  // namespace lathe
