// Top-k gating, forward and backward, and the per-expert token count.
//
// Shape legend: T tokens, E experts, K top-k, G expert groups.
//
// One warp per token, for any E: the warp writes the token's E selection values to shared
// memory once, then picks the K best by K passes of a warp arg-max, each pass taking the best
// value strictly after the previous pick in the order (value descending, index ascending).
// That order is total, so ties go to the lowest index and the K ids are always distinct. The
// cost is one read of the logits row plus K * E / 32 shared-memory reads per lane: the row
// read dominates for the K and E of real models. Scores, selection and weights follow
// reference.topk_gating exactly, NaN/inf rules included.
#include <algorithm>
#include <cfloat>
#include <climits>

#include "common.cuh"

namespace finteam {
namespace {

constexpr int kGatingWarps = 4;
constexpr int64_t kSharedFloats = 48 * 1024 / sizeof(float);

// nan -> -inf and +inf -> FLT_MAX: the logit the reference scores.
__device__ __forceinline__ float sanitize_logit(float x) {
  if (isnan(x)) return -INFINITY;
  return x == INFINITY ? FLT_MAX : x;
}

// torch.nan_to_num(c, nan=-inf): what the reference ranks experts by.
__device__ __forceinline__ float sanitize_choice(float c) {
  if (isnan(c)) return -INFINITY;
  if (c == INFINITY) return FLT_MAX;
  return c == -INFINITY ? -FLT_MAX : c;
}

// (v1, i1) comes before (v2, i2): higher value first, then lower index.
__device__ __forceinline__ bool ranks_before(float v1, int i1, float v2, int i2) {
  return v1 > v2 || (v1 == v2 && i1 < i2);
}

// Warp-wide arg-max of values[0..n) among the entries that rank after (prev_v, prev_i)
// (all of them when prev_i < 0). Every lane returns the winner.
__device__ __forceinline__ void warp_pick_after(const float* values, int n, float prev_v, int prev_i, float& best_v,
                                                int& best_i) {
  const int lane = threadIdx.x % kWarp;
  best_v = -INFINITY;
  best_i = INT_MAX;
  for (int i = lane; i < n; i += kWarp) {
    const float v = values[i];
    if (prev_i >= 0 && !ranks_before(prev_v, prev_i, v, i)) continue;
    if (ranks_before(v, i, best_v, best_i)) {
      best_v = v;
      best_i = i;
    }
  }
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const float other_v = __shfl_xor_sync(kFullMask, best_v, offset);
    const int other_i = __shfl_xor_sync(kFullMask, best_i, offset);
    if (ranks_before(other_v, other_i, best_v, best_i)) {
      best_v = other_v;
      best_i = other_i;
    }
  }
}

// The softmax statistics of one row: max and sum of exp(x - max) over the sanitised logits,
// and whether any logit is finite. Every lane gets them.
struct RowStats {
  float max, sum;
  bool alive;
};

template <typename T>
__device__ RowStats row_stats(const T* row, int64_t stride_e, int E, Score score) {
  const int lane = threadIdx.x % kWarp;
  float m = -INFINITY;
  bool alive = false;
  for (int e = lane; e < E; e += kWarp) {
    const float raw = to_f32(row[e * stride_e]);
    alive |= isfinite(raw);
    m = fmaxf(m, sanitize_logit(raw));
  }
  RowStats stats;
  stats.alive = __any_sync(kFullMask, alive);
  stats.max = warp_max(m);
  stats.sum = 0.0f;
  if (score == Score::Softmax) {
    float s = 0.0f;
    for (int e = lane; e < E; e += kWarp) s += expf(sanitize_logit(to_f32(row[e * stride_e])) - stats.max);
    stats.sum = warp_sum(s);
  }
  return stats;
}

// The unbiased score of logit x (0 for a row with no finite logit), as the reference computes
// it. FAST uses the 2-ulp division: the backward needs no bit-exact scores (the forward does,
// so that selection sees the values the reference ranks), and IEEE division's slow path costs
// the backward its registers.
template <bool FAST = false>
__device__ __forceinline__ float score_of(float raw, const RowStats& stats, Score score) {
  if (!stats.alive) return 0.0f;
  const float x = sanitize_logit(raw);
  const float num = score == Score::Softmax ? expf(x - stats.max) : 1.0f;
  const float den = score == Score::Softmax ? stats.sum : 1.0f + expf(-x);
  return FAST ? __fdividef(num, den) : num / den;
}

template <typename T>
__global__ void __launch_bounds__(kGatingWarps* kWarp)
    topk_gating_fwd_kernel(const T* __restrict__ logits, int64_t stride_t, int64_t stride_e,
                           const float* __restrict__ bias_E, int64_t T_, int E, int K, Score score, bool renormalize,
                           int G, int topk_groups, float scaling, float* __restrict__ weights_TK,
                           int32_t* __restrict__ ids_TK) {
  extern __shared__ float shared[];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + warp;
  if (t >= T_) return;
  const int per_warp = E + (G > 1 ? G : 0);
  float* choice = shared + static_cast<int64_t>(warp) * per_warp;
  const T* row = logits + t * stride_t;
  const RowStats stats = row_stats(row, stride_e, E, score);

  for (int e = lane; e < E; e += kWarp) {
    float c = 0.0f;
    if (stats.alive) {
      c = score_of(to_f32(row[e * stride_e]), stats, score);
      if (bias_E != nullptr) c += bias_E[e];
    }
    choice[e] = sanitize_choice(c);
  }
  __syncwarp();

  if (G > 1) {
    // DeepSeek-V3's group-limited selection: rate each group by the sum of its two best values,
    // keep the topk_groups best groups (lowest index among equals), rule out the others.
    float* rating = choice + E;
    const int size = E / G;
    for (int g = lane; g < G; g += kWarp) {
      float best = -INFINITY, second = -INFINITY;
      for (int i = 0; i < size; ++i) {
        const float v = choice[g * size + i];
        if (v > best) {
          second = best;
          best = v;
        } else if (v > second) {
          second = v;
        }
      }
      rating[g] = size >= 2 ? best + second : best;
    }
    __syncwarp();
    float last_v = 0.0f;
    int last_g = -1;
    for (int j = 0; j < topk_groups; ++j) warp_pick_after(rating, G, last_v, last_g, last_v, last_g);
    for (int e = lane; e < E; e += kWarp) {
      const int g = e / size;
      if (!(g == last_g || ranks_before(rating[g], g, last_v, last_g))) choice[e] = -INFINITY;
    }
    __syncwarp();
  }

  float* weights = weights_TK + t * K;
  int32_t* ids = ids_TK + t * K;
  float prev_v = 0.0f, total = 0.0f;
  int prev_i = -1;
  for (int j = 0; j < K; ++j) {
    warp_pick_after(choice, E, prev_v, prev_i, prev_v, prev_i);
    if (lane == 0) {
      const float w = score_of(to_f32(row[prev_i * stride_e]), stats, score);
      ids[j] = prev_i;
      weights[j] = w;
      total += w;
    }
  }
  const float denom = fmaxf(__shfl_sync(kFullMask, total, 0), FLT_MIN);
  __syncwarp();  // lane 0's weights are visible to the whole warp
  for (int j = lane; j < K; j += kWarp) {
    const float w = renormalize ? weights[j] / denom : weights[j];
    weights[j] = w * scaling;
  }
}

template <typename T>
__global__ void __launch_bounds__(kGatingWarps* kWarp)
    topk_gating_bwd_kernel(const float* __restrict__ grad_w, int64_t stride_gt, int64_t stride_gk,
                           const T* __restrict__ logits, int64_t stride_t, int64_t stride_e,
                           const int32_t* __restrict__ ids_TK, int64_t T_, int E, int K, Score score, bool renormalize,
                           float scaling, T* __restrict__ grad_TE) {
  const int lane = threadIdx.x % kWarp;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kGatingWarps + threadIdx.x / kWarp;
  if (t >= T_) return;
  const T* row = logits + t * stride_t;
  const int32_t* ids = ids_TK + t * K;
  T* grad = grad_TE + t * E;
  const RowStats stats = row_stats(row, stride_e, E, score);
  bool ids_ok = true;  // an id out of [0, E) would index past the row: the row's gradient is zero
  for (int j = 0; j < K; ++j) ids_ok &= ids[j] >= 0 && ids[j] < E;
  FINTEAM_KERNEL_ASSERT(ids_ok);
  if (!stats.alive || !ids_ok) {
    for (int e = lane; e < E; e += kWarp) grad[e] = from_f32<T>(0.0f);
    return;
  }

  // d(weight_j)/d(score_j): the renormalisation w_j = s_j / max(sum s, tiny) couples the K picks.
  float sum_s = 0.0f, sum_gs = 0.0f;
  for (int j = lane; j < K; j += kWarp) {
    const float s = score_of<true>(to_f32(row[ids[j] * stride_e]), stats, score);
    const float g = grad_w[t * stride_gt + j * stride_gk] * scaling;
    sum_s += s;
    sum_gs += g * s;
  }
  sum_s = warp_sum(sum_s);
  sum_gs = warp_sum(sum_gs);
  const float inv_denom = __fdividef(1.0f, fmaxf(sum_s, FLT_MIN));
  const float coupling = sum_s >= FLT_MIN ? sum_gs * inv_denom * inv_denom : 0.0f;

  // Softmax couples every expert to the picked ones through dot = sum_j ds_j * s_j.
  float dot = 0.0f;
  if (score == Score::Softmax) {
    for (int j = lane; j < K; j += kWarp) {
      const float s = score_of<true>(to_f32(row[ids[j] * stride_e]), stats, score);
      const float g = grad_w[t * stride_gt + j * stride_gk] * scaling;
      const float ds = renormalize ? g * inv_denom - coupling : g;
      dot += ds * s;
    }
    dot = warp_sum(dot);
  }
  for (int e = lane; e < E; e += kWarp) {
    const float raw = to_f32(row[e * stride_e]);
    const float d = score == Score::Softmax && isfinite(raw) ? -score_of<true>(raw, stats, score) * dot : 0.0f;
    grad[e] = from_f32<T>(d);
  }
  __syncwarp();  // the picked experts' entries below overwrite the dense pass
  for (int j = lane; j < K; j += kWarp) {
    const int e = ids[j];
    const float raw = to_f32(row[e * stride_e]);
    const float s = score_of<true>(raw, stats, score);
    const float g = grad_w[t * stride_gt + j * stride_gk] * scaling;
    const float ds = renormalize ? g * inv_denom - coupling : g;
    const float d = score == Score::Softmax ? s * (ds - dot) : ds * s * (1.0f - s);
    grad[e] = from_f32<T>(isfinite(raw) ? d : 0.0f);
  }
}

// counts[e] += number of ids equal to e: a shared-memory histogram per block, then one global
// integer atomic per non-empty bin (integer sums are order-independent, hence deterministic).
template <typename I>
__global__ void count_experts_kernel(const I* __restrict__ ids, int64_t n, int E, int32_t* __restrict__ counts) {
  extern __shared__ int32_t bins[];
  for (int e = threadIdx.x; e < E; e += blockDim.x) bins[e] = 0;
  __syncthreads();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const bool ok = ids[i] >= 0 && ids[i] < E;  // compared before narrowing; counted nowhere if not
    FINTEAM_KERNEL_ASSERT(ok);
    if (ok) atomicAdd(&bins[static_cast<int>(ids[i])], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x)
    if (bins[e] != 0) atomicAdd(&counts[e], bins[e]);
}

}  // namespace

