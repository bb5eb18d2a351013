// dispatch, permute and unpermute on the CPU.
//
// Shape legend: T tokens, H hidden, E experts, K top-k, N = T*K routed slots and rows.
// dispatch is a stable counting sort: fixed blocks of slots count their experts in parallel,
// one ordered scan turns counts into each block's first row per expert, and each block places
// its slots in order. permute is one memcpy per row; unpermute reduces each token's K rows in
// slot order in fp32 (no atomics, deterministic). All three are memory-bound: one read and one
// write of each row.
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "rows.h"
#include "vmath.h"

namespace finteam::cpu {

namespace {
constexpr int64_t kSlotBlock = 1 << 14;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dispatch_plan(const at::Tensor& topk_ids_TK,
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
        TORCH_CHECK(e >= 0 && e < E, "dispatch: expert ids must be in [0, ", E, "); got ", e, " at slot ", s);
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

FINTEAM_SIMD void narrow_row(const float* src, int64_t n, c10::BFloat16* dst) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = vm::narrow<c10::BFloat16>(src[i]);
}

std::vector<int64_t> host_offsets(const at::Tensor& expert_offsets_E1, int64_t E, int64_t N, const char* op) {
  const at::Tensor o = expert_offsets_E1.to(at::kLong).contiguous();
  TORCH_CHECK(o.numel() == E + 1, op, ": expert_offsets_E1 must have E+1 = ", E + 1, " entries; got ", o.numel());
  std::vector<int64_t> v(o.const_data_ptr<int64_t>(), o.const_data_ptr<int64_t>() + E + 1);
  TORCH_CHECK(v[0] == 0 && v[E] == N, op, ": expert_offsets_E1 must run from 0 to N=", N);
  for (int64_t e = 0; e < E; ++e) TORCH_CHECK(v[e] <= v[e + 1], op, ": expert_offsets_E1 must be non-decreasing");
  return v;
}

void gather_rows(const at::Tensor& x_TH, const int32_t* row_to_slot_N, int64_t top_k, int64_t r0, int64_t r1,
                 at::Tensor& out) {
  const int64_t H = x_TH.size(1), stride = x_TH.stride(0), bytes = H * x_TH.element_size();
  const char* x = static_cast<const char*>(x_TH.const_data_ptr());
  char* y = static_cast<char*>(out.data_ptr());
  const int64_t out_stride = out.stride(0) * out.element_size();
  at::parallel_for(r0, r1, grain(bytes), [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r) {
      const int64_t t = row_to_slot_N[r] / top_k;
      std::memcpy(y + (r - r0) * out_stride, x + t * stride * x_TH.element_size(), bytes);
    }
  });
}

namespace {

template <typename scalar_t, typename acc_t>
FINTEAM_SIMD void combine_kernel(const scalar_t* y, int64_t stride_y, const int32_t* slot_to_row, const acc_t* w,
                                 int64_t K, int64_t H, int64_t t0, int64_t t1, scalar_t* out) {
  std::vector<acc_t> acc(H);
  acc_t* a = acc.data();
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t j = 0; j < K; ++j) {
      const scalar_t* row = y + slot_to_row[t * K + j] * stride_y;
      const acc_t wt = w != nullptr ? w[t * K + j] : acc_t(1);
      if (j == 0) {
#pragma omp simd
        for (int64_t h = 0; h < H; ++h) a[h] = wt * vm::widen(row[h]);
      } else {
#pragma omp simd
        for (int64_t h = 0; h < H; ++h) a[h] += wt * vm::widen(row[h]);
      }
    }
    scalar_t* o = out + t * H;
#pragma omp simd
    for (int64_t h = 0; h < H; ++h) o[h] = vm::narrow<scalar_t>(a[h]);
  }
}

template <typename scalar_t, typename acc_t>
FINTEAM_SIMD void unpermute_grad_kernel(const scalar_t* g, int64_t stride_g, const scalar_t* y, int64_t stride_y,
                                        const int32_t* slot_to_row, const acc_t* w, int64_t K, int64_t H, int64_t t0,
                                        int64_t t1, scalar_t* grad_NH, acc_t* grad_w) {
  for (int64_t t = t0; t < t1; ++t) {
    const scalar_t* gt = g + t * stride_g;
    for (int64_t j = 0; j < K; ++j) {
      const int64_t r = slot_to_row[t * K + j];
      const scalar_t* yr = y + r * stride_y;
      scalar_t* dy = grad_NH + r * H;
      const acc_t wt = w[t * K + j];
      acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t h = 0; h < H; ++h) {
        const acc_t gv = vm::widen(gt[h]);
        dy[h] = vm::narrow<scalar_t>(gv * wt);
        dot += gv * vm::widen(yr[h]);
      }
      grad_w[t * K + j] = dot;
    }
  }
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

