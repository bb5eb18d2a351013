"""Expert parallelism on 2 CPU processes with gloo: outputs and every gradient equal those of the
single-process layer with the same weights run on all ranks' tokens together, including a rank
with no tokens and a rank whose experts receive none; the shard's state dict names; balancing
counts summed over ranks."""
import copy
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tolerance import assert_close

from finteam_kernels import FinTeamMoE, update_expert_bias

WORLD = 2
H, I, E = 10, 6, 4  # two experts per rank

# Each case: the layer's options, the tokens of each rank, and the selection bias (which decides
# which ranks the tokens travel to).
CASES = {
    # both ranks send to both: the ordinary exchange, shared expert with its gate
    "both_ways": dict(layer=dict(top_k=2, shared_expert_size=5, shared_expert_gate=True), tokens=(9, 6), bias=None),
    # rank 1 has no tokens: it sends nothing, still receives and computes for rank 0
    "a_rank_without_tokens": dict(layer=dict(top_k=2, score="sigmoid"), tokens=(11, 0), bias=None),
    # every token picks experts 0 and 1 (rank 0's): rank 1's experts receive nothing and get
    # exactly zero gradients
    "a_rank_receiving_nothing": dict(layer=dict(top_k=2), tokens=(5, 8), bias=(5.0, 5.0, 0.0, 0.0)),
    # top-1 with 3 tokens on rank 1
    "top1": dict(layer=dict(top_k=1, renormalize=False), tokens=(4, 3), bias=None),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(rank: int, case: dict) -> None:
    torch.manual_seed(0)  # the same full layer and the same tokens on every rank
    full = FinTeamMoE(H, I, E, **case["layer"])
    if case["bias"] is not None:
        full.expert_bias.copy_(torch.tensor(case["bias"]))
    counts = case["tokens"]
    x_all = torch.randn(sum(counts), H)
    g_all = torch.randn(sum(counts), H)  # the gradient arriving at the output
    mine = slice(sum(counts[:rank]), sum(counts[: rank + 1]))

    single = copy.deepcopy(full)
    x_ref = x_all.clone().requires_grad_()
    out_ref = single(x_ref)
    out_ref.backward(g_all)

    shard = copy.deepcopy(full).shard_experts_(dist.group.WORLD)
    lo, hi = shard.experts.expert_range
    assert (lo, hi) == (rank * 2, rank * 2 + 2) and shard.experts.gate_up_proj.shape[0] == 2
    x = x_all[mine].clone().requires_grad_()
    out = shard(x)
    out.backward(g_all[mine])

    assert_close(out.detach(), out_ref[mine].detach(), name="out")
    assert_close(x.grad, x_ref.grad[mine], name="grad x")
    for name in ("gate_up_proj", "down_proj"):  # the experts' owner sees every rank's tokens
        assert_close(getattr(shard.experts, name).grad, getattr(single.experts, name).grad[lo:hi], name=name)
    if case["bias"] is not None and rank == 1:
        assert not shard.experts.gate_up_proj.grad.any() and not shard.experts.down_proj.grad.any()
    for name, p in shard.named_parameters():  # replicated parameters: the ranks' gradients sum up
        if not name.startswith("experts."):
            grad = p.grad.clone()
            dist.all_reduce(grad)
            assert_close(grad, single.get_parameter(name).grad, name=f"grad {name}")


def check_state_dicts(rank: int) -> None:
    torch.manual_seed(0)
    full = FinTeamMoE(H, I, E, 2)
    shard = copy.deepcopy(full).shard_experts_(dist.group.WORLD)
    lo, hi = rank * 2, rank * 2 + 2
    state = shard.state_dict()
    assert f"experts.gate_up_proj[{lo}:{hi}]" in state and f"experts.down_proj[{lo}:{hi}]" in state
    assert "experts.gate_up_proj" not in state
    # A shard built directly holds E/P experts and loads its own shard's state dict...
    direct = FinTeamMoE(H, I, E, 2, ep_group=dist.group.WORLD)
    assert direct.experts.gate_up_proj.shape == (2, 2 * I, H)
    direct.load_state_dict(state)
    assert torch.equal(direct.experts.gate_up_proj, full.experts.gate_up_proj[lo:hi])
    # ...a full checkpoint (taking its slice), and the older per-expert layout.
    direct = FinTeamMoE(H, I, E, 2, ep_group=dist.group.WORLD)
    direct.load_state_dict(full.state_dict())
    assert torch.equal(direct.experts.down_proj, full.experts.down_proj[lo:hi])
    old = {k: v for k, v in full.state_dict().items() if not k.startswith("experts.")}
    for e in range(E):
        old[f"experts.{e}.w1.weight"], old[f"experts.{e}.w3.weight"] = full.experts.gate_up_proj[e].detach().chunk(2)
        old[f"experts.{e}.w2.weight"] = full.experts.down_proj[e].detach()
    direct = FinTeamMoE(H, I, E, 2, ep_group=dist.group.WORLD)
    direct.load_state_dict(old)
    assert torch.equal(direct.experts.gate_up_proj, full.experts.gate_up_proj[lo:hi])


def check_bias_update_sums_counts(rank: int) -> None:
    """update_expert_bias all-reduces the counts: every rank gets the bias that the counts of all
    ranks' tokens together give."""
    torch.manual_seed(0)
    full = FinTeamMoE(H, I, E, 1, bias_update_rate=0.1)
    x_all = torch.randn(12, H)
    single = copy.deepcopy(full)
    single(x_all)
    load = single.expert_load_E.clone()
    shard = copy.deepcopy(full).shard_experts_(dist.group.WORLD)
    shard(x_all[rank * 6 : rank * 6 + 6])
    update_expert_bias(shard)
    assert torch.equal(shard.expert_bias, 0.1 * torch.sign(load.double().mean() - load).float())


def worker(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a hang (a rank skipping an exchange) fails after the timeout instead of blocking CI
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        for name, case in CASES.items():
            try:
                run_case(rank, case)
            except AssertionError as err:
                raise AssertionError(f"case {name}, rank {rank}: {err}") from err
        check_state_dicts(rank)
        check_bias_update_sums_counts(rank)
        dist.barrier()  # no rank tears gloo down while another is still exchanging
    finally:
        dist.destroy_process_group()


def test_expert_parallel_equals_single_process():
    mp.spawn(worker, args=(free_port(),), nprocs=WORLD, join=True)
