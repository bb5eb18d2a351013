"""Expert parallelism: each of the P ranks of a process group holds E/P of the experts, and tokens
travel to their experts' ranks and back.

Shape legend: T tokens, H hidden, I expert intermediate, E experts (global), K top-k, N = T*K
routed rows, P ranks, L = E/P experts per rank, R rows a rank receives.

Rank r holds the global experts [r*L, (r+1)*L). One layer's forward, on every rank:
  1. plan = dispatch(ids_TK, E), x_NH = permute(x_TH, plan): the routed rows grouped by global
     expert, hence by owner rank, so rank r's rows form one contiguous block.
  2. counts first: an all_to_all of tokens_per_expert_E (viewed [P, L]) tells each rank how many
     rows every rank sends to each of its experts.
  3. the split sizes reach the host: the one synchronisation per layer, unavoidable because
     all_to_all_single takes its splits as Python ints.
  4. all_to_all_single sends the rows; the received rows [R, H] come grouped by source rank, then
     by local expert.
  5. the local experts run on them with moe_experts (K = 1, weight 1): the routing weights stay
     at home, so their gradient is computed where they live.
  6. all_to_all_single sends the results back the way they came, and unpermute combines them
     with the routing weights: out_TH equals the single-process layer's.
The backward of each exchange is the reverse exchange (splits swapped). Works with any backend
of the ops; NCCL on GPUs, gloo on CPUs. Every rank must take part in every layer, even with no
tokens, and the layer inputs must agree on requires_grad across ranks (otherwise one rank skips a
backward exchange that the others wait for).
"""
import torch
import torch.distributed as dist

from .ops.dispatch import dispatch
from .ops.moe_experts import moe_experts
from .ops.permute import permute
from .ops.unpermute import unpermute


def shard_range(num_experts: int, group: dist.ProcessGroup, where: str = "FinTeamMoE") -> tuple[int, int]:
    """[lo, hi): the global experts this rank holds in `group`."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{where}: ep_group needs torch.distributed to be initialised (init_process_group)")
    P, rank = dist.get_world_size(group), dist.get_rank(group)
    if num_experts % P != 0:
        raise ValueError(f"{where}: num_experts ({num_experts}) must be divisible by the ep_group size ({P})")
    L = num_experts // P
    return rank * L, (rank + 1) * L


def _exchange(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    """all_to_all_single: send[p] rows of x (in rank order) to rank p, receive recv[p] from it."""
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
    return out


class _Exchange(torch.autograd.Function):
    """A differentiable all_to_all_single: the gradient goes back the way the rows came."""

    @staticmethod
    def forward(ctx, x, send, recv, group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _exchange(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.recv, ctx.send, ctx.group), None, None, None


def expert_parallel_experts(
    x_TH: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    w_gate_up_L2IH: torch.Tensor,
    w_down_LHI: torch.Tensor,
    activation: str,
    group: dist.ProcessGroup,
    backend: str | None = None,
) -> torch.Tensor:
    """moe_experts over the experts of all ranks of `group`, this rank holding its L of them.
    topk_ids_TK holds global expert ids; returns out_TH for this rank's tokens."""
    P, L = dist.get_world_size(group), w_gate_up_L2IH.shape[0]
    plan = dispatch(topk_ids_TK, P * L, backend=backend)
    x_NH = permute(x_TH, plan, backend=backend)

    send_counts_PL = plan.tokens_per_expert_E.long().view(P, L)
    recv_counts_PL = _exchange(send_counts_PL, [1] * P, [1] * P, group)
    splits = torch.cat([send_counts_PL.sum(dim=1), recv_counts_PL.sum(dim=1)]).tolist()  # the host sync
    send, recv = splits[:P], splits[P:]

    x_RH = _Exchange.apply(x_NH, send, recv, group)
    local_ids_R1 = (
        torch.arange(L, device=x_TH.device)
        .repeat(P)
        .repeat_interleave(recv_counts_PL.reshape(-1), output_size=sum(recv))
        .view(-1, 1)
    )
    ones_R1 = torch.ones_like(local_ids_R1, dtype=torch.float32)
    y_RH = moe_experts(x_RH, local_ids_R1, ones_R1, w_gate_up_L2IH, w_down_LHI, activation, backend=backend)
    y_NH = _Exchange.apply(y_RH, recv, send, group)
    return unpermute(y_NH, plan, topk_weights_TK, backend=backend)
