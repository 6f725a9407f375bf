// Run-time choice of the CPU instruction set. The build never uses -march=native: each kernel
// body carries its own target attribute and the dispatcher picks one at run time.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

namespace lathe {

enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512Vnni = 2 };

Isa best_isa();                 // what this CPU supports
Isa active_isa();               // what kernels use now (best, unless forced lower)
void force_isa(int isa);        // -1 resets to best; a level above best_isa() throws
const char* isa_name(Isa isa);

inline void check(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

}  // namespace lathe
