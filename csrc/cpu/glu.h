// The gated units of an expert (SwiGLU, GeGLU with erf, GeGLU with tanh) and their gradients.
//
// Shape legend: I expert intermediate; h rows hold [gate | up], 2I wide.
//   act = f(gate) * up;  d gate = d act * up * f'(gate);  d up = d act * f(gate)
#pragma once

#include "common.h"
#include "vmath.h"

namespace finteam::cpu {

enum class Activation { silu, gelu, gelu_tanh };

Activation parse_activation(c10::string_view name);

// f(a) and f'(a) of the activation: inlined into vectorised loops, so A is a template argument.
template <Activation A, typename T>
FINTEAM_INLINE void activation(T a, T& f, T& df) {
  if constexpr (A == Activation::silu) {
    const T s = vm::sigmoid(a);
    f = a * s;
    df = s * (T(1) + a * (T(1) - s));
  } else if constexpr (A == Activation::gelu) {
    const T cdf = T(0.5) * (T(1) + vm::erf(a * T(0.70710678118654752)));
    f = a * cdf;
    df = cdf + a * T(0.39894228040143268) * vm::exp(T(-0.5) * a * a);
  } else {
    const T k0 = T(0.79788456080286536), k1 = T(0.044715);
    const T th = vm::tanh(k0 * (a + k1 * a * a * a));
    f = T(0.5) * a * (T(1) + th);
    df = T(0.5) * (T(1) + th) + T(0.5) * a * (T(1) - th * th) * k0 * (T(1) + T(3) * k1 * a * a);
  }
}

// Calls fn.template operator()<A>() for the runtime activation `act`.
template <typename Fn>
inline void with_activation(Activation act, Fn&& fn) {
  switch (act) {
    case Activation::silu: fn.template operator()<Activation::silu>(); break;
    case Activation::gelu: fn.template operator()<Activation::gelu>(); break;
    case Activation::gelu_tanh: fn.template operator()<Activation::gelu_tanh>(); break;
  }
}

// out[i] = f(gate[i]) * up[i] for i < n, in fp32.
void glu_f32(const float* gate, const float* up, int64_t n, Activation act, float* out);

// out[r, c] = f(gate[r, c]) * up[r, c], computed in fp32 and rounded once; parallel over rows.
// gate and up are 2-D views with dense rows: h[:, :I] and h[:, I:] of h_N2I, or the two halves
// of its transpose. out is contiguous.
void glu(const at::Tensor& gate, const at::Tensor& up, Activation act, at::Tensor& out);

}  // namespace finteam::cpu
