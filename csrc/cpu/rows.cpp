// Row movement that permute, unpermute and moe_experts share: the gather of token rows into
// expert order and the weighted combine back into token order (see rows.h).
//
// Shape legend: T tokens, H hidden, E experts, K top-k, N = T*K routed rows.
#include <cstring>
#include <vector>

#include "alloc.h"
#include "rows.h"
#include "vmath.h"

namespace finteam::cpu {

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
  const int64_t bytes = x_TH.size(1) * x_TH.element_size(), src_stride = x_TH.stride(0) * x_TH.element_size();
  const char* x = static_cast<const char*>(x_TH.const_data_ptr());
  char* y = static_cast<char*>(out.data_ptr());  // row r at y + (r - r0) * out_stride
  const int64_t out_stride = out.stride(0) * out.element_size();
  at::parallel_for(r0, r1, grain(bytes), [&](int64_t a, int64_t b) {
    gather_rows_serial(x, src_stride, row_to_slot_N, top_k, bytes, a, b, y + (a - r0) * out_stride, out_stride);
  });
}

void gather_rows_serial(const void* x, int64_t x_stride, const int32_t* row_to_slot_N, int64_t top_k, int64_t bytes,
                        int64_t r0, int64_t r1, void* out, int64_t out_stride) {
  const char* src = static_cast<const char*>(x);
  char* dst = static_cast<char*>(out);
  for (int64_t r = r0; r < r1; ++r) {
    std::memcpy(dst + (r - r0) * out_stride, src + (row_to_slot_N[r] / top_k) * x_stride, bytes);
  }
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

}  // namespace

at::Tensor combine_rows(const at::Tensor& y_NH_in, const at::Tensor& slot_to_row_N, const at::Tensor& weights_TK,
                        int64_t top_k) {
  const at::Tensor y_NH = rows_dense(y_NH_in);
  const int64_t N = slot_to_row_N.numel(), H = y_NH.size(1);
  const int64_t T = top_k > 0 ? N / top_k : 0;
  auto out_TH = empty_large({T, H}, y_NH.options());
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

}  // namespace finteam::cpu
