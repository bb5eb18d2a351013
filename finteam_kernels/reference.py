"""Plain-PyTorch version of every MoE op: the spec, the fallback, and what tests and benchmarks
compare against.

Shape legend: T tokens, H hidden, I expert intermediate, E experts, K top-k, N = T*K routed rows;
D and O are a GEMM's input and output widths.

Each function here is differentiable by autograd, and its backward is the spec of the kernels'
backward. Arguments are assumed valid: the public ops in `finteam_kernels` check them first.
Numerics are PyTorch's own in the input dtype (a bf16 matmul rounds its output to bf16), except
where the spec says otherwise: routing math in fp32, and the weighted combine accumulates in fp32.
The grouped GEMM reads the offsets on the host, which synchronises on a GPU: fine for a spec,
which is why it is not the fast path.
"""
import torch
import torch.nn.functional as F

from ._types import DispatchPlan, RouterLosses, Routing

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


def wide(t: torch.Tensor) -> torch.Tensor:
    """t in at least fp32: the precision routing math and accumulations run in (fp64 stays fp64,
    so that gradcheck can check the spec)."""
    return t if t.dtype == torch.float64 else t.float()


def glu(h_N2I: torch.Tensor, activation: str) -> torch.Tensor:
    """The gated unit of an expert: act(gate) * up, with gate and up the two halves of h."""
    gate, up = h_N2I.chunk(2, dim=-1)
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "gelu":
        return F.gelu(gate) * up
    return F.gelu(gate, approximate="tanh") * up


