// Host entry points of the CUDA kernels: raw device pointers, sizes, strides and a stream.
//
// Shape legend: T tokens, H hidden, I expert intermediate, E experts, K top-k, N = T*K routed
// rows; D and O are a GEMM's input and output widths. Slot s = t*K + j is token t's j-th
// choice; row r is a position in the expert-grouped order.
//
// Everything here needs only the CUDA toolkit, so each kernel file compiles with nvcc alone
// (tests/test_cuda_compile.py). The torch-facing layer (ops_cuda.cpp) checks arguments,
// allocates outputs and scratch, and calls these on the current stream. Sizes are int64 so no
// product of them overflows; all pointers are to contiguous buffers unless a stride is passed.
// None of these synchronises with the host.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace finteam {

enum class DType { F32, F16, BF16 };
enum class IdType { I32, I64 };
enum class Score { Softmax, Sigmoid };
enum class Act { SiLU, GeLU, GeLUTanh };

// ---- topk_gating.cu ----
// weights_TK (float), ids_TK (int32), counts_E (int32, zeroed here). logits has strides
// (stride_t, stride_e); bias_E is float or null. Fails (returns an error) when E needs more
// shared memory than one block may have.
cudaError_t topk_gating_fwd(const void* logits, DType dtype, int64_t stride_t, int64_t stride_e, const float* bias_E,
                            int64_t T, int64_t E, int64_t K, Score score, bool renormalize, int64_t num_groups,
                            int64_t topk_groups, float scaling, float* weights_TK, int32_t* ids_TK, int32_t* counts_E,
                            cudaStream_t stream);
// grad_weights_TK float with strides; ids_TK int32 contiguous; grad_logits_TE contiguous, logits' dtype.
cudaError_t topk_gating_bwd(const float* grad_weights, int64_t stride_gt, int64_t stride_gk, const void* logits,
                            DType dtype, int64_t stride_t, int64_t stride_e, const int32_t* ids_TK, int64_t T,
                            int64_t E, int64_t K, Score score, bool renormalize, float scaling, void* grad_logits_TE,
                            cudaStream_t stream);
// counts_E[e] = number of the n ids equal to e (zeroed here; integer atomics, deterministic).
cudaError_t count_experts(const void* ids, IdType id_type, int64_t n, int64_t E, int32_t* counts_E,
                          cudaStream_t stream);
// Largest E the gating kernels take (the row of choices lives in shared memory).
int64_t topk_gating_max_experts();

// ---- router_losses.cu ----
// Scratch: router_losses_scratch_bytes(T, E) bytes. aux and z are single floats.
size_t router_losses_scratch_bytes(int64_t T, int64_t E);
cudaError_t router_losses_fwd(const void* logits, DType dtype, int64_t stride_t, int64_t stride_e, const void* ids_TK,
                              IdType id_type, int64_t T, int64_t E, int64_t K, void* scratch, float* aux, float* z,
                              cudaStream_t stream);
// grad_aux, grad_z: single floats on the device. grad_logits_TE contiguous, logits' dtype.
cudaError_t router_losses_bwd(const float* grad_aux, const float* grad_z, const void* logits, DType dtype,
                              int64_t stride_t, int64_t stride_e, const void* ids_TK, IdType id_type, int64_t T,
                              int64_t E, int64_t K, void* scratch, void* grad_logits_TE, cudaStream_t stream);

// ---- dispatch.cu ----
size_t dispatch_scratch_bytes(int64_t N, int64_t E);
cudaError_t dispatch_fwd(const void* ids_N, IdType id_type, int64_t N, int64_t E, void* scratch, int64_t* offsets_E1,
                         int32_t* counts_E, int32_t* row_to_slot_N, int32_t* slot_to_row_N, cudaStream_t stream);

// ---- rows.cu ----
// out[r, :] = scale[index[r]] * src[index[r] / index_div, :]  (scale: float per slot, or null).
cudaError_t gather_rows(const void* src, DType dtype, int64_t stride_row, int64_t stride_col, const int32_t* index,
                        int64_t index_div, const float* scale, int64_t rows, int64_t H, void* out, cudaStream_t stream);
// out[t, :] = sum_j weight[t*K + j] * src[index[t*K + j], :], in fp32, j in order (weight may be null).
cudaError_t combine_rows(const void* src, DType dtype, int64_t stride_row, int64_t stride_col, const int32_t* index,
                         const float* weight, int64_t T, int64_t K, int64_t H, void* out, cudaStream_t stream);
// dot[s] = <a[s / K, :], b[index[s], :]> in fp32 (the gradient of a routing weight).
cudaError_t row_dots(const void* a, int64_t stride_a_row, int64_t stride_a_col, const void* b, int64_t stride_b_row,
                     int64_t stride_b_col, DType dtype, const int32_t* index, int64_t T, int64_t K, int64_t H,
                     float* dot, cudaStream_t stream);

// ---- grouped_gemm.cu ---- (all operands contiguous, row-major)
// y_NO[rows of e] = x_ND[rows of e] @ w_EOD[e]^T; rows past offsets[E] are written as zeros.
cudaError_t grouped_gemm_fwd(const void* x_ND, const void* w_EOD, const int64_t* offsets_E1, DType dtype, int64_t N,
                             int64_t D, int64_t O, int64_t E, void* y_NO, cudaStream_t stream);
// grad_x_ND[rows of e] = grad_NO[rows of e] @ w_EOD[e]; out_f32 selects a float output.
cudaError_t grouped_gemm_dx(const void* grad_NO, const void* w_EOD, const int64_t* offsets_E1, DType dtype, int64_t N,
                            int64_t D, int64_t O, int64_t E, bool out_f32, void* grad_x_ND, cudaStream_t stream);
// grad_w_EOD[e] = grad_NO[rows of e]^T @ x_ND[rows of e]; exact zeros for an empty expert.
cudaError_t grouped_gemm_dw(const void* grad_NO, const void* x_ND, const int64_t* offsets_E1, DType dtype, int64_t N,
                            int64_t D, int64_t O, int64_t E, void* grad_w_EOD, cudaStream_t stream);

// ---- glu.cu ----
// a_NI[r] = act(gate) * up (times scale[row_to_slot[r]] when scale is given), h_N2I = [gate | up].
cudaError_t glu_fwd(const void* h_N2I, DType dtype, int64_t N, int64_t I, Act act, const float* scale,
                    const int32_t* row_to_slot_N, void* a_NI, cudaStream_t stream);
// With w = weight[row_to_slot[r]]: grad_weight[slot] = <da_NI[r], act(gate) * up> and
// grad_h_N2I[r] = w * d(act(gate) * up)/dh applied to da_NI[r]. da_NI is float.
cudaError_t glu_bwd(const float* da_NI, const void* h_N2I, DType dtype, int64_t N, int64_t I, Act act,
                    const float* weight, const int32_t* row_to_slot_N, void* grad_h_N2I, float* grad_weight,
                    cudaStream_t stream);

}  // namespace finteam
