// topk_gating on the CPU (the op's Python side: finteam_kernels/ops/topk_gating.py).
//
// Shape legend: T tokens, E experts, K top-k.
// One thread owns a block of tokens; each token's row of E logits is read once into a small
// scratch row, and every step (scores, selection, weights) is a vectorised pass over that row.
// Selection is K passes of "largest untaken value, then its lowest index", which is exactly the
// spec's stable descending sort on the first K places, for any E. Cost: T*E*(K+4) flops on
// data that never leaves L1: at T=4096, E=64 a few tens of microseconds per core.
#include <vector>

#include "checks.h"
#include "ops_cpu.h"
#include "vmath.h"

namespace finteam::cpu {
namespace {
struct GatingArgs {
  int64_t E, K;
  bool softmax, renormalize;
  int64_t num_groups, topk_groups;
  double scaling;
};

bool parse_score(c10::string_view score) {
  TORCH_CHECK(score == "softmax" || score == "sigmoid", "topk_gating: score must be 'softmax' or 'sigmoid'; got '",
              std::string(score), "'");
  return score == "softmax";
}

// The spec's nan_to_num on a logit: NaN ranks last, +inf as the largest finite value.
template <typename acc_t>
FINTEAM_INLINE acc_t sanitize(acc_t v) {
  return v != v ? -kInf<acc_t> : (v == kInf<acc_t> ? kMax<acc_t> : v);
}

// A biased choice value, clamped so that a huge bias cannot make it +-inf or NaN.
template <typename acc_t>
FINTEAM_INLINE acc_t biased(acc_t score, acc_t bias) {
  acc_t v = score + bias;
  return v != v ? -kInf<acc_t> : (v > kMax<acc_t> ? kMax<acc_t> : (v < -kMax<acc_t> ? -kMax<acc_t> : v));
}

// The scores of one token (the spec's nan_to_num, then softmax or sigmoid) into s[0..E);
// returns false when the row has no finite logit (a dead row: zero scores, no gradient).
template <typename scalar_t, typename acc_t>
FINTEAM_INLINE bool score_row(const scalar_t* x, int64_t E, bool softmax, acc_t* s) {
  int alive = 0;
  acc_t m = -kInf<acc_t>;
#pragma omp simd reduction(| : alive) reduction(max : m)
  for (int64_t e = 0; e < E; ++e) {
    acc_t v = vm::widen(x[e]);
    alive |= vm::finite(v) ? 1 : 0;
    v = sanitize(v);
    s[e] = v;
    m = v > m ? v : m;
  }
  if (!alive) return false;
  if (softmax) {
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t e = 0; e < E; ++e) {
      acc_t p = vm::exp(s[e] - m);
      s[e] = p;
      sum += p;
    }
#pragma omp simd
    for (int64_t e = 0; e < E; ++e) s[e] = s[e] / sum;
  } else {
#pragma omp simd
    for (int64_t e = 0; e < E; ++e) s[e] = vm::sigmoid(s[e]);
  }
  return true;
}

// The K largest of c[0..E), lowest index first among equals, in descending order. `taken` is
// all zeros on entry and on return.
template <typename acc_t>
FINTEAM_INLINE void select_top(const acc_t* c, int64_t E, int64_t K, acc_t* taken, int64_t* ids) {
  for (int64_t j = 0; j < K; ++j) {
    acc_t best = -kInf<acc_t>;
#pragma omp simd reduction(max : best)
    for (int64_t e = 0; e < E; ++e) {
      acc_t v = taken[e] != 0 ? -kInf<acc_t> : c[e];
      best = v > best ? v : best;
    }
    int64_t idx = E;
#pragma omp simd reduction(min : idx)
    for (int64_t e = 0; e < E; ++e) {
      bool hit = taken[e] == 0 && c[e] == best;
      idx = hit && e < idx ? e : idx;
    }
    taken[idx] = 1;
    ids[j] = idx;
  }
  for (int64_t j = 0; j < K; ++j) taken[ids[j]] = 0;
}

// DeepSeek-V3's group limit: rate each group by the sum of its two best choices, keep the
// `topk_groups` best groups (lowest index among equals), and rule out every other expert.
template <typename acc_t>
void limit_groups(acc_t* c, const GatingArgs& a, acc_t* rating, acc_t* taken, int64_t* kept) {
  const int64_t S = a.E / a.num_groups;
  for (int64_t g = 0; g < a.num_groups; ++g) {
    acc_t top1 = -kInf<acc_t>, top2 = -kInf<acc_t>;
    for (int64_t e = g * S; e < (g + 1) * S; ++e) {
      if (c[e] > top1) {
        top2 = top1;
        top1 = c[e];
      } else if (c[e] > top2) {
        top2 = c[e];
      }
    }
    rating[g] = S >= 2 ? top1 + top2 : top1;
  }
  select_top(rating, a.num_groups, a.topk_groups, taken, kept);
  for (int64_t g = 0; g < a.topk_groups; ++g) taken[kept[g]] = 1;
  for (int64_t g = 0; g < a.num_groups; ++g) {
    if (taken[g] == 0) {
      for (int64_t e = g * S; e < (g + 1) * S; ++e) c[e] = -kInf<acc_t>;
    }
  }
  for (int64_t g = 0; g < a.num_groups; ++g) taken[g] = 0;
}

template <typename scalar_t, typename acc_t>
FINTEAM_SIMD void gating_rows(const scalar_t* logits, int64_t stride_t, const acc_t* bias, GatingArgs a, int64_t t0,
                              int64_t t1, acc_t* weights_TK, int32_t* ids_TK) {
  const int64_t E = a.E, K = a.K;
  std::vector<acc_t> buf(3 * E + a.num_groups);
  std::vector<int64_t> ids(std::max(K, a.num_groups));
  acc_t *s = buf.data(), *c = s + E, *taken = c + E, *rating = taken + E;
  const bool own_choice = bias != nullptr || a.num_groups > 1;
  for (int64_t t = t0; t < t1; ++t) {
    acc_t* w = weights_TK + t * K;
    int32_t* out_ids = ids_TK + t * K;
    if (!score_row(logits + t * stride_t, E, a.softmax, s)) {
      for (int64_t j = 0; j < K; ++j) {
        out_ids[j] = static_cast<int32_t>(j);
        w[j] = 0;
      }
      continue;
    }
    acc_t* choice = own_choice ? c : s;
    if (bias != nullptr) {
#pragma omp simd
      for (int64_t e = 0; e < E; ++e) c[e] = biased(s[e], bias[e]);
    } else if (own_choice) {
      std::copy(s, s + E, c);
    }
    if (a.num_groups > 1) limit_groups(c, a, rating, taken, ids.data());
    select_top(choice, E, K, taken, ids.data());
    acc_t total = 0;
    for (int64_t j = 0; j < K; ++j) {
      out_ids[j] = static_cast<int32_t>(ids[j]);
      w[j] = s[ids[j]];
      total += w[j];
    }
    if (a.renormalize) {
      total = std::max(total, std::numeric_limits<acc_t>::min());
      for (int64_t j = 0; j < K; ++j) w[j] = w[j] / total;
    }
    const acc_t scaling = static_cast<acc_t>(a.scaling);
    for (int64_t j = 0; j < K; ++j) w[j] = w[j] * scaling;
  }
}

// Few experts (E <= kNarrowE, no groups): one token per vector lane. The row loops above run
// a handful of iterations each, so their setup, not the arithmetic, sets the cost: 125 ns a
// token forward and 75 backward at E = 3, more than torch's softmax + topk (2-core AMD EPYC,
// Zen 5). Here each step over the experts is one vector operation on kLanes tokens, with the
// same arithmetic in the same order per token as the row loops (sums run over the experts or
// the picks first to last), so both give the same bits; the same choice rule too: the largest
// untaken value, the lowest index among equals.
constexpr int64_t kNarrowE = 16;
constexpr int kLanes = 16;  // one AVX-512 register of fp32

template <typename acc_t>
using Lanes = acc_t[kNarrowE][kLanes];  // [e][l]: expert e of token l of the block

// score_row for the block of tokens tb .. tb + n (n <= kLanes) into s[e][l]; alive[l] as
// score_row's result. Lanes past n score zeros, and are never written out.
template <typename scalar_t, typename acc_t>
FINTEAM_INLINE void score_lanes(const scalar_t* logits, int64_t stride_t, int64_t tb, int64_t n, int64_t E,
                                bool softmax, Lanes<acc_t>& s, int32_t* alive) {
  for (int64_t l = 0; l < kLanes; ++l) {
    for (int64_t e = 0; e < E; ++e) s[e][l] = l < n ? vm::widen(logits[(tb + l) * stride_t + e]) : acc_t(0);
  }
  acc_t m[kLanes];
#pragma omp simd
  for (int l = 0; l < kLanes; ++l) {
    alive[l] = 0;
    m[l] = -kInf<acc_t>;
  }
  for (int64_t e = 0; e < E; ++e) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      acc_t v = s[e][l];
      alive[l] |= vm::finite(v) ? 1 : 0;
      v = sanitize(v);
      s[e][l] = v;
      m[l] = v > m[l] ? v : m[l];
    }
  }
  if (softmax) {
    acc_t sum[kLanes];
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) sum[l] = 0;
    for (int64_t e = 0; e < E; ++e) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        acc_t p = vm::exp(s[e][l] - m[l]);
        s[e][l] = p;
        sum[l] += p;
      }
    }
    for (int64_t e = 0; e < E; ++e) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) s[e][l] = s[e][l] / sum[l];
    }
  } else {
    for (int64_t e = 0; e < E; ++e) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) s[e][l] = vm::sigmoid(s[e][l]);
    }
  }
}

