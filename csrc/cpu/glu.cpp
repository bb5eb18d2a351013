// The gated-unit loops (see glu.h); vectorised per ISA by FINTEAM_SIMD.
#include "glu.h"

namespace finteam::cpu {

Activation parse_activation(c10::string_view name) {
  if (name == "silu") return Activation::silu;
  if (name == "gelu") return Activation::gelu;
  TORCH_CHECK(name == "gelu_tanh", "moe_experts: activation must be 'silu', 'gelu' or 'gelu_tanh'; got '",
              std::string(name), "'");
  return Activation::gelu_tanh;
}

namespace {

template <Activation A>
FINTEAM_SIMD void glu_f32_kernel(const float* gate, const float* up, int64_t n, float* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float f, df;
    activation<A>(gate[i], f, df);
    out[i] = f * up[i];
  }
}

template <Activation A, typename scalar_t>
FINTEAM_SIMD void glu_rows_kernel(const scalar_t* gate, int64_t stride_g, const scalar_t* up, int64_t stride_u,
                                  int64_t cols, int64_t r0, int64_t r1, scalar_t* out) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* g = gate + r * stride_g;
    const scalar_t* u = up + r * stride_u;
    scalar_t* o = out + r * cols;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) {
      acc_t f, df;
      activation<A>(static_cast<acc_t>(vm::widen(g[c])), f, df);
      o[c] = vm::narrow<scalar_t>(f * static_cast<acc_t>(vm::widen(u[c])));
    }
  }
}

}  // namespace

void glu_f32(const float* gate, const float* up, int64_t n, Activation act, float* out) {
  with_activation(act, [&]<Activation A>() { glu_f32_kernel<A>(gate, up, n, out); });
}

void glu(const at::Tensor& gate_in, const at::Tensor& up_in, Activation act, at::Tensor& out) {
  const int64_t rows = out.size(0), cols = out.size(1);
  if (rows == 0 || cols == 0) return;
  const at::Tensor gate = rows_dense(gate_in), up = rows_dense(up_in);
  FINTEAM_DISPATCH_FLOATS(out.scalar_type(), "glu", [&] {
    with_activation(act, [&]<Activation A>() {
      at::parallel_for(0, rows, grain(8 * cols), [&](int64_t r0, int64_t r1) {
        glu_rows_kernel<A, scalar_t>(gate.const_data_ptr<scalar_t>(), gate.stride(0), up.const_data_ptr<scalar_t>(),
                                     up.stride(0), cols, r0, r1, out.data_ptr<scalar_t>());
      });
    });
  });
}

}  // namespace finteam::cpu
