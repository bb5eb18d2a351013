// moe_experts on the CPU: the whole expert computation, forward and backward.
//
// Shape legend: T tokens, H hidden, I expert intermediate, E experts, K top-k, N = T*K rows.
//   out_TH[t] = sum_j w[t,j] * W_down[e] @ glu(W_gate_up[e] @ x[t]),  e = ids[t,j]
//
// Forward. The plan groups rows by expert (a counting sort). Then each expert is one of two
// kinds, by its row count:
//   - up to skinny_max_rows() rows (bf16 on an AVX2 or AVX-512 CPU; 32 rows, 96 with
//     AVX512-BF16, 1024 with AMX) or kSmallRowsF32 (fp32, any CPU): the weight-streaming
//     kernels of dot_bf16.h or dot_f32.h read every weight byte once per call. Pass 1
//     splits the gate/up rows of all such experts between the threads; each task computes a
//     block of gate rows and the matching up rows for the expert's tokens, read in place from
//     x (no gather), and writes the activation (and h, when the backward needs it): the GLU is
//     the GEMM's epilogue. Pass 2 splits the down-projection rows the same way.
//   - more rows in fp32, on an AVX-512 or AVX2 CPU: the tiled forward of tile_f32.h, every
//     such expert's row tiles in one parallel pass (2-core AMD EPYC Zen 4, without grad,
//     against the ATen path below: AVX-512 1.07-1.26x from H=128 I=256 to H=1024 I=2816; AVX2
//     1.13x at H=128 I=256, 0.95-0.98x at H=512 I=1024). It saves each GEMM call's zero-fill,
//     packing and barrier, and the gated unit's pass over h in memory. With grad it also
//     writes h: at the tiny team's shape (fp32, H=128 I=256, 1024 tokens) on a 2-core AMD EPYC
//     (Zen 5), where MKL's sgemm runs AVX2 code, the forward took 1.50-1.67 ms against the
//     chunked forward's 2.49-2.65, forward and backward 6.5-6.9 against 7.5-8.0.
//   - more rows in fp32 with grad on other CPUs (or FINTEAM_CPU_F32_TILES=0), experts of at
//     most 1 MB of weights (the tiny team's): the chunked forward of chunks_f32.h, every such
//     expert's chunks of 128 rows in one parallel pass, each chunk's h written for the backward.
//   - more rows otherwise: two GEMMs through ATen (gemm.h: oneDNN, or fp32 on widened
//     operands where 16-bit GEMMs are slow) on the gathered rows, the gated unit between them
//     in one vectorised pass.
// Both write y_NH in expert order; the weighted combine then reduces each token's K rows in
// slot order in fp32. Kept for the backward: h_N2I only (the activation is recomputed from it).
//
// Backward, per expert, with g = dout_rows @ W_down[e] (unweighted, one GEMM):
//   d w[t,j] = <g, act>    d act = w * g    dh = glu'(h) * d act
//   dW_down[e] = (w * dout_rows)^T @ act    dW_gate_up[e] = dh^T @ x_rows    dx_rows = dh @ W_gate_up[e]
// which needs no second down-projection to recompute y. dx is reduced per token in slot order.
// An expert with few rows (the common case in training fine-grained MoEs) takes its GEMMs as
// sums of scaled rows (mix.h), every such expert's tasks in one parallel pass per step; one
// with many goes to ATen, or in fp32 to the chunked backward of chunks_f32.h (two parallel
// passes in all; small weights only, unless its GEMMs run on gemm_f32.h's AVX-512 blocks). An
// expert with no rows gets exactly zero weight gradients.

#include <cstring>
#include <vector>

#include "alloc.h"
#include "chunks_f32.h"
#include "dot_bf16.h"
#include "dot_f32.h"
#include "gemm.h"
#include "checks.h"
#include "ops_cpu.h"
#include "glu.h"
#include "grad_rows.h"
#include "mix.h"
#include "rows.h"
#include "tile_f32.h"