def topk_gating(
    logits_TE: torch.Tensor,
    k: int,
    *,
    score: str = "softmax",
    renormalize: bool = True,
    expert_bias: torch.Tensor | None = None,
    num_groups: int = 1,
    topk_groups: int = 1,
    scaling: float = 1.0,
) -> Routing:
    """Score the experts, choose K per token, weight them.

    - scores: softmax or sigmoid of the logits, in fp32. NaN counts as -inf and +inf as the
      largest float, so any finite logits give finite scores.
    - selection: the K highest `scores + expert_bias` (the bias steers selection only, for
      aux-loss-free balancing), lowest expert index first among equals. With `num_groups > 1`
      (DeepSeek-V3) the experts form equal groups, each group is rated by the sum of its two best
      biased scores, and only the `topk_groups` best groups may be chosen from.
    - weights: the chosen experts' unbiased scores, divided by their sum if `renormalize`, times
      `scaling`.
    - a token with no finite logit gets experts 0..K-1 with zero weights.
    """
    T, E = logits_TE.shape
    x_TE = wide(logits_TE)
    finite_TE = torch.isfinite(x_TE)
    alive_T = finite_TE.any(dim=1, keepdim=True)
    # Non-finite logits get no gradient: selected by where (not multiplied by a 0/1 mask, which
    # would turn an overflowed gradient into NaN).
    extremes_TE = torch.nan_to_num(x_TE.detach(), nan=float("-inf"), posinf=torch.finfo(x_TE.dtype).max)
    x_TE = torch.where(finite_TE, x_TE, extremes_TE)
    # A dead row of NaNs would be all -inf here, its softmax NaN, and the NaN would leak into its
    # gradient through the where below: score dead rows from zeros instead.
    x_TE = torch.where(alive_T, x_TE, 0.0)
    scores_TE = torch.softmax(x_TE, dim=1) if score == "softmax" else torch.sigmoid(x_TE)
    scores_TE = torch.where(alive_T, scores_TE, 0.0)

    with torch.no_grad():
        choice_TE = scores_TE if expert_bias is None else scores_TE + expert_bias.to(scores_TE.dtype)
        choice_TE = torch.where(alive_T, choice_TE, 0.0).nan_to_num(nan=float("-inf"))
        if num_groups > 1:
            grouped_TGS = choice_TE.view(T, num_groups, E // num_groups)
            best_two = min(2, E // num_groups)
            rating_TG = grouped_TGS.topk(best_two, dim=2).values.sum(dim=2)
            kept_TG = _top_indices(rating_TG, topk_groups)
            allowed_TG = torch.zeros_like(rating_TG, dtype=torch.bool).scatter_(1, kept_TG, True)
            allowed_TE = allowed_TG.repeat_interleave(E // num_groups, dim=1)
            choice_TE = torch.where(allowed_TE, choice_TE, float("-inf"))
        ids_TK = _top_indices(choice_TE, k)

    weights_TK = scores_TE.gather(1, ids_TK)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(dim=1, keepdim=True).clamp_min(torch.finfo(x_TE.dtype).tiny)
    weights_TK = weights_TK * scaling
    return Routing(weights_TK, ids_TK.to(torch.int32), tokens_per_expert(ids_TK, E))


def _top_indices(values_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values per row, ties to the lowest index (a stable sort keeps
    equal values in index order; torch.topk does not promise an order among ties)."""
    return torch.sort(values_TE, dim=1, descending=True, stable=True).indices[:, :k]


def tokens_per_expert(ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int32 [E]: how many of the T*K assignments went to each expert (no host sync)."""
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=ids_TK.device)
    counts_E.scatter_add_(0, ids_TK.reshape(-1).long(), torch.ones_like(ids_TK.reshape(-1), dtype=torch.int64))
    return counts_E.to(torch.int32)


def router_losses(logits_TE: torch.Tensor, topk_ids_TK: torch.Tensor, num_experts: int) -> RouterLosses:
    """Load-balancing loss and z-loss of one router.

    aux = E * sum_e f_e * P_e, with f_e the number of the T*K assignments that went to expert e
    divided by T, and P_e the mean softmax probability of e: exactly transformers'
    `load_balancing_loss_func` for Mixtral, so a perfectly balanced router scores K. Only P_e
    carries gradient (f_e counts discrete choices). z = mean_t logsumexp(logits_t)^2 (ST-MoE).
    With no tokens both are 0 and still part of the autograd graph.
    """
    x_TE = wide(logits_TE)
    T = x_TE.shape[0]
    if T == 0:
        zero = x_TE.sum() * 0.0
        return RouterLosses(zero, zero.clone())
    f_E = tokens_per_expert(topk_ids_TK, num_experts).to(x_TE.dtype) / T
    p_E = torch.softmax(x_TE, dim=1).mean(dim=0)
    aux = num_experts * (f_E * p_E).sum()
    z = torch.logsumexp(x_TE, dim=1).square().mean()
    return RouterLosses(aux, z)


def dispatch(topk_ids_TK: torch.Tensor, num_experts: int) -> DispatchPlan:
    """Group the T*K routed slots by expert, stably (slot order inside an expert)."""
    ids_N = topk_ids_TK.reshape(-1).long()
    N = ids_N.numel()
    row_to_slot_N = torch.sort(ids_N, stable=True).indices
    slot_to_row_N = torch.empty_like(row_to_slot_N)
    slot_to_row_N[row_to_slot_N] = torch.arange(N, device=ids_N.device)
    counts_E = tokens_per_expert(topk_ids_TK, num_experts)
    offsets_E1 = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids_N.device)
    offsets_E1[1:] = torch.cumsum(counts_E, dim=0)
    return DispatchPlan(offsets_E1, counts_E, row_to_slot_N.to(torch.int32), slot_to_row_N.to(torch.int32))


def top_k_of(plan: DispatchPlan, num_tokens: int) -> int:
    """K, from the plan's N = T*K rows and the token count."""
    return plan.row_to_slot_N.shape[0] // num_tokens if num_tokens else 0


def permute(x_TH: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """x_NH[r] = x_TH[token of row r]: each token copied once per choice, grouped by expert."""
    K = top_k_of(plan, x_TH.shape[0])
    # With no tokens this is an empty gather that keeps x_TH in the autograd graph: a backward
    # that skipped it would skip a collective in expert parallelism, and hang the other ranks.
    return x_TH.index_select(0, plan.row_to_slot_N.long() // max(K, 1))


def unpermute(y_NH: torch.Tensor, plan: DispatchPlan, topk_weights_TK: torch.Tensor) -> torch.Tensor:
    """out_TH[t] = sum_j w[t, j] * y_NH[row of slot t*K+j], accumulated in fp32, in y's dtype."""
    T, K = topk_weights_TK.shape
    H = y_NH.shape[1]
    y_TKH = y_NH.index_select(0, plan.slot_to_row_N.long()).view(T, K, H)
    out_TH = (wide(y_TKH) * wide(topk_weights_TK).unsqueeze(-1)).sum(dim=1)
    return out_TH.to(y_NH.dtype)


def grouped_gemm(x_ND: torch.Tensor, w_EOD: torch.Tensor, expert_offsets_E1: torch.Tensor) -> torch.Tensor:
    """y_NO[rows of e] = x_ND[rows of e] @ w_EOD[e]^T, rows of e being offsets[e]:offsets[e+1]."""
    bounds = expert_offsets_E1.tolist()
    # unbind, not w_EOD[e]: the backward of E selects adds E full-size [E, O, D] gradients
    # (seconds at E=64); unbind's backward stacks the E slices once.
    w_e = w_EOD.unbind(0)
    blocks = [x_ND[bounds[e] : bounds[e + 1]] @ w_e[e].t() for e in range(w_EOD.shape[0])]
    return torch.cat(blocks) if blocks else x_ND.new_empty((0, w_EOD.shape[1]))


def moe_experts(
    x_TH: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    w_gate_up_E2IH: torch.Tensor,
    w_down_EHI: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """The whole expert computation: out_TH[t] = sum_j w[t,j] * expert_{id[t,j]}(x[t]), where
    expert_e(x) = W_down[e] @ glu(W_gate_up[e] @ x). Weights in transformers' layout: gate rows
    first, then up rows, in w_gate_up_E2IH."""
    plan = dispatch(topk_ids_TK, w_gate_up_E2IH.shape[0])
    h_N2I = grouped_gemm(permute(x_TH, plan), w_gate_up_E2IH, plan.expert_offsets_E1)
    y_NH = grouped_gemm(glu(h_N2I, activation), w_down_EHI, plan.expert_offsets_E1)
    return unpermute(y_NH, plan, topk_weights_TK)