// v[l] = s[ids[l]][l] for every lane: a gather by each token's own expert id.
template <typename acc_t>
FINTEAM_INLINE void pick_lanes(const Lanes<acc_t>& s, int64_t E, const int32_t* ids, acc_t* v) {
  for (int64_t e = 0; e < E; ++e) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) v[l] = ids[l] == e ? s[e][l] : (e == 0 ? acc_t(0) : v[l]);
  }
}

template <typename scalar_t, typename acc_t>
FINTEAM_SIMD void gating_rows_narrow(const scalar_t* logits, int64_t stride_t, const acc_t* bias, GatingArgs a,
                                     int64_t t0, int64_t t1, acc_t* weights_TK, int32_t* ids_TK) {
  const int64_t E = a.E, K = a.K;
  Lanes<acc_t> s, c;
  acc_t w[kNarrowE][kLanes];
  int32_t ids[kNarrowE][kLanes], taken[kNarrowE][kLanes], alive[kLanes];
  for (int64_t tb = t0; tb < t1; tb += kLanes) {
    const int64_t n = std::min<int64_t>(kLanes, t1 - tb);
    score_lanes(logits, stride_t, tb, n, E, a.softmax, s, alive);
    auto& choice = bias != nullptr ? c : s;
    for (int64_t e = 0; e < E; ++e) {
      const acc_t b = bias != nullptr ? bias[e] : acc_t(0);
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        if (bias != nullptr) c[e][l] = biased(s[e][l], b);
        taken[e][l] = 0;
      }
    }
    for (int64_t j = 0; j < K; ++j) {
      acc_t best[kLanes];
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        best[l] = -kInf<acc_t>;
        ids[j][l] = -1;
      }
      // Experts first to last, a strictly larger value replacing: the lowest index among equals.
      for (int64_t e = 0; e < E; ++e) {
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) {
          const bool take = taken[e][l] == 0 && (ids[j][l] < 0 || choice[e][l] > best[l]);
          best[l] = take ? choice[e][l] : best[l];
          ids[j][l] = take ? static_cast<int32_t>(e) : ids[j][l];
        }
      }
      for (int64_t e = 0; e < E; ++e) {
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) taken[e][l] |= ids[j][l] == e ? 1 : 0;
      }
      pick_lanes(s, E, ids[j], w[j]);
    }
    acc_t total[kLanes];
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) total[l] = 0;
    for (int64_t j = 0; j < K; ++j) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) total[l] += w[j][l];
    }
    const acc_t scaling = static_cast<acc_t>(a.scaling);
    for (int64_t j = 0; j < K; ++j) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        acc_t v = w[j][l];
        if (a.renormalize) v = v / std::max(total[l], std::numeric_limits<acc_t>::min());
        w[j][l] = alive[l] ? v * scaling : acc_t(0);
        ids[j][l] = alive[l] ? ids[j][l] : static_cast<int32_t>(j);  // a dead row: ids 0..K-1, weight 0
      }
    }
    for (int64_t l = 0; l < n; ++l) {
      for (int64_t j = 0; j < K; ++j) {
        weights_TK[(tb + l) * K + j] = w[j][l];
        ids_TK[(tb + l) * K + j] = ids[j][l];
      }
    }
  }
}