namespace finteam::cpu {
namespace {

constexpr int64_t kGateRowsPerTask = 32;
constexpr int64_t kDownRowsPerTask = 64;

// Decode-sized batches (every expert at most kLongTaskMaxRows rows) take kLongGateRowsPerTask
// gate rows a task, and as many up rows: each task then reads two runs of 512 KB (H=1024 bf16)
// where 32 rows gave two of 64 KB, and a thread's reads jump between the gate and up halves
// eight times less often. Calls in shuffled order on a 2-core AMD EPYC (Zen 4), Mixtral-shaped
// experts, against 32 rows: 2-3% faster with 2 threads at T=1 and T=16, 3-5% with 1 thread.
// Only where the experts still give 4 tasks a thread, so many threads keep busy.
constexpr int64_t kLongGateRowsPerTask = 256;
constexpr int64_t kLongTaskMaxRows = 16;

int64_t gate_rows_per_task(int64_t I, int64_t experts, int64_t max_rows) {
  const int64_t long_tasks = experts * ((I + kLongGateRowsPerTask - 1) / kLongGateRowsPerTask);
  return max_rows <= kLongTaskMaxRows && long_tasks >= 4 * at::get_num_threads() ? kLongGateRowsPerTask
                                                                                  : kGateRowsPerTask;
}

struct Shapes {
  int64_t T, H, I, E, K, N;
};

Shapes check_shapes(const at::Tensor& x_TH, const at::Tensor& weights_TK, const at::Tensor& w_gate_up_E2IH,
                    const at::Tensor& w_down_EHI) {
  TORCH_CHECK(x_TH.dim() == 2 && weights_TK.dim() == 2 && w_gate_up_E2IH.dim() == 3 && w_down_EHI.dim() == 3,
              "moe_experts: expected x_TH [T, H], topk_weights_TK [T, K], w_gate_up_E2IH [E, 2I, H], w_down_EHI [E, H, I]");
  const int64_t T = x_TH.size(0), H = x_TH.size(1), K = weights_TK.size(1), E = w_gate_up_E2IH.size(0);
  const int64_t I = w_down_EHI.size(2);
  TORCH_CHECK(w_gate_up_E2IH.size(1) == 2 * I && w_gate_up_E2IH.size(2) == H && w_down_EHI.size(0) == E &&
                  w_down_EHI.size(1) == H,
              "moe_experts: weight shapes do not match: w_gate_up_E2IH ", w_gate_up_E2IH.sizes(), ", w_down_EHI ",
              w_down_EHI.sizes(), ", x_TH ", x_TH.sizes());
  TORCH_CHECK(x_TH.scalar_type() == w_gate_up_E2IH.scalar_type() && x_TH.scalar_type() == w_down_EHI.scalar_type(),
              "moe_experts: x_TH and the expert weights must have the same dtype");
  return {T, H, I, E, K, T * K};
}

at::Tensor dense(const at::Tensor& t) { return t.is_contiguous() ? t : t.contiguous(); }

// The two element types the streaming forward takes: bf16 weights through dot_bf16.h's
// kernels, fp32 ones through dot_f32.h's. Each overload set: the batch prepared once for every
// weight row it meets, the GEMM of a block of weight rows, and a row of fp32 results stored.
SkinnyRows batch_rows(const c10::BFloat16* const* rows, int64_t M, int64_t D, bool whole_tiles) {
  return SkinnyRows(rows, M, D, whole_tiles);
}
std::vector<const float*> batch_rows(const float* const* rows, int64_t M, int64_t, bool) { return {rows, rows + M}; }
void rows_gemm(const c10::BFloat16* w, int64_t ldw, int64_t D, int64_t o0, int64_t o1, const SkinnyRows& x, float* out,
               int64_t ldo) {
  skinny_gemm_bf16(w, ldw, D, o0, o1, x, out, ldo);
}
void rows_gemm(const float* w, int64_t ldw, int64_t D, int64_t o0, int64_t o1, const std::vector<const float*>& x,
               float* out, int64_t ldo) {
  small_gemm_f32(w, ldw, D, o0, o1, x, out, ldo);
}
void store_row(const float* src, int64_t n, c10::BFloat16* dst) { narrow_row(src, n, dst); }
void store_row(const float* src, int64_t n, float* dst) { std::memcpy(dst, src, n * sizeof(float)); }

// The weight-streaming forward of the experts in `experts`: writes y_NH rows, and h_N2I rows
// when h_N2I has any.
template <typename scalar_t>
void streaming_forward(const at::Tensor& x, const int32_t* row_to_slot, const Shapes& s, const at::Tensor& w_gate_up,
                       const at::Tensor& w_down, Activation act, const std::vector<int64_t>& offsets,
                       const std::vector<int64_t>& experts, at::Tensor& h_N2I, at::Tensor& y_NH) {
  const int64_t I = s.I, H = s.H, count = static_cast<int64_t>(experts.size());
  std::vector<int64_t> act_row(count + 1, 0);  // each expert's first row in act_MI
  int64_t max_rows = 0;  // the scratch rows a task needs
  for (int64_t i = 0; i < count; ++i) {
    const int64_t M = offsets[experts[i] + 1] - offsets[experts[i]];
    act_row[i + 1] = act_row[i] + M;
    max_rows = std::max(max_rows, M);
  }
  auto act_MI = empty_large({act_row[count], I}, x.options());
  auto* act_data = act_MI.data_ptr<scalar_t>();
  const auto* wgu = w_gate_up.const_data_ptr<scalar_t>();
  const auto* wd = w_down.const_data_ptr<scalar_t>();
  const bool keep_h = h_N2I.size(0) > 0;
  auto* h = keep_h ? h_N2I.data_ptr<scalar_t>() : nullptr;
  using Rows = decltype(batch_rows(static_cast<const scalar_t* const*>(nullptr), 0, 0, false));

  // Each expert's batch: its tokens' rows of x, read in place (no gather).
  std::vector<Rows> tokens;
  const auto* xp = x.const_data_ptr<scalar_t>();
  for (int64_t i = 0; i < count; ++i) {
    const int64_t first = offsets[experts[i]], M = act_row[i + 1] - act_row[i];
    std::vector<const scalar_t*> rows(M);
    for (int64_t m = 0; m < M; ++m) rows[m] = xp + (row_to_slot[first + m] / s.K) * x.stride(0);
    tokens.push_back(batch_rows(rows.data(), M, H, I % 16 == 0));
  }

  const int64_t B = gate_rows_per_task(I, count, max_rows);
  const int64_t gate_tasks = (I + B - 1) / B;
  struct GateScratch {
    std::vector<float> gate, up, out;
  };
  parallel_tasks(
      count * gate_tasks,
      [&] { return GateScratch{std::vector<float>(max_rows * B), std::vector<float>(max_rows * B), std::vector<float>(B)}; },
      [&](int64_t task, GateScratch& sc) {
        const int64_t i = task / gate_tasks, e = experts[i];
        const int64_t i0 = (task % gate_tasks) * B, i1 = std::min(I, i0 + B), n = i1 - i0;
        const int64_t first = offsets[e], M = offsets[e + 1] - first;
        const scalar_t* w = wgu + e * w_gate_up.stride(0);
        rows_gemm(w, H, H, i0, i1, tokens[i], sc.gate.data(), B);
        rows_gemm(w, H, H, I + i0, I + i1, tokens[i], sc.up.data(), B);
        for (int64_t m = 0; m < M; ++m) {
          glu_f32(sc.gate.data() + m * B, sc.up.data() + m * B, n, act, sc.out.data());
          store_row(sc.out.data(), n, act_data + (act_row[i] + m) * I + i0);
          if (keep_h) {
            scalar_t* h_row = h + (first + m) * 2 * I;
            store_row(sc.gate.data() + m * B, n, h_row + i0);
            store_row(sc.up.data() + m * B, n, h_row + I + i0);
          }
        }
      });

  // Then its activations, the batch of the down projection.
  std::vector<Rows> activations;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t M = act_row[i + 1] - act_row[i];
    std::vector<const scalar_t*> rows(M);
    for (int64_t m = 0; m < M; ++m) rows[m] = act_data + (act_row[i] + m) * I;
    activations.push_back(batch_rows(rows.data(), M, I, H % 16 == 0));
  }
  const int64_t down_tasks = (H + kDownRowsPerTask - 1) / kDownRowsPerTask;
  auto* y = y_NH.data_ptr<scalar_t>();
  parallel_tasks(
      count * down_tasks, [&] { return std::vector<float>(max_rows * kDownRowsPerTask); },
      [&](int64_t task, std::vector<float>& out) {
        const int64_t i = task / down_tasks, e = experts[i];
        const int64_t h0 = (task % down_tasks) * kDownRowsPerTask, h1 = std::min(H, h0 + kDownRowsPerTask);
        const int64_t first = offsets[e], M = offsets[e + 1] - first;
        rows_gemm(wd + e * w_down.stride(0), I, I, h0, h1, activations[i], out.data(), kDownRowsPerTask);
        for (int64_t m = 0; m < M; ++m) store_row(out.data() + m * kDownRowsPerTask, h1 - h0, y + (first + m) * H + h0);
      });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_experts_fwd(
    const at::Tensor& x_TH, const at::Tensor& topk_ids_TK, const at::Tensor& topk_weights_TK,
    const at::Tensor& w_gate_up_E2IH, const at::Tensor& w_down_EHI, c10::string_view activation, bool needs_grad) {
  const Activation act = parse_activation(activation);
  const at::Tensor x = dense(x_TH), w_gate_up = dense(w_gate_up_E2IH), w_down = dense(w_down_EHI);
  const Shapes s = check_shapes(x, topk_weights_TK, w_gate_up, w_down);
  TORCH_CHECK(topk_ids_TK.numel() == s.N, "moe_experts: topk_ids_TK must hold T*K = ", s.N, " ids; got ",
              topk_ids_TK.numel());
  check_indices(topk_ids_TK, s.E, "moe_experts", "topk_ids_TK");
  auto [offsets_E1, counts_E, row_to_slot_N, slot_to_row_N] = dispatch_fwd(topk_ids_TK, s.E);
  auto h_N2I = empty_large({needs_grad ? s.N : 0, 2 * s.I}, x.options());
  auto y_NH = empty_large({s.N, s.H}, x.options());
  const auto offsets = host_offsets(offsets_E1, s.E, s.N, "moe_experts");
  const int32_t* row_to_slot = row_to_slot_N.const_data_ptr<int32_t>();
  // Experts with few rows stream their weights (bf16 where a streaming kernel runs, and fp32);
  // the rest go to ATen's GEMM.
  const bool bf16 = x.scalar_type() == at::kBFloat16, f32 = x.scalar_type() == at::kFloat;
  const int64_t row_limit = bf16 && skinny_gemm_available() ? skinny_max_rows() : f32 ? kSmallRowsF32 : 0;
  const bool streaming = row_limit > 0 && s.H > 0 && s.I > 0;
  // fp32 experts past the streaming kernels' rows take the tiled forward where the CPU has it
  // (tile_f32.h), which with grad also writes the h_N2I the backward needs; elsewhere, with grad,
  // the chunked forward (chunks_f32.h).
  const bool tiled = f32 && tiled_f32_available();
  const bool chunked = f32 && needs_grad && !tiled && chunks_f32_available(s.N, s.H, s.I);
  std::vector<int64_t> streamed, tiled_experts, chunked_experts;
  for (int64_t e = 0; e < s.E; ++e) {
    const int64_t first = offsets[e], M = offsets[e + 1] - first;
    if (M == 0) continue;
    if (streaming && M <= row_limit) {
      streamed.push_back(e);
      continue;
    }
    if (tiled || chunked) {
      (tiled ? tiled_experts : chunked_experts).push_back(e);
      continue;
    }
    auto x_rows = at::empty({M, s.H}, x.options());
    gather_rows(x, row_to_slot, s.K, first, first + M, x_rows);
    auto h = needs_grad ? h_N2I.narrow(0, first, M) : at::empty({M, 2 * s.I}, x.options());
    gemm_out(h, x_rows, w_gate_up[e].t());
    auto a = at::empty({M, s.I}, x.options());
    glu(h.narrow(1, 0, s.I), h.narrow(1, s.I, s.I), act, a);
    auto y = y_NH.narrow(0, first, M);
    gemm_out(y, a, w_down[e].t());
  }
  if (!streamed.empty() && bf16) {
    streaming_forward<c10::BFloat16>(x, row_to_slot, s, w_gate_up, w_down, act, offsets, streamed, h_N2I, y_NH);
  } else if (!streamed.empty()) {
    streaming_forward<float>(x, row_to_slot, s, w_gate_up, w_down, act, offsets, streamed, h_N2I, y_NH);
  }
  if (!tiled_experts.empty()) {
    tiled_experts_f32(x.const_data_ptr<float>(), x.stride(0), row_to_slot, s.K, w_gate_up.const_data_ptr<float>(),
                      w_down.const_data_ptr<float>(), s.H, s.I, act, offsets, tiled_experts, y_NH.data_ptr<float>(),
                      needs_grad ? h_N2I.data_ptr<float>() : nullptr);
  }
  if (!chunked_experts.empty()) {
    chunked_forward_f32(x.const_data_ptr<float>(), x.stride(0), row_to_slot, s.K, w_gate_up.const_data_ptr<float>(),
                        w_down.const_data_ptr<float>(), s.H, s.I, act, offsets, chunked_experts,
                        h_N2I.data_ptr<float>(), y_NH.data_ptr<float>());
  }
  auto out_TH = combine_rows(y_NH, slot_to_row_N, topk_weights_TK, s.K);
  return {out_TH, h_N2I, offsets_E1, row_to_slot_N, slot_to_row_N};
}

namespace {

// The GEMMs of the experts in `few` (each with at most kFewRows rows) as row mixes (mix.h), all
// experts' tasks in one parallel pass: g = dout @ W_down[e] by column blocks of I.
template <typename scalar_t>
void few_rows_g(const Shapes& s, const scalar_t* dout, const scalar_t* wd, const std::vector<int64_t>& offsets,
                const std::vector<int64_t>& few, scalar_t* g) {
  const int64_t blocks = (s.I + kMixColsPerTask - 1) / kMixColsPerTask;
  parallel_tasks(
      static_cast<int64_t>(few.size()) * blocks, [] { return 0; },
      [&](int64_t task, int) {
        const int64_t e = few[task / blocks], first = offsets[e], M = offsets[e + 1] - first;
        const int64_t c0 = (task % blocks) * kMixColsPerTask, c1 = std::min(s.I, c0 + kMixColsPerTask);
        mix_rows(dout + first * s.H, s.H, 1, M, s.H, wd + e * s.H * s.I, s.I, c0, c1, g + first * s.I + c0, s.I);
      });
}

// Then, per expert, three kinds of task: row blocks of dW_down = dout_w^T @ a and of
// dW_gate_up = dh^T @ x_rows (each written once, row by row), and column blocks of
// dx_rows = dh @ W_gate_up[e] (each weight row read once).
template <typename scalar_t>
void few_rows_grads(const Shapes& s, const scalar_t* dout, const scalar_t* x_rows, const scalar_t* a,
                    const scalar_t* dh, const scalar_t* wgu, const std::vector<int64_t>& offsets,
                    const std::vector<int64_t>& few, scalar_t* dw_down, scalar_t* dw_gate_up, scalar_t* dx) {
  const int64_t H = s.H, I = s.I, B = kMixRowsPerTask, C = kMixColsPerTask;
  const int64_t down = (H + B - 1) / B, gate_up = (2 * I + B - 1) / B, cols = (H + C - 1) / C;
  const int64_t per_expert = down + gate_up + cols;
  parallel_tasks(
      static_cast<int64_t>(few.size()) * per_expert, [] { return 0; },
      [&](int64_t task, int) {
        const int64_t e = few[task / per_expert], first = offsets[e], M = offsets[e + 1] - first;
        int64_t k = task % per_expert;
        if (k < down) {
          const int64_t r0 = k * B, r1 = std::min(H, r0 + B);
          mix_rows(dout + first * H + r0, 1, H, r1 - r0, M, a + first * I, I, 0, I, dw_down + (e * H + r0) * I, I);
          return;
        }
        k -= down;
        if (k < gate_up) {
          const int64_t r0 = k * B, r1 = std::min(2 * I, r0 + B);
          mix_rows(dh + first * 2 * I + r0, 1, 2 * I, r1 - r0, M, x_rows + first * H, H, 0, H,
                   dw_gate_up + (e * 2 * I + r0) * H, H);
          return;
        }
        k -= gate_up;
        const int64_t c0 = k * C, c1 = std::min(H, c0 + C);
        mix_rows(dh + first * 2 * I, 2 * I, 1, M, 2 * I, wgu + e * 2 * I * H, H, c0, c1, dx + first * H + c0, H);
      });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_experts_bwd(
    const at::Tensor& grad_TH, const at::Tensor& x_TH, const at::Tensor& topk_weights_TK,
    const at::Tensor& w_gate_up_E2IH, const at::Tensor& w_down_EHI, const at::Tensor& h_N2I,
    const at::Tensor& expert_offsets_E1, const at::Tensor& row_to_slot_N, const at::Tensor& slot_to_row_N,
    c10::string_view activation) {
  const Activation act = parse_activation(activation);
  const at::Tensor x = dense(x_TH), w_gate_up = dense(w_gate_up_E2IH), w_down = dense(w_down_EHI);
  const Shapes s = check_shapes(x, topk_weights_TK, w_gate_up, w_down);
  TORCH_CHECK(h_N2I.size(0) == s.N, "moe_experts: the backward needs h_N2I from a forward with needs_grad=True");
  TORCH_CHECK(row_to_slot_N.numel() == s.N && slot_to_row_N.numel() == s.N,
              "moe_experts: row_to_slot_N and slot_to_row_N must hold N = T*K = ", s.N, " entries");
  check_indices(row_to_slot_N, s.N, "moe_experts", "row_to_slot_N");
  check_indices(slot_to_row_N, s.N, "moe_experts", "slot_to_row_N");
  const at::Tensor grad = rows_dense(grad_TH.to(x.scalar_type()));
  const at::Tensor h_all = dense(h_N2I);
  const at::Tensor w = topk_weights_TK.to(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
  const at::Tensor r2s = row_to_slot_N.to(at::kInt).contiguous();
  const int32_t* row_to_slot = r2s.const_data_ptr<int32_t>();
  auto grad_w = at::zeros({s.T, s.K}, w.options());
  auto grad_w_gate_up = empty_large(w_gate_up.sizes(), w_gate_up.options());
  auto grad_w_down = empty_large(w_down.sizes(), w_down.options());
  auto dx_NH = empty_large({s.N, s.H}, x.options());
  const auto offsets = host_offsets(expert_offsets_E1, s.E, s.N, "moe_experts");
  // Every row's dout and x in expert order, the incoming gradient of y, g, a and dh.
  auto dout_NH = empty_large({s.N, s.H}, x.options());
  auto x_NH = empty_large({s.N, s.H}, x.options());
  auto g_NI = empty_large({s.N, s.I}, x.options());
  auto a_NI = empty_large({s.N, s.I}, x.options());
  auto dh_N2I = empty_large({s.N, 2 * s.I}, x.options());
  std::vector<int64_t> few, many;
  for (int64_t e = 0; e < s.E; ++e) {
    const int64_t M = offsets[e + 1] - offsets[e];
    if (M == 0) {
      grad_w_gate_up[e].zero_();
      grad_w_down[e].zero_();
    } else {
      (M <= kFewRows ? few : many).push_back(e);
    }
  }
  // fp32 experts with many rows take the chunked backward (chunks_f32.h); the rest pass
  // through whole-batch steps, here over the rows in `rows`.
  const bool chunked = !many.empty() && x.scalar_type() == at::kFloat && chunks_f32_available(s.N, s.H, s.I);
  std::vector<std::pair<int64_t, int64_t>> rows;
  if (!chunked) {
    rows.emplace_back(0, s.N);
  } else {
    for (int64_t e : few) rows.emplace_back(offsets[e], offsets[e + 1]);
  }
  if (s.H > 0) {
    for (auto [r0, r1] : rows) {
      auto dout = dout_NH.narrow(0, r0, r1 - r0), x_rows = x_NH.narrow(0, r0, r1 - r0);
      gather_rows(grad, row_to_slot, s.K, r0, r1, dout);
      gather_rows(x, row_to_slot, s.K, r0, r1, x_rows);
    }
  }
  if (!chunked) {
    for (int64_t e : many) {
      auto g = g_NI.narrow(0, offsets[e], offsets[e + 1] - offsets[e]);
      gemm_out(g, dout_NH.narrow(0, offsets[e], offsets[e + 1] - offsets[e]), w_down[e]);
    }
  }
  FINTEAM_DISPATCH_FLOATS(x.scalar_type(), "moe_experts_bwd", [&] {
    if (!few.empty())
      few_rows_g<scalar_t>(s, dout_NH.const_data_ptr<scalar_t>(), w_down.const_data_ptr<scalar_t>(), offsets, few,
                           g_NI.data_ptr<scalar_t>());
    for (auto [first, last] : rows) {
      at::parallel_for(first, last, grain(16 * s.I), [&](int64_t r0, int64_t r1) {
        expert_grad_rows<scalar_t>(act, h_all.const_data_ptr<scalar_t>(), g_NI.const_data_ptr<scalar_t>(), row_to_slot,
                                   w.const_data_ptr<acc_type<scalar_t>>(), s.I, r0, r1, a_NI.data_ptr<scalar_t>(),
                                   dh_N2I.data_ptr<scalar_t>(), grad_w.data_ptr<acc_type<scalar_t>>());
      });
    }
    for (auto [first, last] : rows) {
      at::parallel_for(first, last, grain(s.H), [&](int64_t r0, int64_t r1) {
        scale_rows<scalar_t>(dout_NH.data_ptr<scalar_t>(), s.H, row_to_slot, w.const_data_ptr<acc_type<scalar_t>>(),
                             r0, r1);
      });
    }
    if (!few.empty())
      few_rows_grads<scalar_t>(s, dout_NH.const_data_ptr<scalar_t>(), x_NH.const_data_ptr<scalar_t>(),
                               a_NI.const_data_ptr<scalar_t>(), dh_N2I.const_data_ptr<scalar_t>(),
                               w_gate_up.const_data_ptr<scalar_t>(), offsets, few, grad_w_down.data_ptr<scalar_t>(),
                               grad_w_gate_up.data_ptr<scalar_t>(), dx_NH.data_ptr<scalar_t>());
  });
  if (chunked) {
    chunked_backward_f32(grad.const_data_ptr<float>(), grad.stride(0), x.const_data_ptr<float>(), x.stride(0),
                         w.const_data_ptr<float>(), row_to_slot, s.K, w_gate_up.const_data_ptr<float>(),
                         w_down.const_data_ptr<float>(), h_all.const_data_ptr<float>(), s.H, s.I, act, offsets, many,
                         {dout_NH.data_ptr<float>(), x_NH.data_ptr<float>(), g_NI.data_ptr<float>(),
                          a_NI.data_ptr<float>(), dh_N2I.data_ptr<float>(), dx_NH.data_ptr<float>(),
                          grad_w.data_ptr<float>(), grad_w_gate_up.data_ptr<float>(), grad_w_down.data_ptr<float>()});
  } else {
    for (int64_t e : many) {
      const int64_t first = offsets[e], M = offsets[e + 1] - first;
      const auto dh = dh_N2I.narrow(0, first, M);
      auto dw_down = grad_w_down[e];
      gemm_out(dw_down, dout_NH.narrow(0, first, M).t(), a_NI.narrow(0, first, M));
      auto dw_gate_up = grad_w_gate_up[e];
      gemm_out(dw_gate_up, dh.t(), x_NH.narrow(0, first, M));
      auto dx = dx_NH.narrow(0, first, M);
      gemm_out(dx, dh, w_gate_up[e]);
    }
  }
  auto grad_x = combine_rows(dx_NH, slot_to_row_N, at::Tensor(), s.K);
  return {grad_x, grad_w.to(topk_weights_TK.scalar_type()), grad_w_gate_up, grad_w_down};
}


}  // namespace finteam::cpu
