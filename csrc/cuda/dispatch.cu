// The dispatch plan: group the N = T*K routed slots by expert, stably, without a host sync.
//
// Shape legend: E experts, N = T*K routed slots (slot s = t*K + j), rows in expert order.
//
// A counting sort in four small kernels, each with a fixed amount of work per thread:
//   1. rank: one warp per tile of kTileSlots slots walks its tile 32 slots at a time; lanes that
//      hold the same expert find each other with __match_any_sync, so each slot's rank among its
//      tile's earlier slots of that expert comes out in slot order. Writes the rank per slot and
//      the tile's count per expert.
//   2. column scan: one warp per expert turns the tiles' counts into each tile's first place
//      inside the expert (an exclusive prefix over tiles) and the expert's total.
//   3. offsets: one block scans the totals into expert_offsets_E1.
//   4. scatter: row = offsets[e] + tile's place + rank, for every slot in parallel.
// Slots keep their order inside an expert (tiles in order, ranks in order), so the plan is the
// reference's stable sort. Memory traffic is a few int32 per slot plus tiles * E counts.
#include "common.cuh"

namespace finteam {
namespace {

constexpr int kTileSlots = 512;
constexpr int kScanWarps = 8;
constexpr int kOffsetThreads = 1024;
constexpr int64_t kMaxExperts = 48 * 1024 / sizeof(int32_t);

template <typename I>
__global__ void __launch_bounds__(kWarp)
    dispatch_rank_kernel(const I* __restrict__ ids_N, int64_t N, int E, int32_t* __restrict__ rank_N,
                         int32_t* __restrict__ tile_counts_BE) {
  extern __shared__ int32_t seen[];
  const int lane = threadIdx.x;
  for (int e = lane; e < E; e += kWarp) seen[e] = 0;
  __syncwarp();
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kTileSlots;
  const int64_t last = first + kTileSlots < N ? first + kTileSlots : N;
  const unsigned lower_lanes = (1u << lane) - 1u;
  for (int64_t base = first; base < last; base += kWarp) {
    const int64_t s = base + lane;
    const bool in_tile = s < last;
    const bool valid = in_tile && ids_N[s] >= 0 && ids_N[s] < E;  // compared before narrowing
    FINTEAM_KERNEL_ASSERT(valid || !in_tile);
    const int e = valid ? static_cast<int>(ids_N[s]) : -1;
    const unsigned peers = __match_any_sync(kFullMask, e);
    const int rank = __popc(peers & lower_lanes);
    if (valid) rank_N[s] = seen[e] + rank;
    __syncwarp();
    if (valid && rank == 0) seen[e] += __popc(peers);
    __syncwarp();
  }
  int32_t* counts = tile_counts_BE + static_cast<int64_t>(blockIdx.x) * E;
  for (int e = lane; e < E; e += kWarp) counts[e] = seen[e];
}

__global__ void __launch_bounds__(kScanWarps* kWarp)
    dispatch_column_scan_kernel(int32_t* __restrict__ tile_counts_BE, int64_t tiles, int E,
                                int32_t* __restrict__ counts_E) {
  const int lane = threadIdx.x % kWarp;
  const int e = blockIdx.x * kScanWarps + threadIdx.x / kWarp;
  if (e >= E) return;
  int32_t running = 0;
  for (int64_t b0 = 0; b0 < tiles; b0 += kWarp) {
    const int64_t b = b0 + lane;
    const int32_t c = b < tiles ? tile_counts_BE[b * E + e] : 0;
    const int32_t inclusive = warp_inclusive_scan(c);
    if (b < tiles) tile_counts_BE[b * E + e] = running + inclusive - c;
    running += __shfl_sync(kFullMask, inclusive, kWarp - 1);
  }
  if (lane == 0) counts_E[e] = running;
}

__global__ void __launch_bounds__(kOffsetThreads)
    dispatch_offsets_kernel(const int32_t* __restrict__ counts_E, int E, int64_t* __restrict__ offsets_E1) {
  __shared__ int64_t warp_totals[kOffsetThreads / kWarp];
  __shared__ int64_t carry;
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  if (threadIdx.x == 0) {
    carry = 0;
    offsets_E1[0] = 0;
  }
  for (int e0 = 0; e0 < E; e0 += kOffsetThreads) {
    const int e = e0 + threadIdx.x;
    const int64_t c = e < E ? counts_E[e] : 0;
    const int64_t inclusive = warp_inclusive_scan(c);
    if (lane == kWarp - 1) warp_totals[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
      const int64_t total = warp_inclusive_scan(warp_totals[lane]);
      warp_totals[lane] = total;  // inclusive over warps
    }
    __syncthreads();
    const int64_t before = carry + (warp > 0 ? warp_totals[warp - 1] : 0);
    if (e < E) offsets_E1[e + 1] = before + inclusive;
    __syncthreads();  // everyone has read carry and warp_totals
    if (threadIdx.x == 0) carry += warp_totals[kOffsetThreads / kWarp - 1];
    __syncthreads();
  }
}

template <typename I>
__global__ void dispatch_scatter_kernel(const I* __restrict__ ids_N, int64_t N, int E,
                                        const int32_t* __restrict__ tile_places_BE,
                                        const int64_t* __restrict__ offsets_E1, int32_t* __restrict__ row_to_slot_N,
                                        int32_t* __restrict__ slot_to_row_N) {
  const int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s >= N) return;
  if (!(ids_N[s] >= 0 && ids_N[s] < E)) {  // counted nowhere, placed nowhere: its row index reads out of range
    slot_to_row_N[s] = -1;
    return;
  }
  const int e = static_cast<int>(ids_N[s]);
  const int64_t tile = s / kTileSlots;
  // slot_to_row_N holds the rank from the first kernel until this overwrite.
  const int64_t row = offsets_E1[e] + tile_places_BE[tile * E + e] + slot_to_row_N[s];
  slot_to_row_N[s] = static_cast<int32_t>(row);
  row_to_slot_N[row] = static_cast<int32_t>(s);
}

}  // namespace

