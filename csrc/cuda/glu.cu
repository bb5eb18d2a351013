// The gated unit of an expert (SwiGLU, GeGLU with erf or tanh), forward and backward.
//
// Shape legend: N routed rows, I expert intermediate; h_N2I = [gate | up] is the gate/up GEMM's
// output, a_NI = act(gate) * up the down GEMM's input.
//
// Both are one block per row, memory-bound: the forward reads h once and writes a once; the
// backward reads h and the incoming gradient once, writes dh once, and reduces the row's
// routing-weight gradient in a fixed order. The activation is recomputed from h in the
// backward instead of being kept from the forward. Math in fp32, rounded once on store.
#include "common.cuh"

namespace finteam {
namespace {

constexpr int kMaxThreads = 256;
constexpr float kSqrtHalf = 0.70710678118654752f;    // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143268f;  // 1 / sqrt(2 pi)
constexpr float kTanhBeta = 0.79788456080286536f;    // sqrt(2 / pi)
constexpr float kTanhKappa = 0.044715f;

// act(g) and, when wanted, act'(g).
template <bool GRAD>
__device__ __forceinline__ float activation(float g, Act act, float* slope) {
  if (act == Act::SiLU) {
    const float s = __fdividef(1.0f, 1.0f + expf(-g));
    if (GRAD) *slope = s * (1.0f + g * (1.0f - s));
    return g * s;
  }
  if (act == Act::GeLU) {
    const float cdf = 0.5f * (1.0f + erff(g * kSqrtHalf));
    if (GRAD) *slope = cdf + g * kInvSqrt2Pi * expf(-0.5f * g * g);
    return g * cdf;
  }
  const float t = tanhf(kTanhBeta * (g + kTanhKappa * g * g * g));
  if (GRAD) *slope = 0.5f * (1.0f + t) + 0.5f * g * (1.0f - t * t) * kTanhBeta * (1.0f + 3.0f * kTanhKappa * g * g);
  return 0.5f * g * (1.0f + t);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    glu_fwd_kernel(const T* __restrict__ h, int64_t I, Act act, const float* __restrict__ scale,
                   const int32_t* __restrict__ row_to_slot, T* __restrict__ a) {
  const int64_t r = blockIdx.x;
  const T* gate_row = h + r * 2 * I;
  const T* up_row = gate_row + I;
  const float factor = scale != nullptr ? scale[row_to_slot[r]] : 1.0f;
  for (int64_t c = threadIdx.x * static_cast<int64_t>(VEC); c < I; c += blockDim.x * static_cast<int64_t>(VEC)) {
    T gate[VEC], up[VEC], out[VEC];
    load_vec(gate_row + c, gate);
    load_vec(up_row + c, up);
#pragma unroll
    for (int q = 0; q < VEC; ++q)
      out[q] = from_f32<T>(activation<false>(to_f32(gate[q]), act, nullptr) * to_f32(up[q]) * factor);
    store_vec(a + r * I + c, out);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    glu_bwd_kernel(const float* __restrict__ da, const T* __restrict__ h, int64_t I, Act act,
                   const float* __restrict__ weight, const int32_t* __restrict__ row_to_slot, T* __restrict__ dh,
                   float* __restrict__ grad_weight) {
  __shared__ float partial[kWarp];
  const int64_t r = blockIdx.x;
  const int64_t slot = row_to_slot[r];
  const float w = weight[slot];
  const T* gate_row = h + r * 2 * I;
  const T* up_row = gate_row + I;
  T* dgate_row = dh + r * 2 * I;
  T* dup_row = dgate_row + I;
  float dot = 0.0f;
  for (int64_t c = threadIdx.x * static_cast<int64_t>(VEC); c < I; c += blockDim.x * static_cast<int64_t>(VEC)) {
    T gate[VEC], up[VEC], dgate[VEC], dup[VEC];
    float grad[VEC];
    load_vec(gate_row + c, gate);
    load_vec(up_row + c, up);
    load_vec(da + r * I + c, grad);
#pragma unroll
    for (int q = 0; q < VEC; ++q) {
      float slope;
      const float g = to_f32(gate[q]), u = to_f32(up[q]);
      const float act_g = activation<true>(g, act, &slope);
      dot += grad[q] * act_g * u;
      dgate[q] = from_f32<T>(w * grad[q] * u * slope);
      dup[q] = from_f32<T>(w * grad[q] * act_g);
    }
    store_vec(dgate_row + c, dgate);
    store_vec(dup_row + c, dup);
  }
  dot = block_sum(dot, partial);
  if (threadIdx.x == 0) grad_weight[slot] = dot;
}

int threads_for(int64_t I, int64_t vec) {
  const int64_t needed = ceil_div(ceil_div(I, vec), kWarp) * kWarp;  // at least one warp, even for I = 0
  return static_cast<int>(needed < kWarp ? kWarp : needed < kMaxThreads ? needed : kMaxThreads);
}

}  // namespace

cudaError_t glu_fwd(const void* h_N2I, DType dtype, int64_t N, int64_t I, Act act, const float* scale,
                    const int32_t* row_to_slot_N, void* a_NI, cudaStream_t stream) {
  if (N == 0 || I == 0) return cudaSuccess;
  return with_dtype(dtype, [&](auto tag) {
    using Elem = decltype(tag);
    constexpr int vec = 16 / sizeof(Elem);
    const Elem* h = static_cast<const Elem*>(h_N2I);
    Elem* a = static_cast<Elem*>(a_NI);
    if (I % vec == 0 && aligned16(h) && aligned16(a))
      glu_fwd_kernel<Elem, vec>
          <<<static_cast<unsigned>(N), threads_for(I, vec), 0, stream>>>(h, I, act, scale, row_to_slot_N, a);
    else
      glu_fwd_kernel<Elem, 1>
          <<<static_cast<unsigned>(N), threads_for(I, 1), 0, stream>>>(h, I, act, scale, row_to_slot_N, a);
    return cudaGetLastError();
  });
}

cudaError_t glu_bwd(const float* da_NI, const void* h_N2I, DType dtype, int64_t N, int64_t I, Act act,
                    const float* weight, const int32_t* row_to_slot_N, void* grad_h_N2I, float* grad_weight,
                    cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  return with_dtype(dtype, [&](auto tag) {
    using Elem = decltype(tag);
    constexpr int vec = 16 / sizeof(Elem);
    const Elem* h = static_cast<const Elem*>(h_N2I);
    Elem* dh = static_cast<Elem*>(grad_h_N2I);
    if (I % vec == 0 && aligned16(h) && aligned16(dh) && aligned16(da_NI))
      glu_bwd_kernel<Elem, vec><<<static_cast<unsigned>(N), threads_for(I, vec), 0, stream>>>(
          da_NI, h, I, act, weight, row_to_slot_N, dh, grad_weight);
    else
      glu_bwd_kernel<Elem, 1><<<static_cast<unsigned>(N), threads_for(I, 1), 0, stream>>>(
          da_NI, h, I, act, weight, row_to_slot_N, dh, grad_weight);
    return cudaGetLastError();
  });
}

}  // namespace finteam
