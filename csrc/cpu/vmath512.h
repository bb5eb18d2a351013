// The element functions of vmath.h and glu.h on 16 fp32 lanes of AVX-512, step for step the
// same arithmetic (the same constants, divisions, clamps and special cases), for the gated
// unit's loops: GCC's x86-64-v4 clone of a FINTEAM_SIMD loop runs on 256-bit vectors (its
// generic tuning; target_clones takes no tuning option), and these loops are compute-bound.
// The SwiGLU forward of 512 x 1792 bf16 rows on one core of a 2-core AMD EPYC (Zen 5): 205-212
// us here against 614-626 us for the FINTEAM_SIMD loop, with the same bf16 results.
//
// Only for x86 builds that have the clones (FINTEAM_X86); callers check avx512_loops(). A loop
// is a FINTEAM_AVX512 function; it inlines these FINTEAM_AVX512_LOOP ones.
#pragma once

#include "glu.h"

#if FINTEAM_X86
#include <immintrin.h>

namespace finteam::cpu::v512 {

using V = __m512;

// The element types these loops load and store: fp32 and bf16 (fp16 and fp64 keep the portable
// loops).
template <typename scalar_t>
constexpr bool kHasLoop = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>;

FINTEAM_AVX512_LOOP V set1(float v) { return _mm512_set1_ps(v); }

// Loads of n <= 16 elements widened to fp32 (lanes past n read as 0), and the matching stores
// (bf16 rounded to nearest even, NaN kept quiet: vm::narrow).
FINTEAM_AVX512_LOOP V load(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
FINTEAM_AVX512_LOOP V load(const c10::BFloat16* p, __mmask16 m) {
  const __m256i b = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}
FINTEAM_AVX512_LOOP void store(float* p, V v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
FINTEAM_AVX512_LOOP void store(c10::BFloat16* p, V v, __mmask16 m) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
}

FINTEAM_AVX512_LOOP __mmask16 lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}

FINTEAM_AVX512_LOOP V exp(V x) {  // vm::exp
  const V kMax = set1(88.3762626647949f), kMin = set1(-87.3365447505531f), kShift = set1(12582912.0f);
  const V xc = _mm512_max_ps(_mm512_min_ps(x, kMax), kMin);
  const V shifted = _mm512_fmadd_ps(xc, set1(1.44269504088896341f), kShift);
  const V n = _mm512_sub_ps(shifted, kShift);
  const __m512i ni = _mm512_sub_epi32(_mm512_castps_si512(shifted), _mm512_castps_si512(kShift));
  V r = _mm512_fnmadd_ps(n, set1(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, set1(-2.12194440e-4f), r);
  V p = set1(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, set1(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, set1(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, set1(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, set1(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, set1(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), set1(1.0f));
  const V scale = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(ni, _mm512_set1_epi32(127)), 23));
  V y = _mm512_mul_ps(p, scale);
  y = _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, kMax, _CMP_GT_OQ), set1(__builtin_inff()));
  y = _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, kMin, _CMP_LT_OQ), _mm512_setzero_ps());
  return _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);
}

FINTEAM_AVX512_LOOP V neg(V x) { return _mm512_sub_ps(_mm512_setzero_ps(), x); }

FINTEAM_AVX512_LOOP V erf(V x) {  // vm::erf
  const V a = _mm512_abs_ps(x);
  const V t = _mm512_div_ps(set1(1.0f), _mm512_fmadd_ps(set1(0.3275911f), a, set1(1.0f)));
  V p = set1(1.061405429f);
  p = _mm512_fmsub_ps(p, t, set1(1.453152027f));
  p = _mm512_fmadd_ps(p, t, set1(1.421413741f));
  p = _mm512_fmsub_ps(p, t, set1(0.284496736f));
  p = _mm512_fmadd_ps(p, t, set1(0.254829592f));
  const V y = _mm512_fnmadd_ps(_mm512_mul_ps(p, t), exp(_mm512_mul_ps(neg(a), a)), set1(1.0f));
  return _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), neg(y));
}

FINTEAM_AVX512_LOOP V tanh(V x) {  // vm::tanh
  const V big = _mm512_sub_ps(set1(1.0f), _mm512_div_ps(set1(2.0f), _mm512_add_ps(exp(_mm512_add_ps(x, x)), set1(1.0f))));
  const V x2 = _mm512_mul_ps(x, x);
  V q = _mm512_fmadd_ps(x2, set1(-0.0539682540f), set1(0.133333333f));
  q = _mm512_fmadd_ps(x2, q, set1(-0.333333333f));
  const V small = _mm512_mul_ps(x, _mm512_fmadd_ps(x2, q, set1(1.0f)));
  const __mmask16 near0 = _mm512_cmp_ps_mask(_mm512_abs_ps(x), set1(0.125f), _CMP_LT_OQ);
  return _mm512_mask_mov_ps(big, near0, small);
}

// f(a) and f'(a) of glu.h's `activation`; df only where the caller uses it (the compiler drops
// the rest when it is not).
template <Activation A>
FINTEAM_AVX512_LOOP void activation(V a, V& f, V& df) {
  const V one = set1(1.0f);
  if constexpr (A == Activation::silu) {
    const V s = _mm512_div_ps(one, _mm512_add_ps(one, exp(neg(a))));
    f = _mm512_mul_ps(a, s);
    df = _mm512_mul_ps(s, _mm512_fmadd_ps(a, _mm512_sub_ps(one, s), one));
  } else if constexpr (A == Activation::gelu) {
    const V cdf = _mm512_mul_ps(set1(0.5f), _mm512_add_ps(one, erf(_mm512_mul_ps(a, set1(0.70710678118654752f)))));
    f = _mm512_mul_ps(a, cdf);
    const V bell = exp(_mm512_mul_ps(_mm512_mul_ps(set1(-0.5f), a), a));
    df = _mm512_fmadd_ps(_mm512_mul_ps(a, set1(0.39894228040143268f)), bell, cdf);
  } else {
    const V k0 = set1(0.79788456080286536f), k1 = set1(0.044715f), half = set1(0.5f);
    const V a2 = _mm512_mul_ps(a, a);
    const V th = tanh(_mm512_mul_ps(k0, _mm512_fmadd_ps(_mm512_mul_ps(k1, a2), a, a)));
    const V one_th = _mm512_add_ps(one, th);
    f = _mm512_mul_ps(_mm512_mul_ps(half, a), one_th);
    const V slope = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(half, a), _mm512_fnmadd_ps(th, th, one)), k0);
    df = _mm512_fmadd_ps(slope, _mm512_fmadd_ps(_mm512_mul_ps(set1(3.0f), k1), a2, one), _mm512_mul_ps(half, one_th));
  }
}

}  // namespace finteam::cpu::v512
#endif