at::Tensor combine_rows(const at::Tensor& y_NH_in, const at::Tensor& slot_to_row_N, const at::Tensor& weights_TK,
                        int64_t top_k) {
  const at::Tensor y_NH = rows_dense(y_NH_in);
  const int64_t N = slot_to_row_N.numel(), H = y_NH.size(1);
  const int64_t T = top_k > 0 ? N / top_k : 0;
  auto out_TH = at::empty({T, H}, y_NH.options());
  if (T == 0 || H == 0) return out_TH;
  const at::Tensor s2r = slot_to_row_N.to(at::kInt).contiguous();
  const auto acc = acc_dtype(y_NH.scalar_type());
  const at::Tensor w = weights_TK.defined() ? weights_TK.to(acc).contiguous() : at::Tensor();
  FINTEAM_DISPATCH_FLOATS(y_NH.scalar_type(), "combine_rows", [&] {
    using acc_t = acc_type<scalar_t>;
    const acc_t* wp = w.defined() ? w.const_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, T, grain(H * top_k), [&](int64_t t0, int64_t t1) {
      combine_kernel<scalar_t, acc_t>(y_NH.const_data_ptr<scalar_t>(), y_NH.stride(0), s2r.const_data_ptr<int32_t>(),
                                      wp, top_k, H, t0, t1, out_TH.data_ptr<scalar_t>());
    });
  });
  return out_TH;
}

namespace {

at::Tensor permute_fwd(const at::Tensor& x_TH, const at::Tensor& row_to_slot_N, int64_t top_k) {
  const at::Tensor x = rows_dense(x_TH);
  const at::Tensor r2s = row_to_slot_N.to(at::kInt).contiguous();
  const int64_t N = r2s.numel();
  auto x_NH = at::empty({N, x.size(1)}, x.options());
  if (N > 0 && x.size(1) > 0) gather_rows(x, r2s.const_data_ptr<int32_t>(), top_k, 0, N, x_NH);
  return x_NH;
}

at::Tensor permute_bwd(const at::Tensor& grad_NH, const at::Tensor& slot_to_row_N, int64_t top_k) {
  return combine_rows(grad_NH, slot_to_row_N, at::Tensor(), top_k);
}

at::Tensor unpermute_fwd(const at::Tensor& y_NH, const at::Tensor& slot_to_row_N, const at::Tensor& topk_weights_TK) {
  return combine_rows(y_NH, slot_to_row_N, topk_weights_TK, topk_weights_TK.size(1));
}

std::tuple<at::Tensor, at::Tensor> unpermute_bwd(const at::Tensor& grad_TH, const at::Tensor& y_NH_in,
                                                 const at::Tensor& row_to_slot_N, const at::Tensor& slot_to_row_N,
                                                 const at::Tensor& topk_weights_TK) {
  const at::Tensor y_NH = rows_dense(y_NH_in);
  const at::Tensor grad = rows_dense(grad_TH.to(y_NH.scalar_type()));
  const int64_t T = topk_weights_TK.size(0), K = topk_weights_TK.size(1), H = y_NH.size(1);
  auto grad_NH = at::empty({y_NH.size(0), H}, y_NH.options());
  const auto acc = acc_dtype(y_NH.scalar_type());
  const at::Tensor w = topk_weights_TK.to(acc).contiguous();
  auto grad_w = at::empty({T, K}, w.options());
  if (T > 0 && H == 0) grad_w.zero_();
  if (T > 0 && H > 0) {
    const at::Tensor s2r = slot_to_row_N.to(at::kInt).contiguous();
    FINTEAM_DISPATCH_FLOATS(y_NH.scalar_type(), "unpermute_bwd", [&] {
      using acc_t = acc_type<scalar_t>;
      at::parallel_for(0, T, grain(2 * H * K), [&](int64_t t0, int64_t t1) {
        unpermute_grad_kernel<scalar_t, acc_t>(grad.const_data_ptr<scalar_t>(), grad.stride(0),
                                               y_NH.const_data_ptr<scalar_t>(), y_NH.stride(0),
                                               s2r.const_data_ptr<int32_t>(), w.const_data_ptr<acc_t>(), K, H, t0, t1,
                                               grad_NH.data_ptr<scalar_t>(), grad_w.data_ptr<acc_t>());
      });
    });
  }
  return {grad_NH, grad_w.to(topk_weights_TK.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(finteam, CPU, m) {
  m.impl("dispatch_fwd", &dispatch_plan);
  m.impl("permute_fwd", &permute_fwd);
  m.impl("permute_bwd", &permute_bwd);
  m.impl("unpermute_fwd", &unpermute_fwd);
  m.impl("unpermute_bwd", &unpermute_bwd);
}

}  // namespace finteam::cpu
