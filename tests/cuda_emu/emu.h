// A CPU stand-in for the CUDA execution model, so that the kernel bodies in csrc/cuda/*.cu run
// on a machine without a GPU (tests/test_cuda_emulated.py).
//
// Force-included before a kernel file, which is compiled as C++ after one rewrite: each launch
// `kernel<<<grid, block, smem, stream>>>(args)` becomes `finteam_emu::launch(kernel, {grid, block,
// smem, stream})(args)`, and `extern __shared__ T name[]` becomes a pointer to the block's
// dynamic shared memory. Then:
//   * every CUDA thread is an OS thread; the blocks of a grid run one after another, so a
//     function-level `static` (what `__shared__` becomes) is exactly one block's shared memory;
//   * __syncthreads and __syncwarp are barriers; a thread that returns drops out of them, as on
//     a GPU; warp shuffles, votes and __match_any_sync exchange values through the warp;
//   * WMMA fragments hold their whole 16x16 tile in every lane (the documented semantics of
//     load/store/mma, not the register layout), with fp32 products and sums;
//   * launches check the limits a GPU enforces: block size, grid y/z, 48 KB of dynamic shared
//     memory without opt-in; shared memory starts as NaN bytes, so reads before writes show.
// What this cannot show: races that only real concurrency exposes, the memory model, speed.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

#define __CUDA_MMA_H__  // the emulated WMMA below replaces <mma.h>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __forceinline__ inline
#define __launch_bounds__(...)

// Device code calls the float classification functions unqualified, as CUDA's math headers allow.
using std::isfinite;
using std::isinf;
using std::isnan;

namespace finteam_emu {

struct ThreadContext {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};
ThreadContext& ctx();

void sync_threads();
void sync_warp();
uint64_t warp_exchange(uint64_t value, int source_lane);  // every lane gets `value` of source_lane
uint64_t warp_gather(uint64_t value, uint64_t* all);      // every lane gets all 32 lanes' values
void* dynamic_shared();

struct Config {
  Config(dim3 grid, dim3 block, size_t shared_bytes = 0, cudaStream_t = nullptr)
      : grid(grid), block(block), shared_bytes(shared_bytes) {}
  dim3 grid, block;
  size_t shared_bytes;
};
void run_grid(const Config& config, const std::function<void()>& body);

template <typename... P>
auto launch(void (*kernel)(P...), Config config) {
  return [kernel, config](auto&&... args) { run_grid(config, [&] { kernel(args...); }); };
}

template <typename T>
uint64_t to_bits(T v) {
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}
template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

}  // namespace finteam_emu

#define threadIdx (finteam_emu::ctx().thread_idx)
#define blockIdx (finteam_emu::ctx().block_idx)
#define blockDim (finteam_emu::ctx().block_dim)
#define gridDim (finteam_emu::ctx().grid_dim)

inline void __syncthreads() { finteam_emu::sync_threads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { finteam_emu::sync_warp(); }

inline int emu_lane() { return static_cast<int>(threadIdx.x % 32); }

template <typename T>
T __shfl_sync(unsigned, T v, int src) {
  return finteam_emu::from_bits<T>(finteam_emu::warp_exchange(finteam_emu::to_bits(v), src & 31));
}
template <typename T>
T __shfl_xor_sync(unsigned, T v, int mask) {
  return finteam_emu::from_bits<T>(finteam_emu::warp_exchange(finteam_emu::to_bits(v), emu_lane() ^ mask));
}
template <typename T>
T __shfl_up_sync(unsigned, T v, unsigned delta) {
  const int src = emu_lane() - static_cast<int>(delta);
  const T other = finteam_emu::from_bits<T>(finteam_emu::warp_exchange(finteam_emu::to_bits(v), src < 0 ? 0 : src));
  return src < 0 ? v : other;
}
inline unsigned __ballot_sync(unsigned, int pred) {
  uint64_t all[32];
  finteam_emu::warp_gather(pred ? 1 : 0, all);
  unsigned bits = 0;
  for (int i = 0; i < 32; ++i) bits |= static_cast<unsigned>(all[i]) << i;
  return bits;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
template <typename T>
unsigned __match_any_sync(unsigned, T value) {
  uint64_t all[32];
  const uint64_t mine = finteam_emu::warp_gather(finteam_emu::to_bits(value), all);
  unsigned bits = 0;
  for (int i = 0; i < 32; ++i) bits |= (all[i] == mine ? 1u : 0u) << i;
  return bits;
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline float __fdividef(float a, float b) { return a / b; }
template <typename T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}

namespace nvcuda::wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

// The whole 16x16 tile, element (r, c) at v[r * 16 + c]: for matrix_a (m, k), matrix_b (k, n),
// the accumulator (m, n).
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  float v[256];
};

template <typename Use, typename T, typename Layout>
void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, float value) {
  for (float& x : f.v) x = value;
}

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) {
      const T x = std::is_same_v<Layout, row_major> ? p[r * ldm + c] : p[r + c * ldm];
      f.v[r * 16 + c] = static_cast<float>(x);
    }
}

template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[256];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float acc = c.v[m * 16 + n];
      for (int k = 0; k < 16; ++k) acc += a.v[m * 16 + k] * b.v[k * 16 + n];
      out[m * 16 + n] = acc;
    }
  std::memcpy(d.v, out, sizeof(out));
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  finteam_emu::sync_warp();  // every lane writes the same tile: let no lane still be reading it
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) (layout == mem_row_major ? p[r * ldm + c] : p[r + c * ldm]) = f.v[r * 16 + c];
  finteam_emu::sync_warp();
}

}  // namespace nvcuda::wmma