// gating_grad_rows (below) on kLanes tokens at a time, for E <= kNarrowE.
template <typename scalar_t, typename acc_t>
FINTEAM_SIMD void gating_grad_rows_narrow(const acc_t* grad_TK, const scalar_t* logits, int64_t stride_t,
                                          IndexView ids_TK, GatingArgs a, int64_t t0, int64_t t1, scalar_t* grad_TE) {
  const int64_t E = a.E, K = a.K;
  const acc_t scaling = static_cast<acc_t>(a.scaling);
  Lanes<acc_t> s, v;
  acc_t g[kNarrowE][kLanes], q[kNarrowE][kLanes], total[kLanes], gq[kLanes], sum[kLanes];
  int32_t ids[kNarrowE][kLanes], alive[kLanes];
  for (int64_t tb = t0; tb < t1; tb += kLanes) {
    const int64_t n = std::min<int64_t>(kLanes, t1 - tb);
    score_lanes(logits, stride_t, tb, n, E, a.softmax, s, alive);
    for (int64_t l = 0; l < kLanes; ++l) {
      for (int64_t j = 0; j < K; ++j) {
        g[j][l] = l < n ? grad_TK[(tb + l) * K + j] * scaling : acc_t(0);
        ids[j][l] = l < n ? static_cast<int32_t>(ids_TK[(tb + l) * K + j]) : 0;
      }
    }
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) total[l] = 0;
    for (int64_t j = 0; j < K; ++j) {
      pick_lanes(s, E, ids[j], q[j]);
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) total[l] += q[j][l];
    }
    if (a.renormalize) {
      // The clamp passes no gradient when it binds.
      const acc_t tiny = std::numeric_limits<acc_t>::min();
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) gq[l] = 0;
      for (int64_t j = 0; j < K; ++j) {
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) {
          q[j][l] = q[j][l] / std::max(total[l], tiny);
          gq[l] += g[j][l] * q[j][l];
        }
      }
      for (int64_t j = 0; j < K; ++j) {
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) g[j][l] = g[j][l] - (total[l] < tiny ? acc_t(0) : gq[l]);
      }
    }
    // v_e += q_j * g_j where pick j is expert e, picks in order, as the row loop adds them (it
    // matters only for ids that repeat within a row, which no forward makes).
    for (int64_t e = 0; e < E; ++e) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) v[e][l] = 0;
      for (int64_t j = 0; j < K; ++j) {
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) v[e][l] = ids[j][l] == e ? v[e][l] + q[j][l] * g[j][l] : v[e][l];
      }
    }
    if (a.softmax) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) sum[l] = 0;
      for (int64_t e = 0; e < E; ++e) {
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) sum[l] += v[e][l];
      }
      for (int64_t e = 0; e < E; ++e) {
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) v[e][l] = v[e][l] - s[e][l] * sum[l];
      }
    } else {
      for (int64_t e = 0; e < E; ++e) {
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) v[e][l] = v[e][l] * (acc_t(1) - s[e][l]);
      }
    }
    for (int64_t l = 0; l < n; ++l) {
      const scalar_t* x = logits + (tb + l) * stride_t;
      scalar_t* dx = grad_TE + (tb + l) * E;
      for (int64_t e = 0; e < E; ++e) {
        dx[e] = vm::narrow<scalar_t>(alive[l] && vm::finite(vm::widen(x[e])) ? v[e][l] : acc_t(0));
      }
    }
  }
}

