// Small-batch GEMMs as sums of scaled rows: the backward of an expert that received few rows.
//
// Shape legend: P output rows, Q the reduction (rows of b), C columns.
//
// With a batch of M rows, M small (a few to a few dozen), both GEMMs of a weight's backward
// read or write every weight byte once per M multiply-adds:
//   dW = dY^T @ X   (P = O weight rows, Q = M)  writes each weight-gradient row once;
//   dX = dY @ W     (P = M,            Q = O)  reads each weight row once.
// Each is out[p, :] = sum_q a[p, q] * b[q, :]: rows of b, scaled and summed in fp32 (fp64
// for fp64) in the order of q, vectorised along the columns; no parallel region per call.
#pragma once

#include "common.h"

namespace finteam::cpu {

// The backward of an expert with up to kFewRows rows takes its GEMMs as row mixes, one with more
// goes to ATen (oneDNN). On a 2-core AMX Xeon, at 8 rows per expert the mixes beat oneDNN by
// 15-30% on DeepSeek/OLMoE-sized weights (and lose 6% on a 7168 x 1024 one); around 16 rows the
// two break even, where the FMA rate binds. A parallel task writes kMixRowsPerTask rows of a
// weight gradient or computes kMixColsPerTask columns of a batch-side product.
constexpr int64_t kFewRows = 16;
constexpr int64_t kMixRowsPerTask = 64;
constexpr int64_t kMixColsPerTask = 128;

// out[p * ldo + c - c0] = sum_{q < Q} a[p * sp + q * sq] * b[q * ldb + c], for p < P and c in
// [c0, c1); the sum in fp32 (fp64 for fp64), q ascending. Single-threaded: callers split p or c.
template <typename scalar_t>
void mix_rows(const scalar_t* a, int64_t sp, int64_t sq, int64_t P, int64_t Q, const scalar_t* b, int64_t ldb,
              int64_t c0, int64_t c1, scalar_t* out, int64_t ldo);

}  // namespace finteam::cpu
