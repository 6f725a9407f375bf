#include "cpu/isa.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace lathe {
namespace {

Isa detect() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
    return Isa::Avx512Vnni;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
  return Isa::Scalar;
}

Isa from_env(Isa best) {
  // LATHE_ISA=scalar|avx2|avx512 caps the level for the whole process (tests use force_isa).
  const char* env = std::getenv("LATHE_ISA");
  if (!env || !*env) return best;
  Isa want = best;
  if (!std::strcmp(env, "scalar")) want = Isa::Scalar;
  else if (!std::strcmp(env, "avx2")) want = Isa::Avx2;
  else if (!std::strcmp(env, "avx512")) want = Isa::Avx512Vnni;
  return static_cast<int>(want) < static_cast<int>(best) ? want : best;
}

std::atomic<int> g_active{-1};

}  // namespace

Isa best_isa() {
  static const Isa best = detect();
  return best;
}

Isa active_isa() {
  int v = g_active.load(std::memory_order_relaxed);
  if (v < 0) {
    v = static_cast<int>(from_env(best_isa()));
    g_active.store(v);
  }
  return static_cast<Isa>(v);
}

void force_isa(int isa) {
  if (isa < 0) {
    g_active.store(static_cast<int>(from_env(best_isa())));
    return;
  }
  check(isa <= static_cast<int>(best_isa()),
        std::string("this CPU does not support ISA level ") + isa_name(static_cast<Isa>(isa)) +
            " (best is " + isa_name(best_isa()) + ")");
  g_active.store(isa);
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return "scalar";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512Vnni: return "avx512_vnni";
  }
  return "unknown";
}

}  // namespace lathe