// The gradient works on the scores' side: with q = s / max(sum s, tiny) <= 1 it forms
// v_e = s_e * dL/ds_e = q_e * (g_e - sum_k g_k q_k), which stays finite when the clamped sum is
// tiny and the incoming gradient large (g / sum would overflow), then dx = v - s * sum(v) for
// softmax and v * (1 - s) for sigmoid.
template <typename scalar_t, typename acc_t>
FINTEAM_SIMD void gating_grad_rows(const acc_t* grad_TK, const scalar_t* logits, int64_t stride_t, IndexView ids_TK,
                                   GatingArgs a, int64_t t0, int64_t t1, scalar_t* grad_TE) {
  const int64_t E = a.E, K = a.K;
  const acc_t scaling = static_cast<acc_t>(a.scaling);
  std::vector<acc_t> buf(2 * E + 2 * K);
  acc_t *s = buf.data(), *v = s + E, *g = v + E, *q = g + K;
  for (int64_t t = t0; t < t1; ++t) {
    const scalar_t* x = logits + t * stride_t;
    scalar_t* dx = grad_TE + t * E;
    if (!score_row(x, E, a.softmax, s)) {
      for (int64_t e = 0; e < E; ++e) dx[e] = scalar_t(0);
      continue;
    }
    acc_t total = 0;
    for (int64_t j = 0; j < K; ++j) {
      g[j] = grad_TK[t * K + j] * scaling;
      q[j] = s[ids_TK[t * K + j]];
      total += q[j];
    }
    std::fill(v, v + E, acc_t(0));
    if (a.renormalize) {
      // The clamp passes no gradient when it binds.
      const acc_t tiny = std::numeric_limits<acc_t>::min();
      const acc_t denom = std::max(total, tiny);
      acc_t gq = 0;
      for (int64_t j = 0; j < K; ++j) {
        q[j] = q[j] / denom;
        gq += g[j] * q[j];
      }
      if (total < tiny) gq = 0;
      for (int64_t j = 0; j < K; ++j) v[ids_TK[t * K + j]] += q[j] * (g[j] - gq);
    } else {
      for (int64_t j = 0; j < K; ++j) v[ids_TK[t * K + j]] += q[j] * g[j];
    }
    if (a.softmax) {
      acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t e = 0; e < E; ++e) sum += v[e];
#pragma omp simd
      for (int64_t e = 0; e < E; ++e) {
        acc_t d = v[e] - s[e] * sum;
        dx[e] = vm::narrow<scalar_t>(vm::finite(vm::widen(x[e])) ? d : acc_t(0));
      }
    } else {
#pragma omp simd
      for (int64_t e = 0; e < E; ++e) {
        acc_t d = v[e] * (acc_t(1) - s[e]);
        dx[e] = vm::narrow<scalar_t>(vm::finite(vm::widen(x[e])) ? d : acc_t(0));
      }
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_gating_fwd(const at::Tensor& logits_TE,
                                                               const std::optional<at::Tensor>& expert_bias_E,
                                                               int64_t k, c10::string_view score, bool renormalize,
                                                               int64_t num_groups, int64_t topk_groups,
                                                               double scaling) {
  TORCH_CHECK(logits_TE.dim() == 2, "topk_gating: logits_TE must be 2-D");
  const at::Tensor logits = rows_dense(logits_TE);
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= E, "topk_gating: k must be in [1, ", E, "]; got ", k);
  TORCH_CHECK(num_groups >= 1 && E % num_groups == 0, "topk_gating: num_groups must divide E=", E, "; got ",
              num_groups);
  TORCH_CHECK(topk_groups >= 1 && topk_groups <= num_groups, "topk_gating: topk_groups must be in [1, num_groups]");
  const GatingArgs a{E, k, parse_score(score), renormalize, num_groups, num_groups > 1 ? topk_groups : 1, scaling};
  const auto acc = acc_dtype(logits.scalar_type());
  auto weights_TK = at::empty({T, k}, logits.options().dtype(acc));
  auto ids_TK = at::empty({T, k}, logits.options().dtype(at::kInt));
  at::Tensor bias;
  if (expert_bias_E.has_value()) bias = expert_bias_E->to(acc).contiguous();
  FINTEAM_DISPATCH_FLOATS(logits.scalar_type(), "topk_gating_fwd", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const acc_t* b = bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr;
    acc_t* w = weights_TK.data_ptr<acc_t>();
    int32_t* ids = ids_TK.data_ptr<int32_t>();
    if (E <= kNarrowE && a.num_groups == 1) {
      // the row loops' work a token, shared by the kLanes tokens of a vector
      at::parallel_for(0, T, grain(E * (k + 4) / kLanes + 1), [&](int64_t t0, int64_t t1) {
        gating_rows_narrow<scalar_t, acc_t>(x, logits.stride(0), b, a, t0, t1, w, ids);
      });
    } else {
      at::parallel_for(0, T, grain(E * (k + 4)), [&](int64_t t0, int64_t t1) {
        gating_rows<scalar_t, acc_t>(x, logits.stride(0), b, a, t0, t1, w, ids);
      });
    }
  });
  auto counts_E = at::zeros({E}, logits.options().dtype(at::kInt));
  int32_t* counts = counts_E.data_ptr<int32_t>();
  const int32_t* ids = ids_TK.const_data_ptr<int32_t>();
  for (int64_t n = 0; n < T * k; ++n) ++counts[ids[n]];
  return {weights_TK, ids_TK, counts_E};
}