cudaError_t count_experts(const void* ids, IdType id_type, int64_t n, int64_t E, int32_t* counts_E,
                          cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(counts_E, 0, E * sizeof(int32_t), stream);
  if (err != cudaSuccess || n == 0) return err;
  if (E > kSharedFloats) return cudaErrorInvalidValue;
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(n, threads * 8), 1024));
  return with_id_type(id_type, [&](auto tag) {
    using I = decltype(tag);
    count_experts_kernel<I><<<blocks, threads, E * sizeof(int32_t), stream>>>(static_cast<const I*>(ids), n,
                                                                              static_cast<int>(E), counts_E);
    return cudaGetLastError();
  });
}

int64_t topk_gating_max_experts() { return kSharedFloats / 2; }

cudaError_t topk_gating_fwd(const void* logits, DType dtype, int64_t stride_t, int64_t stride_e, const float* bias_E,
                            int64_t T, int64_t E, int64_t K, Score score, bool renormalize, int64_t num_groups,
                            int64_t topk_groups, float scaling, float* weights_TK, int32_t* ids_TK, int32_t* counts_E,
                            cudaStream_t stream) {
  if (E > topk_gating_max_experts()) return cudaErrorInvalidValue;
  if (T > 0) {
    // As many warps per block (at most kGatingWarps) as the rows' shared memory allows.
    const int64_t per_warp = E + (num_groups > 1 ? num_groups : 0);
    const int64_t fit = kSharedFloats / per_warp;
    const int warps = static_cast<int>(fit < kGatingWarps ? fit : kGatingWarps);
    const size_t shared = warps * per_warp * sizeof(float);
    const unsigned blocks = static_cast<unsigned>(ceil_div(T, warps));
    cudaError_t err = with_dtype(dtype, [&](auto tag) {
      using Elem = decltype(tag);
      topk_gating_fwd_kernel<Elem><<<blocks, warps * kWarp, shared, stream>>>(
          static_cast<const Elem*>(logits), stride_t, stride_e, bias_E, T, static_cast<int>(E), static_cast<int>(K),
          score, renormalize, static_cast<int>(num_groups), static_cast<int>(topk_groups), scaling, weights_TK, ids_TK);
      return cudaGetLastError();
    });
    if (err != cudaSuccess) return err;
  }
  return count_experts(ids_TK, IdType::I32, T * K, E, counts_E, stream);
}

cudaError_t topk_gating_bwd(const float* grad_weights, int64_t stride_gt, int64_t stride_gk, const void* logits,
                            DType dtype, int64_t stride_t, int64_t stride_e, const int32_t* ids_TK, int64_t T,
                            int64_t E, int64_t K, Score score, bool renormalize, float scaling, void* grad_logits_TE,
                            cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(ceil_div(T, kGatingWarps));
  return with_dtype(dtype, [&](auto tag) {
    using Elem = decltype(tag);
    topk_gating_bwd_kernel<Elem><<<blocks, kGatingWarps * kWarp, 0, stream>>>(
        grad_weights, stride_gt, stride_gk, static_cast<const Elem*>(logits), stride_t, stride_e, ids_TK, T,
        static_cast<int>(E), static_cast<int>(K), score, renormalize, scaling, static_cast<Elem*>(grad_logits_TE));
    return cudaGetLastError();
  });
}

}  // namespace finteam
