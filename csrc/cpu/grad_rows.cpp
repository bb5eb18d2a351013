// See grad_rows.h.
#include "grad_rows.h"

#include "vmath512.h"

namespace finteam::cpu {
namespace {

// Row r's pieces: its gate and up halves of h, its g, and where its act and dh rows go.
template <typename scalar_t>
struct GradRow {
  const scalar_t *gate, *up, *g;
  scalar_t *act, *dgate, *dup;
  int32_t slot;
};

template <typename scalar_t>
FINTEAM_INLINE GradRow<scalar_t> grad_row(const scalar_t* h, const scalar_t* g, const int32_t* row_to_slot, int64_t I,
                                          int64_t r, scalar_t* act_out, scalar_t* dh_out) {
  return {h + r * 2 * I, h + r * 2 * I + I, g + r * I, act_out + r * I, dh_out + r * 2 * I, dh_out + r * 2 * I + I,
          row_to_slot[r]};
}

template <Activation A, typename scalar_t>
FINTEAM_SIMD void grad_rows_kernel(const scalar_t* h, const scalar_t* g, const int32_t* row_to_slot,
                                  const acc_type<scalar_t>* w, int64_t I, int64_t r0, int64_t r1, scalar_t* act_out,
                                  scalar_t* dh_out, acc_type<scalar_t>* grad_w) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t r = r0; r < r1; ++r) {
    const auto [gate, up, gr, a_row, dgate, dup, slot] = grad_row(h, g, row_to_slot, I, r, act_out, dh_out);
    const acc_t wt = w[slot];
    acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < I; ++i) {
      acc_t f, df;
      const acc_t a = vm::widen(gate[i]), u = vm::widen(up[i]), gv = vm::widen(gr[i]);
      activation<A>(a, f, df);
      dot += gv * f * u;
      a_row[i] = vm::narrow<scalar_t>(f * u);
      const acc_t da = wt * gv;
      dgate[i] = vm::narrow<scalar_t>(da * u * df);
      dup[i] = vm::narrow<scalar_t>(da * f);
    }
    grad_w[slot] = dot;
  }
}

#if FINTEAM_X86
// grad_rows_kernel by hand on AVX-512 (vmath512.h): fp32 and bf16.
template <Activation A, typename scalar_t>
FINTEAM_AVX512 void grad_rows_avx512(const scalar_t* h, const scalar_t* g, const int32_t* row_to_slot, const float* w,
                                     int64_t I, int64_t r0, int64_t r1, scalar_t* act_out, scalar_t* dh_out,
                                     float* grad_w) {
  using namespace v512;
  for (int64_t r = r0; r < r1; ++r) {
    const auto [gate, up, gr, a_row, dgate, dup, slot] = grad_row(h, g, row_to_slot, I, r, act_out, dh_out);
    const V wt = set1(w[slot]);
    V dot = _mm512_setzero_ps();
    for (int64_t i = 0; i < I; i += 16) {
      const __mmask16 m = lanes(I - i);
      const V u = load(up + i, m), gv = load(gr + i, m);
      V f, df;
      activation<A>(load(gate + i, m), f, df);
      const V fu = _mm512_mul_ps(f, u);
      dot = _mm512_fmadd_ps(gv, fu, dot);  // masked lanes load as 0
      store(a_row + i, fu, m);
      const V da = _mm512_mul_ps(wt, gv);
      store(dgate + i, _mm512_mul_ps(_mm512_mul_ps(da, u), df), m);
      store(dup + i, _mm512_mul_ps(da, f), m);
    }
    grad_w[slot] = _mm512_reduce_add_ps(dot);
  }
}
#endif

template <typename scalar_t>
FINTEAM_SIMD void scale_rows_kernel(scalar_t* rows, int64_t H, const int32_t* row_to_slot, const acc_type<scalar_t>* w,
                                    int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const acc_type<scalar_t> wt = w[row_to_slot[r]];
#pragma omp simd
    for (int64_t k = 0; k < H; ++k) rows[r * H + k] = vm::narrow<scalar_t>(wt * vm::widen(rows[r * H + k]));
  }
}

}  // namespace

template <typename scalar_t>
void expert_grad_rows(Activation act, const scalar_t* h_N2I, const scalar_t* g_NI, const int32_t* row_to_slot,
                      const acc_type<scalar_t>* w, int64_t I, int64_t r0, int64_t r1, scalar_t* act_out_NI,
                      scalar_t* dh_out_N2I, acc_type<scalar_t>* grad_w) {
  with_activation(act, [&]<Activation A>() {
#if FINTEAM_X86
    if constexpr (v512::kHasLoop<scalar_t>) {
      if (avx512_loops())
        return grad_rows_avx512<A, scalar_t>(h_N2I, g_NI, row_to_slot, w, I, r0, r1, act_out_NI, dh_out_N2I, grad_w);
    }
#endif
    grad_rows_kernel<A, scalar_t>(h_N2I, g_NI, row_to_slot, w, I, r0, r1, act_out_NI, dh_out_N2I, grad_w);
  });
}

template <typename scalar_t>
void scale_rows(scalar_t* rows_NH, int64_t H, const int32_t* row_to_slot, const acc_type<scalar_t>* w, int64_t r0,
                int64_t r1) {
  scale_rows_kernel<scalar_t>(rows_NH, H, row_to_slot, w, r0, r1);
}

#define FINTEAM_GRAD_ROWS(T)                                                                                       \
  template void expert_grad_rows<T>(Activation, const T*, const T*, const int32_t*, const acc_type<T>*, int64_t, \
                                    int64_t, int64_t, T*, T*, acc_type<T>*);                                     \
  template void scale_rows<T>(T*, int64_t, const int32_t*, const acc_type<T>*, int64_t, int64_t);
FINTEAM_GRAD_ROWS(float)
FINTEAM_GRAD_ROWS(double)
FINTEAM_GRAD_ROWS(c10::Half)
FINTEAM_GRAD_ROWS(c10::BFloat16)
#undef FINTEAM_GRAD_ROWS

}  // namespace finteam::cpu