at::Tensor topk_gating_bwd(const at::Tensor& grad_weights_TK, const at::Tensor& logits_TE, const at::Tensor& ids_TK,
                           c10::string_view score, bool renormalize, double scaling) {
  const at::Tensor logits = rows_dense(logits_TE);
  const int64_t T = logits.size(0), E = logits.size(1), K = ids_TK.size(1);
  const GatingArgs a{E, K, parse_score(score), renormalize, 1, 1, scaling};
  const auto acc = acc_dtype(logits.scalar_type());
  const at::Tensor grad = grad_weights_TK.to(acc).contiguous();
  check_indices(ids_TK, E, "topk_gating", "ids_TK");
  const at::Tensor ids = ids_TK.contiguous();
  auto grad_TE = at::empty({T, E}, logits.options());
  const IndexView idx = index_view(ids);
  FINTEAM_DISPATCH_FLOATS(logits.scalar_type(), "topk_gating_bwd", [&] {
    using acc_t = acc_type<scalar_t>;
    if (E <= kNarrowE) {
      at::parallel_for(0, T, grain(E * 4 / kLanes + 1), [&](int64_t t0, int64_t t1) {
        gating_grad_rows_narrow<scalar_t, acc_t>(grad.const_data_ptr<acc_t>(), logits.const_data_ptr<scalar_t>(),
                                                 logits.stride(0), idx, a, t0, t1, grad_TE.data_ptr<scalar_t>());
      });
    } else {
      at::parallel_for(0, T, grain(E * 4), [&](int64_t t0, int64_t t1) {
        gating_grad_rows<scalar_t, acc_t>(grad.const_data_ptr<acc_t>(), logits.const_data_ptr<scalar_t>(),
                                          logits.stride(0), idx, a, t0, t1, grad_TE.data_ptr<scalar_t>());
      });
    }
  });
  return grad_TE;
}

}  // namespace finteam::cpu
