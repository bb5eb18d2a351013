// dispatch on the CPU (the op's Python side: finteam_kernels/ops/dispatch.py).
//
// Shape legend: T tokens, E experts, K top-k, N = T*K routed slots and rows.
// A stable counting sort: fixed blocks of slots count their experts in parallel, one ordered
// scan turns counts into each block's first row per expert, and each block places its slots in
// order. Memory-bound: two reads of the ids, one write of each index.
#include <vector>

#include "ops_cpu.h"

namespace finteam::cpu {

namespace {
constexpr int64_t kSlotBlock = 1 << 14;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dispatch_fwd(const at::Tensor& topk_ids_TK,
                                                                         int64_t num_experts) {
  TORCH_CHECK(num_experts >= 1, "dispatch: num_experts must be >= 1; got ", num_experts);
  const at::Tensor ids = topk_ids_TK.contiguous();
  const IndexView idx = index_view(ids);
  const int64_t N = ids.numel(), E = num_experts;
  TORCH_CHECK(N <= INT32_MAX, "dispatch: at most 2**31-1 routed rows; got ", N);
  auto opts = ids.options();
  auto offsets_E1 = at::empty({E + 1}, opts.dtype(at::kLong));
  auto counts_E = at::empty({E}, opts.dtype(at::kInt));
  auto row_to_slot_N = at::empty({N}, opts.dtype(at::kInt));
  auto slot_to_row_N = at::empty({N}, opts.dtype(at::kInt));
  const int64_t blocks = std::max<int64_t>(1, (N + kSlotBlock - 1) / kSlotBlock);
  std::vector<int64_t> start(blocks * E, 0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t* count = start.data() + b * E;
      for (int64_t s = b * kSlotBlock; s < std::min(N, (b + 1) * kSlotBlock); ++s) {
        const int64_t e = idx[s];
        TORCH_CHECK(e >= 0 && e < E, "dispatch: topk_ids_TK must hold expert ids in [0, ", E, "); got ", e,
                    " at slot ", s);
        ++count[e];
      }
    }
  });
  int64_t* offsets = offsets_E1.data_ptr<int64_t>();
  int32_t* counts = counts_E.data_ptr<int32_t>();
  int64_t row = 0;
  for (int64_t e = 0; e < E; ++e) {
    offsets[e] = row;
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t n = start[b * E + e];
      start[b * E + e] = row;
      row += n;
    }
    counts[e] = static_cast<int32_t>(row - offsets[e]);
  }
  offsets[E] = row;
  int32_t* r2s = row_to_slot_N.data_ptr<int32_t>();
  int32_t* s2r = slot_to_row_N.data_ptr<int32_t>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t* next = start.data() + b * E;
      for (int64_t s = b * kSlotBlock; s < std::min(N, (b + 1) * kSlotBlock); ++s) {
        const int64_t r = next[idx[s]]++;
        r2s[r] = static_cast<int32_t>(s);
        s2r[s] = static_cast<int32_t>(r);
      }
    }
  });
  return {offsets_E1, counts_E, row_to_slot_N, slot_to_row_N};
}

}  // namespace finteam::cpu
