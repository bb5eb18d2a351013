// Kernels that move whole rows: the gather behind permute (and unpermute's backward), the K-way
// combine behind unpermute (and permute's backward), and the row dot products that give the
// routing weights' gradient.
//
// Shape legend: T tokens, H hidden, K top-k, N = T*K routed rows.
//
// All three are memory-bound: one read of every element used and one write of every element
// produced. Rows move in 16-byte vectors when the row is contiguous and 16-byte aligned (any
// stride otherwise, stride 0 included, one element at a time). Row indices are int64 before
// they multiply a stride. The combine and the dots reduce in fp32 in a fixed order (no atomics),
// so results are the same on every run. Every index is checked against its range (slots and
// rows in [0, N)): one out of range reads as zeros (common.cuh FINTEAM_KERNEL_ASSERT).
#include "common.cuh"

namespace finteam {
namespace {

constexpr int kMaxThreads = 256;
constexpr int kDotWarps = 8;

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    gather_rows_kernel(const T* __restrict__ src, int64_t stride_row, int64_t stride_col,
                       const int32_t* __restrict__ index, int64_t index_div, const float* __restrict__ scale, int64_t H,
                       T* __restrict__ out) {
  const int64_t r = blockIdx.x;
  const int64_t slot = index[r];
  const bool ok = slot >= 0 && slot < gridDim.x;  // slots lie in [0, N), one row each
  FINTEAM_KERNEL_ASSERT(ok);
  const T* src_row = src + (ok ? slot / index_div : 0) * stride_row;
  T* out_row = out + r * H;
  const float factor = !ok ? 0.0f : scale != nullptr ? scale[slot] : 1.0f;
  for (int64_t c = threadIdx.x * static_cast<int64_t>(VEC); c < H; c += blockDim.x * static_cast<int64_t>(VEC)) {
    T x[VEC];
    if (ok) {
      load_vec(src_row + c * stride_col, x);
    } else {
#pragma unroll
      for (int q = 0; q < VEC; ++q) x[q] = from_f32<T>(0.0f);
    }
    if (scale != nullptr) {
#pragma unroll
      for (int q = 0; q < VEC; ++q) x[q] = from_f32<T>(to_f32(x[q]) * factor);
    }
    store_vec(out_row + c, x);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    combine_rows_kernel(const T* __restrict__ src, int64_t stride_row, int64_t stride_col,
                        const int32_t* __restrict__ index, const float* __restrict__ weight, int64_t K, int64_t H,
                        T* __restrict__ out) {
  const int64_t t = blockIdx.x;
  T* out_row = out + t * H;
  const int32_t* rows = index + t * K;
  const float* weights = weight != nullptr ? weight + t * K : nullptr;
  const int64_t N = static_cast<int64_t>(gridDim.x) * K;  // rows lie in [0, T*K)
  for (int64_t c = threadIdx.x * static_cast<int64_t>(VEC); c < H; c += blockDim.x * static_cast<int64_t>(VEC)) {
    float acc[VEC];
#pragma unroll
    for (int q = 0; q < VEC; ++q) acc[q] = 0.0f;
    for (int j = 0; j < K; ++j) {
      const bool ok = rows[j] >= 0 && rows[j] < N;
      FINTEAM_KERNEL_ASSERT(ok);
      if (!ok) continue;
      const float w = weights != nullptr ? weights[j] : 1.0f;
      T x[VEC];
      load_vec(src + rows[j] * stride_row + c * stride_col, x);
#pragma unroll
      for (int q = 0; q < VEC; ++q) acc[q] += to_f32(x[q]) * w;
    }
    T y[VEC];
#pragma unroll
    for (int q = 0; q < VEC; ++q) y[q] = from_f32<T>(acc[q]);
    store_vec(out_row + c, y);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kDotWarps* kWarp)
    row_dots_kernel(const T* __restrict__ a, int64_t stride_a_row, int64_t stride_a_col, const T* __restrict__ b,
                    int64_t stride_b_row, int64_t stride_b_col, const int32_t* __restrict__ index, int64_t N, int64_t K,
                    int64_t H, float* __restrict__ dot) {
  const int64_t s = static_cast<int64_t>(blockIdx.x) * kDotWarps + threadIdx.x / kWarp;
  if (s >= N) return;
  const bool ok = index[s] >= 0 && index[s] < N;  // rows lie in [0, N); the same for the whole warp
  FINTEAM_KERNEL_ASSERT(ok);
  if (!ok) {
    if (threadIdx.x % kWarp == 0) dot[s] = 0.0f;
    return;
  }
  const T* a_row = a + (s / K) * stride_a_row;
  const T* b_row = b + static_cast<int64_t>(index[s]) * stride_b_row;
  float acc = 0.0f;
  for (int64_t c = (threadIdx.x % kWarp) * static_cast<int64_t>(VEC); c < H; c += kWarp * static_cast<int64_t>(VEC)) {
    T x[VEC], y[VEC];
    load_vec(a_row + c * stride_a_col, x);
    load_vec(b_row + c * stride_b_col, y);
#pragma unroll
    for (int q = 0; q < VEC; ++q) acc += to_f32(x[q]) * to_f32(y[q]);
  }
  acc = warp_sum(acc);
  if (threadIdx.x % kWarp == 0) dot[s] = acc;
}

// A row can move in 16-byte vectors: unit column stride, and every row start 16-byte aligned.
template <typename T>
bool vectorizable(const void* base, int64_t stride_row, int64_t stride_col, int64_t H) {
  constexpr int64_t vec = 16 / sizeof(T);
  return stride_col == 1 && stride_row % vec == 0 && H % vec == 0 && aligned16(base);
}

int threads_for(int64_t H, int64_t vec) {
  const int64_t needed = ceil_div(ceil_div(H, vec), kWarp) * kWarp;
  return static_cast<int>(needed < kWarp ? kWarp : needed < kMaxThreads ? needed : kMaxThreads);
}

}  // namespace

cudaError_t gather_rows(const void* src, DType dtype, int64_t stride_row, int64_t stride_col, const int32_t* index,
                        int64_t index_div, const float* scale, int64_t rows, int64_t H, void* out,
                        cudaStream_t stream) {
  if (rows == 0 || H == 0) return cudaSuccess;
  return with_dtype(dtype, [&](auto tag) {
    using Elem = decltype(tag);
    constexpr int vec = 16 / sizeof(Elem);
    const Elem* s = static_cast<const Elem*>(src);
    Elem* o = static_cast<Elem*>(out);
    if (vectorizable<Elem>(src, stride_row, stride_col, H) && aligned16(out))
      gather_rows_kernel<Elem, vec><<<static_cast<unsigned>(rows), threads_for(H, vec), 0, stream>>>(
          s, stride_row, stride_col, index, index_div, scale, H, o);
    else
      gather_rows_kernel<Elem, 1><<<static_cast<unsigned>(rows), threads_for(H, 1), 0, stream>>>(
          s, stride_row, stride_col, index, index_div, scale, H, o);
    return cudaGetLastError();
  });
}

cudaError_t combine_rows(const void* src, DType dtype, int64_t stride_row, int64_t stride_col, const int32_t* index,
                         const float* weight, int64_t T, int64_t K, int64_t H, void* out, cudaStream_t stream) {
  if (T == 0 || H == 0) return cudaSuccess;
  return with_dtype(dtype, [&](auto tag) {
    using Elem = decltype(tag);
    constexpr int vec = 16 / sizeof(Elem);
    const Elem* s = static_cast<const Elem*>(src);
    Elem* o = static_cast<Elem*>(out);
    if (vectorizable<Elem>(src, stride_row, stride_col, H) && aligned16(out))
      combine_rows_kernel<Elem, vec><<<static_cast<unsigned>(T), threads_for(H, vec), 0, stream>>>(
          s, stride_row, stride_col, index, weight, K, H, o);
    else
      combine_rows_kernel<Elem, 1><<<static_cast<unsigned>(T), threads_for(H, 1), 0, stream>>>(
          s, stride_row, stride_col, index, weight, K, H, o);
    return cudaGetLastError();
  });
}

cudaError_t row_dots(const void* a, int64_t stride_a_row, int64_t stride_a_col, const void* b, int64_t stride_b_row,
                     int64_t stride_b_col, DType dtype, const int32_t* index, int64_t T, int64_t K, int64_t H,
                     float* dot, cudaStream_t stream) {
  const int64_t N = T * K;
  if (N == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(ceil_div(N, kDotWarps));
  return with_dtype(dtype, [&](auto tag) {
    using Elem = decltype(tag);
    constexpr int vec = 16 / sizeof(Elem);
    const Elem* pa = static_cast<const Elem*>(a);
    const Elem* pb = static_cast<const Elem*>(b);
    if (vectorizable<Elem>(a, stride_a_row, stride_a_col, H) && vectorizable<Elem>(b, stride_b_row, stride_b_col, H))
      row_dots_kernel<Elem, vec><<<blocks, kDotWarps * kWarp, 0, stream>>>(
          pa, stride_a_row, stride_a_col, pb, stride_b_row, stride_b_col, index, N, K, H, dot);
    else
      row_dots_kernel<Elem, 1><<<blocks, kDotWarps * kWarp, 0, stream>>>(
          pa, stride_a_row, stride_a_col, pb, stride_b_row, stride_b_col, index, N, K, H, dot);
    return cudaGetLastError();
  });
}

}  // namespace finteam
