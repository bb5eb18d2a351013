// What the CPU kernels share: tensor plumbing, the dtype switch, and runtime ISA dispatch.
//
// Shape legend: T tokens, H hidden, I expert intermediate, E experts, K top-k, N = T*K routed
// rows; D and O are a GEMM's input and output widths.
//
// Vectorisation without -march=native: loops over float arrays are written so the compiler
// vectorises them, and marked FINTEAM_SIMD, which builds one clone per ISA level (AVX-512,
// AVX2, baseline) and picks one when the library loads. The hand-written AVX-512 kernels
// (dot_bf16.h) check `isa_name()` and leave the work to ATen where they cannot run.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <atomic>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>

// Helpers called from FINTEAM_SIMD kernels must be inlined into each clone to be vectorised
// for its ISA; `inline` alone lets the compiler keep one baseline copy.
#if defined(__GNUC__)
#define FINTEAM_INLINE inline __attribute__((always_inline))
#else
#define FINTEAM_INLINE inline
#endif

// Clones by ISA level ("arch=x86-64-v4") and the AVX512-BF16/AMX intrinsics need GCC 11 or
// clang 14; older compilers build the portable code only.
#if defined(__clang__)
#define FINTEAM_NEW_COMPILER (__clang_major__ >= 14)
#elif defined(__GNUC__)
#define FINTEAM_NEW_COMPILER (__GNUC__ >= 11)
#else
#define FINTEAM_NEW_COMPILER 0
#endif

#if FINTEAM_NEW_COMPILER && defined(__x86_64__) && defined(__ELF__) && !defined(FINTEAM_NO_CLONES)
#define FINTEAM_SIMD __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define FINTEAM_X86 1
#else
#define FINTEAM_SIMD
#define FINTEAM_X86 0
#endif

// Hand-written kernels for one ISA (intrinsics), called only where the CPU has it.
#if FINTEAM_X86
#define FINTEAM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define FINTEAM_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512bf16")))
#define FINTEAM_AVX2 __attribute__((target("avx2,fma")))
// A helper inlined into such kernels, compiled for the same ISA.
#define FINTEAM_AVX512_LOOP FINTEAM_AVX512 __attribute__((always_inline)) inline
#endif

namespace finteam::cpu {

// The ISA level the kernels run at: "avx512_bf16", "avx512", "avx2" or "baseline". The
// environment variable FINTEAM_CPU_ISA can lower it (to test the fallbacks), never raise it.
const std::string& isa_name();

// The CPU's vendor and, on AMD, its family (0x19 Zen 3/4, 0x1A Zen 5; 0 elsewhere), from cpuid:
// a few kernel choices depend on the microarchitecture, not only on the ISA level.
bool intel_cpu();
int amd_family();

// Whether the hand-vectorised AVX-512 loops (vmath512.h) run: an AVX-512 CPU, unless
// FINTEAM_CPU_ISA lowers the level.
bool avx512_loops();

// fn.template operator()<R>(first) over [first, end) in blocks of R rows, the leftover in the
// largest smaller blocks: a register-blocked kernel's rows (tile_f32, gemm_f32).
template <int R, typename Fn>
inline void in_blocks(int64_t first, int64_t end, Fn&& fn) {
  for (; first + R <= end; first += R) fn.template operator()<R>(first);
  if constexpr (R > 1) {
    if (first < end) in_blocks<R - 1>(first, end, fn);
  }
}

// Rows handed to one thread at a time: big enough to amortise the fork, small enough to balance.
inline int64_t grain(int64_t work_per_item, int64_t target = 1 << 14) {
  return std::max<int64_t>(1, target / std::max<int64_t>(1, work_per_item));
}

// Runs body(task) for every task in [0, n) on the intra-op threads (`setup()` makes each
// thread's scratch first). Thread t owns an equal run of consecutive tasks and takes them in
// order, so that its next task's weight rows follow the ones it is reading (and prefetching):
// tasks dealt to the threads in turn made every task start cold, and the bf16 experts at T = 1
// to 16 took 2-11% longer (2-core AMD EPYC, interleaved A/B). A thread done with its own run
// takes the rest of the others' one task at a time: on a shared machine a thread that is
// descheduled delays a task or two, not a fixed share of them.
template <typename Setup, typename Body>
void parallel_tasks(int64_t n, const Setup& setup, const Body& body) {
  struct alignas(64) Run {  // a cache line each: the threads' counters do not share one
    std::atomic<int64_t> next;
    int64_t end;
  };
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  std::unique_ptr<Run[]> runs(new Run[threads]);
  for (int64_t t = 0; t < threads; ++t) {
    runs[t].next = t * n / threads;
    runs[t].end = (t + 1) * n / threads;
  }
  at::parallel_for(0, threads, 1, [&](int64_t first, int64_t) {
    auto scratch = setup();
    for (int64_t k = 0; k < threads; ++k) {
      Run& run = runs[(first + k) % threads];
      for (int64_t task = run.next++; task < run.end; task = run.next++) body(task, scratch);
    }
  });
}

// A tensor whose innermost dimension is dense (row strides are kept, so a view with a huge row
// stride is read in place); anything else is copied once.
inline at::Tensor rows_dense(const at::Tensor& t) {
  return t.dim() >= 1 && t.size(-1) > 1 && t.stride(-1) != 1 ? t.contiguous() : t;
}

// Index tensors as int64 or int32 are read through this.
struct IndexView {
  const void* data;
  bool wide;
  FINTEAM_INLINE int64_t operator[](int64_t i) const {
    return wide ? static_cast<const int64_t*>(data)[i] : static_cast<const int32_t*>(data)[i];
  }
};

inline IndexView index_view(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong,
              "finteam cpu: index tensors must be int32 or int64, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "finteam cpu: index tensors must be contiguous");
  return {t.data_ptr(), t.scalar_type() == at::kLong};
}

// fp32 math for 16-bit inputs; fp64 stays fp64 (so the spec's fp64 checks hold here too).
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// The dtype an op accumulates in (and returns routing weights in): fp64 for fp64, else fp32.
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

template <typename acc_t>
constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
template <typename acc_t>
constexpr acc_t kMax = std::numeric_limits<acc_t>::max();

}  // namespace finteam::cpu

// The floating dtypes every op accepts.
#define FINTEAM_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)
