// Element functions written so that the compiler vectorises loops over them: branch-free,
// no library calls for fp32. Each is inlined into a FINTEAM_SIMD kernel and so compiled once
// per ISA level. fp64 uses the C library (fp64 runs only in checks, where accuracy matters).
//
// Accuracy (fp32): exp within 2 ulp; erf within 1.5e-7 absolute (Abramowitz and Stegun
// 7.1.26); tanh within 2e-7 absolute. The tests hold fp32 results to 2e-5 absolute at unit
// scale, and bf16/fp16 results to their rounding, so these are far inside both.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common.h"

namespace finteam::cpu::vm {

FINTEAM_INLINE float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

FINTEAM_INLINE uint32_t to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// Loads widen to the compute type; stores round to nearest even (NaN stays NaN).
FINTEAM_INLINE float widen(float v) { return v; }
FINTEAM_INLINE double widen(double v) { return v; }
FINTEAM_INLINE float widen(c10::BFloat16 v) { return from_bits(static_cast<uint32_t>(v.x) << 16); }
FINTEAM_INLINE float widen(c10::Half v) { return static_cast<float>(v); }

template <typename scalar_t>
FINTEAM_INLINE scalar_t narrow(float v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    uint32_t u = to_bits(v);
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    uint16_t b = v != v ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
    return c10::BFloat16(b, c10::BFloat16::from_bits());
  } else {
    return static_cast<scalar_t>(v);
  }
}

template <typename scalar_t>
FINTEAM_INLINE scalar_t narrow(double v) {
  return static_cast<scalar_t>(v);
}

FINTEAM_INLINE float exp(float x) {
  // exp(x) = 2^n * exp(r), n = round(x / ln 2), r = x - n ln 2 split in two parts (Cody-Waite),
  // exp(r) by the Cephes minimax polynomial on |r| <= ln(2)/2.
  constexpr float kMax = 88.3762626647949f, kMin = -87.3365447505531f;
  float xc = x > kMax ? kMax : (x < kMin ? kMin : x);
  constexpr float kShift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float shifted = xc * 1.44269504088896341f + kShift;
  float n = shifted - kShift;
  int32_t ni = static_cast<int32_t>(to_bits(shifted) - to_bits(kShift));
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  float y = p * from_bits(static_cast<uint32_t>(ni + 127) << 23);
  y = x > kMax ? std::numeric_limits<float>::infinity() : y;
  y = x < kMin ? 0.0f : y;
  return x != x ? x : y;
}

FINTEAM_INLINE double exp(double x) { return std::exp(x); }

template <typename T>
FINTEAM_INLINE T sigmoid(T x) {
  return T(1) / (T(1) + exp(-x));
}

FINTEAM_INLINE float erf(float x) {
  float a = x < 0.0f ? -x : x;
  float t = 1.0f / (1.0f + 0.3275911f * a);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  float y = 1.0f - p * t * exp(-a * a);
  return x < 0.0f ? -y : y;
}

FINTEAM_INLINE double erf(double x) { return std::erf(x); }

FINTEAM_INLINE float tanh(float x) {
  // 1 - 2 / (e^2x + 1) loses relative accuracy near 0, so small |x| takes the odd polynomial.
  float big = 1.0f - 2.0f / (exp(2.0f * x) + 1.0f);
  float x2 = x * x;
  float small = x * (1.0f + x2 * (-0.333333333f + x2 * (0.133333333f + x2 * -0.0539682540f)));
  return (x < 0.125f && x > -0.125f) ? small : big;
}

FINTEAM_INLINE double tanh(double x) { return std::tanh(x); }

FINTEAM_INLINE bool finite(float x) { return x - x == 0.0f; }
FINTEAM_INLINE bool finite(double x) { return x - x == 0.0; }

}  // namespace finteam::cpu::vm