size_t dispatch_scratch_bytes(int64_t N, int64_t E) {
  return static_cast<size_t>(ceil_div(N, kTileSlots) * E) * sizeof(int32_t);
}

cudaError_t dispatch_fwd(const void* ids_N, IdType id_type, int64_t N, int64_t E, void* scratch, int64_t* offsets_E1,
                         int32_t* counts_E, int32_t* row_to_slot_N, int32_t* slot_to_row_N, cudaStream_t stream) {
  if (E > kMaxExperts) return cudaErrorInvalidValue;
  const int64_t tiles = ceil_div(N, kTileSlots);
  int32_t* tile_counts_BE = static_cast<int32_t*>(scratch);
  cudaError_t err = cudaSuccess;
  if (N == 0) {
    err = cudaMemsetAsync(counts_E, 0, E * sizeof(int32_t), stream);
  } else {
    err = with_id_type(id_type, [&](auto tag) {
      using Id = decltype(tag);
      dispatch_rank_kernel<Id><<<static_cast<unsigned>(tiles), kWarp, E * sizeof(int32_t), stream>>>(
          static_cast<const Id*>(ids_N), N, static_cast<int>(E), slot_to_row_N, tile_counts_BE);
      return cudaGetLastError();
    });
    if (err != cudaSuccess) return err;
    dispatch_column_scan_kernel<<<static_cast<unsigned>(ceil_div(E, kScanWarps)), kScanWarps * kWarp, 0, stream>>>(
        tile_counts_BE, tiles, static_cast<int>(E), counts_E);
    err = cudaGetLastError();
  }
  if (err != cudaSuccess) return err;
  dispatch_offsets_kernel<<<1, kOffsetThreads, 0, stream>>>(counts_E, static_cast<int>(E), offsets_E1);
  err = cudaGetLastError();
  if (err != cudaSuccess || N == 0) return err;
  const int threads = 256;
  return with_id_type(id_type, [&](auto tag) {
    using Id = decltype(tag);
    dispatch_scatter_kernel<Id><<<static_cast<unsigned>(ceil_div(N, threads)), threads, 0, stream>>>(
        static_cast<const Id*>(ids_N), N, static_cast<int>(E), tile_counts_BE, offsets_E1, row_to_slot_N,
        slot_to_row_N);
    return cudaGetLastError();
  });
}

}  // namespace finteam
