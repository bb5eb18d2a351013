// Which ISA level the CPU kernels run at, decided once when the library loads.
#include <cstdlib>
#include <string>

#include "common.h"

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

bool avx512_loops() {
  static const bool on = FINTEAM_X86 && level() >= 2;
  return on;
}

}  // namespace finteam::cpu
