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
FINTEAM_SIMD void glu_rows_kernel(const scalar_t* h, int64_t stride_h, int64_t I, int64_t r0, int64_t r1,
                                  scalar_t* out) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* gate = h + r * stride_h;
    const scalar_t* up = gate + I;
    scalar_t* o = out + r * I;
#pragma omp simd
    for (int64_t i = 0; i < I; ++i) {
      acc_t f, df;
      activation<A>(static_cast<acc_t>(vm::widen(gate[i])), f, df);
      o[i] = vm::narrow<scalar_t>(f * static_cast<acc_t>(vm::widen(up[i])));
    }
  }
}

}  // namespace

void glu_f32(const float* gate, const float* up, int64_t n, Activation act, float* out) {
  with_activation(act, [&]<Activation A>() { glu_f32_kernel<A>(gate, up, n, out); });
}

void glu_rows(const at::Tensor& h_n2I, Activation act, at::Tensor& out_nI) {
  const int64_t n = h_n2I.size(0), I = out_nI.size(1);
  if (n == 0 || I == 0) return;
  const at::Tensor h = rows_dense(h_n2I);
  FINTEAM_DISPATCH_FLOATS(h.scalar_type(), "glu_rows", [&] {
    with_activation(act, [&]<Activation A>() {
      at::parallel_for(0, n, grain(8 * I), [&](int64_t r0, int64_t r1) {
        glu_rows_kernel<A, scalar_t>(h.const_data_ptr<scalar_t>(), h.stride(0), I, r0, r1, out_nI.data_ptr<scalar_t>());
      });
    });
  });
}

}  // namespace finteam::cpu
