// Which ISA level the CPU kernels run at, decided once when the library loads.
#include <cstdlib>
#include <string>

#include "common.h"

#if FINTEAM_X86
#include <cpuid.h>
#endif

namespace finteam::cpu {
namespace {

int detected_level() {
#if FINTEAM_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
    return __builtin_cpu_supports("avx512bf16") ? 3 : 2;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
  return 0;
}

constexpr const char* kNames[] = {"baseline", "avx2", "avx512", "avx512_bf16"};

int level() {
  static const int chosen = [] {
    int found = detected_level();
    if (const char* wanted = std::getenv("FINTEAM_CPU_ISA")) {
      for (int i = 0; i < found; ++i) {
        if (std::string(wanted) == kNames[i]) return i;
      }
    }
    return found;
  }();
  return chosen;
}

}  // namespace

const std::string& isa_name() {
  static const std::string name = kNames[level()];
  return name;
}

#if FINTEAM_X86
// The vendor from the same cpu model that __builtin_cpu_supports reads (detected_level); the
// family from cpuid leaf 1, whose extended family GCC names only in newer releases (Zen 5).
bool intel_cpu() {
  __builtin_cpu_init();
  return __builtin_cpu_is("intel");
}

int amd_family() {
  static const int family = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_is("amd")) return 0;
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    const unsigned base = (a >> 8) & 0xF;
    return static_cast<int>(base == 0xF ? base + ((a >> 20) & 0xFF) : base);
  }();
  return family;
}
#else
bool intel_cpu() { return false; }
int amd_family() { return 0; }
#endif

bool avx512_loops() {
  static const bool on = FINTEAM_X86 && level() >= 2;
  return on;
}

}  // namespace finteam::cpu
