// The element-wise steps of the experts' backward, row by row.
//
// Shape legend: I expert intermediate, H hidden; rows are the routed rows in expert order, slot
// row_to_slot[r] is a row's (token, k) entry in the routing weights.
#pragma once

#include "common.h"
#include "glu.h"

namespace finteam::cpu {

// For rows r in [r0, r1), from h = [gate | up] and g = dout @ W_down[e] (unweighted):
//   act_out[r] = f(gate) * up                      (for dW_down)
//   grad_w[slot] = <g, act>                        (the routing weight's gradient)
//   dh_out[r] = [w * g * up * f'(gate) | w * g * f(gate)]   (for dW_gate_up and dx)
// in fp32 (fp64 for fp64), each rounded once.
template <typename scalar_t>
void expert_grad_rows(Activation act, const scalar_t* h_N2I, const scalar_t* g_NI, const int32_t* row_to_slot,
                      const acc_type<scalar_t>* w, int64_t I, int64_t r0, int64_t r1, scalar_t* act_out_NI,
                      scalar_t* dh_out_N2I, acc_type<scalar_t>* grad_w);

// rows[r] *= w[row_to_slot[r]] for r in [r0, r1), in place: dout becomes the gradient of the
// expert's output y.
template <typename scalar_t>
void scale_rows(scalar_t* rows_NH, int64_t H, const int32_t* row_to_slot, const acc_type<scalar_t>* w, int64_t r0,
                int64_t r1);

}  // namespace finteam::cpu
