// Bounds checks on the indices an op reads, so that no input makes a kernel read or write
// outside a tensor. The Python ops validate what they did not make themselves before calling;
// these checks are for every other caller of the library (torch.ops.finteam.*), and cost one
// pass over the int32 or int64 indices, next to the rows of H values each index moves.
//
// Shape legend: N = T*K routed rows.
#pragma once

#include "common.h"

namespace finteam::cpu {

// Every value of the index tensor `t` (int32 or int64, any layout) lies in [0, bound);
// otherwise an error naming `op`, `name`, the range and the first value outside it.
void check_indices(const at::Tensor& t, int64_t bound, const char* op, const char* name);

// `t` holds each of 0 .. N-1 exactly once (N = t.numel()): a kernel that writes row t[i] for
// every i then writes every row, so nothing is left uninitialised.
void check_permutation(const at::Tensor& t, const char* op, const char* name);

}  // namespace finteam::cpu
