// fp32 experts with many rows and small weights, in training: the forward and the backward in
// chunks of an expert's rows, one parallel pass per step, each GEMM a single-threaded BLAS call.
// Where the tiled forward runs (tile_f32.h: AVX2 and AVX-512 CPUs), it takes the forward and
// writes h; the chunks then take the backward only.
//
// Shape legend: H hidden, I expert intermediate, E experts, K top-k, N = T*K routed rows (in
// expert order: expert e owns rows offsets[e] to offsets[e+1]).
//
// Through ATen, each of an expert's GEMMs is a parallel region of its own, two per expert in the
// forward and four in the backward, each ending at a barrier where the threads wait for the
// slowest; the gated unit and its backward are passes of their own over whole [N, 2I] buffers.
// Here a task is one chunk of kChunkRows rows of one expert:
//   forward: its x rows gathered, h = x @ W_gate_up[e]^T (kept for the backward), the gated
//     unit, y = act @ W_down[e]^T;
//   backward, pass 1: dout and x gathered, g = dout @ W_down[e], the gated unit's backward (with
//     the routing weights' gradients), dout scaled, dx = dh @ W_gate_up[e];
// so a chunk's operands stay in the core's cache from one step to the next. The weight
// gradients, sums over all of an expert's rows, take pass 2, by blocks of their rows. The
// forward is one parallel region and the backward two, whatever the number of experts.
//
// Each chunk's GEMM packs the expert's weights again, so this pays only where they are small:
// on a 2-core AMD EPYC (Zen 4), forward+backward of the op, ATen's time over this one (calls
// alternating in one process, median of 20-30 rounds): H=128 I=256 (the tiny team, 384 KB an
// expert) 1.11-1.16x at 873/747/428 rows an expert, 1.30x at 34-100 rows, 1.02x at 2000/1500/596;
// H=256 I=256 1.04x; H=256 I=512 (1.5 MB) 1.01x; H=512 I=1024 (6 MB) 0.95x. Hence
// kMaxExpertBytes (1 MB) in chunks_f32.cpp, for the BLAS; gemm_f32 below packs nothing and takes
// experts of any size.
//
// The GEMM is the BLAS that ATen's fp32 matmul calls (MKL's sgemm in the x86 wheels), looked up
// when first needed; inside a parallel region it runs on the calling thread. The backward's GEMMs
// take gemm_f32.h instead on AVX-512 CPUs where MKL runs AVX2 code (AMD): at the tiny team's
// shape on a 2-core AMD EPYC (Zen 5), forward and backward of the op 3.9-4.2 ms against 6.4-6.6.
#pragma once

#include <vector>

#include "common.h"
#include "glu.h"

namespace finteam::cpu {

// Whether the chunked steps are on: the torch build exports the BLAS sgemm, and FINTEAM_CPU_CHUNKS
// is not 0 (read once; 0 keeps ATen's GEMMs, for comparison).
bool chunks_f32_enabled();
// Whether they take experts of this shape: on, H and I not 0, an expert's weights within
// kMaxExpertBytes (no limit where gemm_f32 runs), and the sizes within the BLAS's 32-bit arguments.
bool chunks_f32_available(int64_t N, int64_t H, int64_t I);

// The forward of each expert e in `experts`: y_NH[r] = W_down[e] @ glu(h_N2I[r]) with
// h_N2I[r] = W_gate_up[e] @ x_TH[row_to_slot[r] / K], both written. x_TH rows have stride ldx;
// the weights are dense ([E, 2I, H] and [E, H, I]); h_N2I and y_NH are dense.
void chunked_forward_f32(const float* x_TH, int64_t ldx, const int32_t* row_to_slot, int64_t K,
                         const float* w_gate_up, const float* w_down, int64_t H, int64_t I, Activation act,
                         const std::vector<int64_t>& offsets, const std::vector<int64_t>& experts, float* h_N2I,
                         float* y_NH);

// The backward of each expert e in `experts` (see moe_experts.cpp for the formulas), from
// grad_TH (rows of stride ldg), x_TH (stride ldx), the routing weights w_TK and h_N2I: writes the
// experts' rows of dx_NH, their slots of grad_w_TK, and their blocks of the weight gradients;
// dout_NH, x_NH, g_NI, a_NI and dh_N2I are scratch of N rows (each expert's rows used).
struct ChunkGrads {
  float* dout_NH;
  float* x_NH;
  float* g_NI;
  float* a_NI;
  float* dh_N2I;
  float* dx_NH;
  float* grad_w_TK;
  float* grad_w_gate_up;
  float* grad_w_down;
};
void chunked_backward_f32(const float* grad_TH, int64_t ldg, const float* x_TH, int64_t ldx, const float* w_TK,
                          const int32_t* row_to_slot, int64_t K, const float* w_gate_up, const float* w_down,
                          const float* h_N2I, int64_t H, int64_t I, Activation act,
                          const std::vector<int64_t>& offsets, const std::vector<int64_t>& experts,
                          const ChunkGrads& out);

}  // namespace finteam::cpu
