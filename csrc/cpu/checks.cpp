// Bounds checks on the indices an op reads (see checks.h).
#include "checks.h"

#include <vector>

namespace finteam::cpu {

void check_indices(const at::Tensor& t, int64_t bound, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, ": ", name,
              " must be int32 or int64; got ", t.scalar_type());
  const at::Tensor c = t.contiguous();
  const IndexView idx = index_view(c);
  const int64_t n = c.numel();
  // One branch-free pass; only a bad tensor pays for finding the culprit.
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok &= static_cast<uint64_t>(idx[i]) < static_cast<uint64_t>(bound);
  if (ok) return;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(idx[i] >= 0 && idx[i] < bound, op, ": ", name, " must hold values in [0, ", bound, "); got ",
                idx[i], " at position ", i);
  }
}

void check_permutation(const at::Tensor& t, const char* op, const char* name) {
  const int64_t n = t.numel();
  check_indices(t, n, op, name);
  const at::Tensor c = t.contiguous();
  const IndexView idx = index_view(c);
  std::vector<uint8_t> seen(n, 0);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(!seen[idx[i]], op, ": ", name, " must hold each of 0 .. ", n - 1, " once; ", idx[i],
                " appears twice");
    seen[idx[i]] = 1;
  }
}

}  // namespace finteam::cpu
