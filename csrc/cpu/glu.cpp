// The gated-unit loops (see glu.h): by hand on AVX-512 (vmath512.h) for fp32 and bf16,
// elsewhere vectorised per ISA by FINTEAM_SIMD.
#include "glu.h"

#include "vmath512.h"

namespace finteam::cpu {

Activation parse_activation(c10::string_view name) {
  if (name == "silu") return Activation::silu;
  if (name == "gelu") return Activation::gelu;
  TORCH_CHECK(name == "gelu_tanh", "moe_experts: activation must be 'silu', 'gelu' or 'gelu_tanh'; got '",
              std::string(name), "'");
  return Activation::gelu_tanh;
}

namespace {

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

#if FINTEAM_X86
template <Activation A, typename scalar_t>
FINTEAM_AVX512 void glu_rows_avx512(const scalar_t* gate, int64_t stride_g, const scalar_t* up, int64_t stride_u,
                                    int64_t cols, int64_t r0, int64_t r1, scalar_t* out) {
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* g = gate + r * stride_g;
    const scalar_t* u = up + r * stride_u;
    scalar_t* o = out + r * cols;
    for (int64_t c = 0; c < cols; c += 16) {
      const __mmask16 m = v512::lanes(cols - c);
      v512::V f, df;
      v512::activation<A>(v512::load(g + c, m), f, df);
      v512::store(o + c, _mm512_mul_ps(f, v512::load(u + c, m)), m);
    }
  }
}
#endif

// The row loop for scalar_t: by hand where AVX-512 runs and the type has a form there.
template <Activation A, typename scalar_t>
auto glu_rows() {
#if FINTEAM_X86
  if constexpr (v512::kHasLoop<scalar_t>) {
    if (avx512_loops()) return glu_rows_avx512<A, scalar_t>;
  }
#endif
  return glu_rows_kernel<A, scalar_t>;
}

}  // namespace

void glu_f32(const float* gate, const float* up, int64_t n, Activation act, float* out) {
  // one row of the rows loop
  with_activation(act, [&]<Activation A>() { glu_rows<A, float>()(gate, 0, up, 0, n, 0, 1, out); });
}

void glu(const at::Tensor& gate_in, const at::Tensor& up_in, Activation act, at::Tensor& out) {
  const int64_t rows = out.size(0), cols = out.size(1);
  if (rows == 0 || cols == 0) return;
  const at::Tensor gate = rows_dense(gate_in), up = rows_dense(up_in);
  FINTEAM_DISPATCH_FLOATS(out.scalar_type(), "glu", [&] {
    with_activation(act, [&]<Activation A>() {
      const auto kernel = glu_rows<A, scalar_t>();
      at::parallel_for(0, rows, grain(8 * cols), [&](int64_t r0, int64_t r1) {
        kernel(gate.const_data_ptr<scalar_t>(), gate.stride(0), up.const_data_ptr<scalar_t>(), up.stride(0), cols, r0,
               r1, out.data_ptr<scalar_t>());
      });
    });
  });
}

}  // namespace finteam::cpu
