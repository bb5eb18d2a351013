// Router losses: the load-balancing loss E * sum_e f_e * P_e and the z-loss mean(lse^2), forward
// and backward, deterministic (no float atomics).
//
// Shape legend: T tokens, E experts, K top-k.
//
// Forward in three steps: the expert counts (integer atomics, order-free); one block per tile
// of kTileTokens tokens writing its per-expert probability sums and its sum of lse^2 (threads
// run over experts, each summing the tile's tokens in order); one block reducing the tiles in
// a fixed order. The backward is one warp per token. Both read the logits once or twice:
// memory-bound. NaN/inf behave as torch.softmax and torch.logsumexp do.
#include <cfloat>

#include "common.cuh"

namespace finteam {
namespace {

constexpr int kTileTokens = 64;
constexpr int kTileThreads = 256;
constexpr int kFinalThreads = 1024;

struct Lse {
  float max;  // row max: what softmax subtracts
  float sum;  // sum of exp(x - max)
  float lse;  // logsumexp, with torch's rule for an infinite max
};

// One warp's statistics of one logits row; every lane gets them.
template <typename T>
__device__ Lse row_lse(const T* row, int64_t stride_e, int E) {
  const int lane = threadIdx.x % kWarp;
  float m = -INFINITY;
  for (int e = lane; e < E; e += kWarp) m = fmaxf(m, to_f32(row[e * stride_e]));
  m = warp_max(m);
  const float shift = isinf(m) ? 0.0f : m;
  float s = 0.0f, s_shift = 0.0f;
  for (int e = lane; e < E; e += kWarp) {
    const float x = to_f32(row[e * stride_e]);
    s += expf(x - m);
    s_shift += expf(x - shift);
  }
  Lse out;
  out.max = m;
  out.sum = warp_sum(s);
  out.lse = logf(warp_sum(s_shift)) + shift;
  return out;
}

template <typename T>
__global__ void __launch_bounds__(kTileThreads)
    router_tile_kernel(const T* __restrict__ logits, int64_t stride_t, int64_t stride_e, int64_t T_, int E,
                       float* __restrict__ prob_sums_BE, float* __restrict__ lse_sq_B) {
  __shared__ float row_max[kTileTokens], row_sum[kTileTokens], row_lse_sq[kTileTokens];
  const int warp = threadIdx.x / kWarp;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kTileTokens;
  const int tokens = static_cast<int>(T_ - first < kTileTokens ? T_ - first : kTileTokens);
  for (int i = warp; i < tokens; i += kTileThreads / kWarp) {
    const Lse stats = row_lse(logits + (first + i) * stride_t, stride_e, E);
    if (threadIdx.x % kWarp == 0) {
      row_max[i] = stats.max;
      row_sum[i] = stats.sum;
      row_lse_sq[i] = stats.lse * stats.lse;
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += kTileThreads) {
    float p = 0.0f;
    for (int i = 0; i < tokens; ++i)
      p += expf(to_f32(logits[(first + i) * stride_t + e * stride_e]) - row_max[i]) / row_sum[i];
    prob_sums_BE[static_cast<int64_t>(blockIdx.x) * E + e] = p;
  }
  if (threadIdx.x == 0) {
    float z = 0.0f;
    for (int i = 0; i < tokens; ++i) z += row_lse_sq[i];
    lse_sq_B[blockIdx.x] = z;
  }
}

// One block: aux = E * sum_e (count_e / T) * (prob_sum_e / T), z = sum lse^2 / T. Each warp owns
// experts e = warp, warp + 32, ...; its lanes split the tiles; every sum has a fixed order.
__global__ void __launch_bounds__(kFinalThreads)
    router_final_kernel(const float* __restrict__ prob_sums_BE, const float* __restrict__ lse_sq_B,
                        const int32_t* __restrict__ counts_E, int64_t tiles, int64_t T_, int E, float* __restrict__ aux,
                        float* __restrict__ z) {
  __shared__ float partial[kWarp];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const float inv_t = 1.0f / static_cast<float>(T_);
  float term = 0.0f;
  for (int e = warp; e < E; e += kFinalThreads / kWarp) {
    float p = 0.0f;
    for (int64_t b = lane; b < tiles; b += kWarp) p += prob_sums_BE[b * E + e];
    p = warp_sum(p);
    term += (static_cast<float>(counts_E[e]) * inv_t) * (p * inv_t);
  }
  const float total = block_sum(lane == 0 ? term : 0.0f, partial);
  float zs = 0.0f;
  for (int64_t b = threadIdx.x; b < tiles; b += kFinalThreads) zs += lse_sq_B[b];
  zs = block_sum(zs, partial);
  if (threadIdx.x == 0) {
    *aux = static_cast<float>(E) * total;
    *z = zs * inv_t;
  }
}

// d/dx_te of grad_aux * aux + grad_z * z: p_te * ((E * ga / T) * (f_e - sum_e' f_e' p_te') +
// 2 * gz * lse_t / T), with f_e = count_e / T. One warp per token.
template <typename T>
__global__ void __launch_bounds__(kTileThreads)
    router_bwd_kernel(const float* __restrict__ grad_aux, const float* __restrict__ grad_z,
                      const T* __restrict__ logits, int64_t stride_t, int64_t stride_e,
                      const int32_t* __restrict__ counts_E, int64_t T_, int E, T* __restrict__ grad_TE) {
  const int lane = threadIdx.x % kWarp;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (kTileThreads / kWarp) + threadIdx.x / kWarp;
  if (t >= T_) return;
  const T* row = logits + t * stride_t;
  const Lse stats = row_lse(row, stride_e, E);
  const float inv_t = 1.0f / static_cast<float>(T_);
  const float inv_sum = 1.0f / stats.sum;
  float dot = 0.0f;
  for (int e = lane; e < E; e += kWarp)
    dot += static_cast<float>(counts_E[e]) * inv_t * (expf(to_f32(row[e * stride_e]) - stats.max) * inv_sum);
  dot = warp_sum(dot);
  const float aux_scale = static_cast<float>(E) * *grad_aux * inv_t;
  const float z_term = 2.0f * *grad_z * stats.lse * inv_t;
  T* grad = grad_TE + t * E;
  for (int e = lane; e < E; e += kWarp) {
    const float p = expf(to_f32(row[e * stride_e]) - stats.max) * inv_sum;
    const float f = static_cast<float>(counts_E[e]) * inv_t;
    grad[e] = from_f32<T>(p * (aux_scale * (f - dot) + z_term));
  }
}

int64_t tiles_of(int64_t T) { return ceil_div(T, kTileTokens); }

}  // namespace

size_t router_losses_scratch_bytes(int64_t T, int64_t E) {
  return static_cast<size_t>(E + tiles_of(T) * (E + 1)) * sizeof(float);
}

cudaError_t router_losses_fwd(const void* logits, DType dtype, int64_t stride_t, int64_t stride_e, const void* ids_TK,
                              IdType id_type, int64_t T, int64_t E, int64_t K, void* scratch, float* aux, float* z,
                              cudaStream_t stream) {
  if (T == 0) {
    cudaError_t err = cudaMemsetAsync(aux, 0, sizeof(float), stream);
    return err != cudaSuccess ? err : cudaMemsetAsync(z, 0, sizeof(float), stream);
  }
  int32_t* counts_E = static_cast<int32_t*>(scratch);
  float* prob_sums_BE = static_cast<float*>(scratch) + E;
  const int64_t tiles = tiles_of(T);
  float* lse_sq_B = prob_sums_BE + tiles * E;
  cudaError_t err = count_experts(ids_TK, id_type, T * K, E, counts_E, stream);
  if (err != cudaSuccess) return err;
  err = with_dtype(dtype, [&](auto tag) {
    using Elem = decltype(tag);
    router_tile_kernel<Elem><<<static_cast<unsigned>(tiles), kTileThreads, 0, stream>>>(
        static_cast<const Elem*>(logits), stride_t, stride_e, T, static_cast<int>(E), prob_sums_BE, lse_sq_B);
    return cudaGetLastError();
  });
  if (err != cudaSuccess) return err;
  router_final_kernel<<<1, kFinalThreads, 0, stream>>>(prob_sums_BE, lse_sq_B, counts_E, tiles, T, static_cast<int>(E),
                                                       aux, z);
  return cudaGetLastError();
}

cudaError_t router_losses_bwd(const float* grad_aux, const float* grad_z, const void* logits, DType dtype,
                              int64_t stride_t, int64_t stride_e, const void* ids_TK, IdType id_type, int64_t T,
                              int64_t E, int64_t K, void* scratch, void* grad_logits_TE, cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  int32_t* counts_E = static_cast<int32_t*>(scratch);
  cudaError_t err = count_experts(ids_TK, id_type, T * K, E, counts_E, stream);
  if (err != cudaSuccess) return err;
  const unsigned blocks = static_cast<unsigned>(ceil_div(T, kTileThreads / kWarp));
  return with_dtype(dtype, [&](auto tag) {
    using Elem = decltype(tag);
    router_bwd_kernel<Elem><<<blocks, kTileThreads, 0, stream>>>(grad_aux, grad_z, static_cast<const Elem*>(logits),
                                                                 stride_t, stride_e, counts_E, T, static_cast<int>(E),
                                                                 static_cast<Elem*>(grad_logits_TE));
    return cudaGetLastError();
  });
}

}  // namespace finteam
