// Device helpers shared by the kernel files: element types, float conversion, warp and block
// reductions, and the dtype switch that turns a runtime DType into a template argument.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cassert>
#include <cstdint>

#include "kernels.h"

// A condition on an input that a kernel relies on to stay inside its tensors (an index in range).
// The Python ops refuse inputs that break one before launching; a kernel that meets one anyway
// masks the access (reads zeros, stores nothing) and, compiled for a GPU, raises a device-side
// assertion, as PyTorch's own index kernels do (unless built with NDEBUG).
#if defined(__CUDA_ARCH__)
#define FINTEAM_KERNEL_ASSERT(cond) assert(cond)
#else
#define FINTEAM_KERNEL_ASSERT(cond) ((void)0)
#endif

namespace finteam {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// Inclusive prefix sum over the lanes of a warp.
template <typename I>
__device__ __forceinline__ I warp_inclusive_scan(I v) {
  const int lane = threadIdx.x % kWarp;
#pragma unroll
  for (int offset = 1; offset < kWarp; offset *= 2) {
    const I other = __shfl_up_sync(kFullMask, v, offset);
    if (lane >= offset) v += other;
  }
  return v;
}

// Sum over a block of up to 1024 threads, the same tree on every run (deterministic). `shared`
// holds at least 32 floats; the result is returned to every thread.
__device__ __forceinline__ float block_sum(float v, float* shared) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int warps = (blockDim.x + kWarp - 1) / kWarp;
  v = warp_sum(v);
  __syncthreads();  // `shared` may still be read from a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < warps ? shared[lane] : 0.0f;
  return warp_sum(v);
}

// VEC consecutive elements at p, moved in 16-byte accesses when they fill whole ones (p must
// then be 16-byte aligned), else one element at a time.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, T (&v)[VEC]) {
  if constexpr (VEC * sizeof(T) % 16 == 0) {
#pragma unroll
    for (int k = 0; k < static_cast<int>(VEC * sizeof(T) / 16); ++k) {
      const uint4 bits = reinterpret_cast<const uint4*>(p)[k];
      memcpy(reinterpret_cast<char*>(v) + 16 * k, &bits, 16);
    }
  } else {
#pragma unroll
    for (int q = 0; q < VEC; ++q) v[q] = p[q];
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const T (&v)[VEC]) {
  if constexpr (VEC * sizeof(T) % 16 == 0) {
#pragma unroll
    for (int k = 0; k < static_cast<int>(VEC * sizeof(T) / 16); ++k) {
      uint4 bits;
      memcpy(&bits, reinterpret_cast<const char*>(v) + 16 * k, 16);
      reinterpret_cast<uint4*>(p)[k] = bits;
    }
  } else {
#pragma unroll
    for (int q = 0; q < VEC; ++q) p[q] = v[q];
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) % 16) == 0; }

// Calls f(T{}) with T the element type of `dtype`.
template <typename F>
cudaError_t with_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::F32:
      return f(float{});
    case DType::F16:
      return f(__half{});
    case DType::BF16:
      return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// Calls f(I{}) with I the integer type of `id_type`.
template <typename F>
cudaError_t with_id_type(IdType id_type, F&& f) {
  return id_type == IdType::I32 ? f(int32_t{}) : f(int64_t{});
}

}  // namespace finteam
