// Run-time choice of the CPU instruction set. The build never uses -march=native: each kernel
// body carries its own target attribute and the dispatcher picks one at run time.
//
// Levels form a ladder; each includes the ones below it:
//   scalar < avx2 (+fma) < avx512_vnni (f/bw/vl/dq + VNNI) < avx512_bf16 (+ VDPBF16PS)
//          < amx (AMX-TILE, AMX-INT8, AMX-BF16, with tile state granted by the OS).
// The generic kernel bodies know scalar/avx2/avx512_vnni and ask active_isa(), which is the
// active level capped at avx512_vnni; kernels with bodies for the higher levels ask
// active_level().
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

namespace lathe {

enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512Vnni = 2, Avx512Bf16 = 3, Amx = 4 };
constexpr int kIsaLevels = 5;

Isa best_isa();                 // the highest level this CPU (and OS) supports
Isa active_level();             // the level kernels use now (best, unless forced lower)
Isa active_isa();               // active_level() capped at Avx512Vnni (the generic bodies)
// -1 resets to LATHE_ISA or the best; a level above best_isa() throws naming the CPU's flags.
void force_isa(int isa);
const char* isa_name(Isa isa);
// The ISA-relevant CPU flags found, space separated (for messages and test skips), e.g.
// "avx2 fma avx512f avx512bw avx512vl avx512dq avx512_vnni avx512_bf16".
std::string cpu_flags();
// Empty when LATHE_ISA is unset or valid for this CPU, else the one-line error it causes.
std::string isa_env_error();

inline void check(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

}  // namespace lathe
