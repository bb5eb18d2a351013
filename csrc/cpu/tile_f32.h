// The fp32 experts forward for experts with many rows on an AVX-512 or AVX2 CPU, without ATen's GEMM.
//
// Shape legend: H hidden, I expert intermediate, E experts, K top-k, N = T*K routed rows.
//
// At the sizes where an fp32 MoE runs on a CPU (the tiny team: H=128, I=256, about 700 rows an
// expert), ATen's GEMM reaches the CPU's FMA rate in its inner kernel, but around it each call
// zero-fills its output (beta = 0), packs both operands and meets the other thread at a barrier,
// and the gated unit between the two GEMMs is a pass of its own over [M, 2I] in memory. Here one
// parallel pass takes tiles of kTileRows rows of one expert: the tile's token rows are gathered
// straight into a transposed block x^T [H, rows] (no gather buffer), the gate/up product is
// computed as W_gate_up[e] @ x^T with the gated unit applied to the accumulators, so the
// activation is written once, already transposed, act^T [I, rows]: the down projection's input
// as it needs it; W_down[e] @ act^T is stored back into y_NH's rows. Weights are read in place
// (row-major [O, D], each element broadcast), so nothing is packed. With grad, the gate/up
// block also stores its accumulators into the rows of h_N2I the backward reads. (The backward's
// four GEMMs on the same register blocks were measured too, on a Zen 4 EPYC: read in place, its
// operands' power-of-two row strides evict each other from L1, and with them packed the backward
// ran at 0.97-0.98x the ATen path; not kept.)
#pragma once

#include <vector>

#include "common.h"
#include "glu.h"

namespace finteam::cpu {

// The kernel tiled_experts_f32 runs: "avx512" (AVX-512 CPUs), "avx2" (AVX2 and FMA), or "" where
// it does not run (other CPUs, or FINTEAM_CPU_F32_TILES=0: ATen's GEMMs then).
const char* tiled_f32_kernel();
inline bool tiled_f32_available() { return tiled_f32_kernel()[0] != '\0'; }

// y_NH[r] = W_down[e] @ glu(W_gate_up[e] @ x_TH[row_to_slot[r] / K]) for every row r of each expert
// e in `experts` (rows offsets[e] to offsets[e+1]), in fp32, and, unless h_N2I is null, h_N2I[r] =
// W_gate_up[e] @ x_TH[row_to_slot[r] / K] (for the backward). x_TH rows have stride ldx; the
// weights are dense ([E, 2I, H] and [E, H, I]); y_NH [N, H] and h_N2I [N, 2I] are dense.
void tiled_experts_f32(const float* x_TH, int64_t ldx, const int32_t* row_to_slot, int64_t K, const float* w_gate_up,
                       const float* w_down, int64_t H, int64_t I, Activation act, const std::vector<int64_t>& offsets,
                       const std::vector<int64_t>& experts, float* y_NH, float* h_N2I);

}  // namespace finteam::cpu
