#include "cpu/isa.h"

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace lathe {
namespace {

// arch_prctl codes (asm/prctl.h; spelled out so older headers build).
constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;

struct Features {
  bool avx2 = false, fma = false, f = false, bw = false, vl = false, dq = false, vnni = false;
  bool bf16 = false, amx_tile = false, amx_int8 = false, amx_bf16 = false;
  bool xtile_os = false;    // XCR0 bits 17 (XTILECFG) and 18 (XTILEDATA) enabled by the OS
  bool xtile_perm = false;  // arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) granted
};

uint64_t xgetbv0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

Features probe() {
  Features F;
  __builtin_cpu_init();
  F.avx2 = __builtin_cpu_supports("avx2");
  F.fma = __builtin_cpu_supports("fma");
  F.f = __builtin_cpu_supports("avx512f");
  F.bw = __builtin_cpu_supports("avx512bw");
  F.vl = __builtin_cpu_supports("avx512vl");
  F.dq = __builtin_cpu_supports("avx512dq");
  F.vnni = __builtin_cpu_supports("avx512vnni");
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return F;  // no OSXSAVE: no xgetbv
  const uint64_t xcr0 = xgetbv0();
  const bool zmm_os = (xcr0 & 0xE6) == 0xE6;  // SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM state
  if (__get_cpuid_count(7, 1, &a, &b, &c, &d)) F.bf16 = zmm_os && F.f && (a & (1u << 5));
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
    F.amx_bf16 = d & (1u << 22);
    F.amx_tile = d & (1u << 24);
    F.amx_int8 = d & (1u << 25);
  }
  F.xtile_os = (xcr0 & (3ull << 17)) == (3ull << 17);
  if (F.amx_tile && F.xtile_os)  // Linux keeps tile data off until a process asks, once
    F.xtile_perm = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return F;
}

const Features& features() {
  static const Features F = probe();
  return F;
}

Isa detect() {
  const Features& F = features();
  if (!(F.avx2 && F.fma)) return Isa::Scalar;
  if (!(F.f && F.bw && F.vl && F.dq && F.vnni)) return Isa::Avx2;
  if (!F.bf16) return Isa::Avx512Vnni;
  if (!(F.amx_tile && F.amx_int8 && F.amx_bf16 && F.xtile_os && F.xtile_perm)) return Isa::Avx512Bf16;
  return Isa::Amx;
}

// LATHE_ISA values; "avx512" is the historical name of avx512_vnni.
struct EnvName {
  const char* name;
  Isa isa;
};
constexpr EnvName kEnvNames[] = {{"scalar", Isa::Scalar},          {"avx2", Isa::Avx2},
                                 {"avx512", Isa::Avx512Vnni},      {"avx512_vnni", Isa::Avx512Vnni},
                                 {"avx512_bf16", Isa::Avx512Bf16}, {"avx512bf16", Isa::Avx512Bf16},
                                 {"amx", Isa::Amx}};

std::string accepted_names() {
  std::string s;
  for (const auto& e : kEnvNames) s += std::string(s.empty() ? "" : ", ") + e.name;
  return s;
}

// What the CPU misses for a level, e.g. "amx_int8" (the first missing piece).
std::string missing_for(Isa want) {
  const Features& F = features();
  if (!(F.avx2 && F.fma)) return "avx2";
  if (want == Isa::Avx2) return "";
  if (!(F.f && F.bw && F.vl && F.dq)) return "avx512f/bw/vl/dq";
  if (!F.vnni) return "avx512_vnni";
  if (want == Isa::Avx512Vnni) return "";
  if (!F.bf16) return "avx512_bf16";
  if (want == Isa::Avx512Bf16) return "";
  if (!F.amx_int8) return "amx_int8";
  if (!F.amx_tile) return "amx_tile";
  if (!F.amx_bf16) return "amx_bf16";
  if (!F.xtile_os) return "amx tile state in XCR0 (bits 17/18, OS support)";
  if (!F.xtile_perm) return "amx tile data permission (arch_prctl ARCH_REQ_XCOMP_PERM refused)";
  return "";
}

std::string lacks_msg(Isa want) {
  return std::string("this CPU lacks ") + missing_for(want) + ", needed for ISA level " + isa_name(want) +
         " (best is " + isa_name(best_isa()) + "; flags: " + cpu_flags() + ")";
}

// The level LATHE_ISA asks for, the best level when it is unset; err is set when it is invalid.
Isa from_env(std::string& err) {
  const char* env = std::getenv("LATHE_ISA");
  if (!env || !*env) return best_isa();
  for (const auto& e : kEnvNames) {
    if (std::strcmp(env, e.name)) continue;
    if (static_cast<int>(e.isa) > static_cast<int>(best_isa())) err = std::string("LATHE_ISA=") + env + ": " + lacks_msg(e.isa);
    return e.isa;
  }
  err = std::string("LATHE_ISA=") + env + " is not an ISA level: expected one of " + accepted_names();
  return best_isa();
}

std::atomic<int> g_active{-1};

int from_env_checked() {
  std::string err;
  const Isa isa = from_env(err);
  check(err.empty(), err);
  return static_cast<int>(isa);
}

}  // namespace

Isa best_isa() {
  static const Isa best = detect();
  return best;
}

Isa active_level() {
  int v = g_active.load(std::memory_order_relaxed);
  if (v < 0) {  // a bad LATHE_ISA throws on every call, never silently runs another path
    v = from_env_checked();
    g_active.store(v);
  }
  return static_cast<Isa>(v);
}

Isa active_isa() {
  const Isa l = active_level();
  return static_cast<int>(l) > static_cast<int>(Isa::Avx512Vnni) ? Isa::Avx512Vnni : l;
}

void force_isa(int isa) {
  if (isa < 0) {
    g_active.store(from_env_checked());
    return;
  }
  check(isa < kIsaLevels, "force_isa: level " + std::to_string(isa) + " out of range 0.." +
                              std::to_string(kIsaLevels - 1));
  check(isa <= static_cast<int>(best_isa()), lacks_msg(static_cast<Isa>(isa)));
  g_active.store(isa);
}

std::string isa_env_error() {
  std::string err;
  from_env(err);
  return err;
}

std::string cpu_flags() {
  const Features& F = features();
  const struct {
    bool on;
    const char* name;
  } all[] = {{F.avx2, "avx2"},         {F.fma, "fma"},           {F.f, "avx512f"},
             {F.bw, "avx512bw"},       {F.vl, "avx512vl"},       {F.dq, "avx512dq"},
             {F.vnni, "avx512_vnni"},  {F.bf16, "avx512_bf16"},  {F.amx_tile, "amx_tile"},
             {F.amx_int8, "amx_int8"}, {F.amx_bf16, "amx_bf16"}};
  std::string s;
  for (const auto& e : all)
    if (e.on) s += std::string(s.empty() ? "" : " ") + e.name;
  if (F.amx_tile && !(F.xtile_os && F.xtile_perm)) s += " (amx tile state not granted by the OS)";
  return s.empty() ? "none" : s;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return "scalar";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512Vnni: return "avx512_vnni";
    case Isa::Avx512Bf16: return "avx512_bf16";
    case Isa::Amx: return "amx";
  }
  return "unknown";
}

}  // namespace lathe
