"""Every op is memory-safe on every input a caller can pass: a DispatchPlan whose indices are out
of range (built by hand, tampered with in place, or `_replace`d: it is a public NamedTuple),
expert ids outside [0, E) and expert offsets that overrun the rows get an error naming the op and
the argument, on every backend here, eager, with autograd and under torch.compile, never garbage
or a read out of bounds. A plan made by `dispatch` is trusted (not re-read) until written to.
The compiled CPU library's ops, called directly, check what they read as well."""
import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from backends import kernel_backends
from routing import routed

import finteam_kernels as fk
from finteam_kernels import DispatchPlan, _checks
from finteam_kernels._types import is_issued

BACKENDS = ["reference", *kernel_backends()]
MODES = ["eager", "autograd", "compiled"]
T, K, E, H = 6, 2, 3, 8
N = T * K

_compiled = {}


def run(mode, key, fn, *tensors):
    """fn(*tensors) without autograd, with float inputs requiring grad, or compiled (one compile
    per key: the bad values change nothing the graph guards on)."""
    if mode == "autograd":
        tensors = [t.detach().requires_grad_() if t.is_floating_point() else t for t in tensors]
    if mode == "compiled":
        if key not in _compiled:
            torch._dynamo.reset()
            _compiled[key] = torch.compile(fn, backend="aot_eager", dynamic=False)
        return _compiled[key](*tensors)
    with torch.set_grad_enabled(mode == "autograd"):
        return fn(*tensors)


def expect_error(op, argument):
    """Eager: a ValueError from the op's check. Compiled: the same check, raised by the custom op
    when it runs, or by the assertion the check put in the graph (a RuntimeError)."""
    return pytest.raises((ValueError, RuntimeError), match=rf"{op}: {argument}")


def good_plan():
    return fk.dispatch(routed(T, K, E), E, backend="reference")


def bad_plans():
    """(name, plan) pairs, each with one index out of range."""
    plan = good_plan()
    past_end = plan.row_to_slot_N.clone()
    past_end[0] = N  # one past the end
    far = plan.slot_to_row_N.clone()
    far[3] = 10**8  # far out: the read that segfaulted the CPU library
    negative = plan.row_to_slot_N.clone()
    negative[-1] = -1
    tampered = good_plan()
    tampered.slot_to_row_N[1] = N + 5  # written in place: no longer the plan dispatch made
    return [
        ("past_end", DispatchPlan(*plan[:2], past_end, plan.slot_to_row_N)),
        ("far", plan._replace(slot_to_row_N=far)),
        ("negative", DispatchPlan(*plan[:2], negative, plan.slot_to_row_N)),
        ("tampered", tampered),
    ]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [name for name, _ in bad_plans()])
def test_permute_refuses_a_plan_out_of_range(backend, mode, case):
    plan = dict(bad_plans())[case]
    x = torch.randn(T, H)

    def fn(x, offsets, counts, row_to_slot, slot_to_row):
        return fk.permute(x, DispatchPlan(offsets, counts, row_to_slot, slot_to_row), backend=backend)

    args = (x, *plan) if mode == "compiled" else (x,)
    call = fn if mode == "compiled" else (lambda x: fk.permute(x, plan, backend=backend))
    with expect_error("permute", r"plan\.(row_to_slot_N|slot_to_row_N) must hold"):
        run(mode, ("permute", backend), call, *args)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [name for name, _ in bad_plans()])
def test_unpermute_refuses_a_plan_out_of_range(backend, mode, case):
    plan = dict(bad_plans())[case]
    y, w = torch.randn(N, H), torch.rand(T, K)

    def fn(y, w, offsets, counts, row_to_slot, slot_to_row):
        return fk.unpermute(y, DispatchPlan(offsets, counts, row_to_slot, slot_to_row), w, backend=backend)

    args = (y, w, *plan) if mode == "compiled" else (y, w)
    call = fn if mode == "compiled" else (lambda y, w: fk.unpermute(y, plan, w, backend=backend))
    with expect_error("unpermute", r"plan\.(row_to_slot_N|slot_to_row_N) must hold"):
        run(mode, ("unpermute", backend), call, *args)


BAD_IDS = [
    ("E", E, torch.int32),  # one past the last expert
    ("far", 2**30, torch.int32),
    ("negative", -1, torch.int32),
    ("past_int32", 2**40, torch.int64),  # wraps to a valid id if truncated to int32
]


def bad_ids(value, dtype):
    ids = routed(T, K, E, dtype=dtype)
    ids[T // 2, 1] = value
    return ids


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, value, dtype", BAD_IDS)
def test_dispatch_refuses_ids_out_of_range(backend, mode, case, value, dtype):
    with expect_error("dispatch", "topk_ids_TK must hold expert ids"):
        run(mode, ("dispatch", backend), lambda ids: fk.dispatch(ids, E, backend=backend), bad_ids(value, dtype))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, value, dtype", BAD_IDS)
def test_moe_experts_refuses_ids_out_of_range(backend, mode, case, value, dtype):
    I = 4
    x, w = torch.randn(T, H), torch.rand(T, K)
    w_gate_up, w_down = torch.randn(E, 2 * I, H), torch.randn(E, H, I)

    def fn(x, ids, w, w_gate_up, w_down):
        return fk.moe_experts(x, ids, w, w_gate_up, w_down, backend=backend)

    with expect_error("moe_experts", "topk_ids_TK must hold expert ids"):
        run(mode, ("moe_experts", backend, dtype), fn, x, bad_ids(value, dtype), w, w_gate_up, w_down)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, value, dtype", BAD_IDS)
def test_router_losses_refuses_ids_out_of_range(backend, mode, case, value, dtype):
    def fn(logits, ids):
        return fk.router_losses(logits, ids, E, backend=backend)

    with expect_error("router_losses", "topk_ids_TK must hold expert ids"):
        run(mode, ("router_losses", backend, dtype), fn, torch.randn(T, E), bad_ids(value, dtype))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offsets", [[0, 5, 3, 9], [0, 4, 9, 10**8], [-4, 0, 4, 9], [0, 3, 5, 7]],
                         ids=["decreasing", "past_the_rows", "negative", "short_of_the_rows"])
def test_grouped_gemm_refuses_offsets_out_of_range(backend, mode, offsets):
    x, w = torch.randn(9, H), torch.randn(3, 5, H)

    def fn(x, w, offsets):
        return fk.grouped_gemm(x, w, offsets, backend=backend)

    with expect_error("grouped_gemm", "expert_offsets_E1 must start at 0"):
        run(mode, ("grouped_gemm", backend), fn, x, w, torch.tensor(offsets))


def test_a_dispatched_plan_is_trusted_until_written(monkeypatch):
    checked = []
    monkeypatch.setattr(_checks, "check_rows", lambda op, *t: checked.append(op) or True)
    plan = fk.dispatch(routed(T, K, E), E)
    x = torch.randn(T, H)
    assert is_issued(plan)
    fk.permute(x, plan)
    fk.unpermute(torch.randn(N, H), plan, torch.rand(T, K))
    assert checked == []  # nothing re-read
    assert not is_issued(plan._replace(row_to_slot_N=plan.row_to_slot_N))  # a copy is foreign
    assert not is_issued(DispatchPlan(*plan))
    plan.row_to_slot_N.add_(0)  # any write, even one that changes nothing
    assert not is_issued(plan)
    fk.permute(x, plan)
    assert checked == ["permute"]


def test_a_good_foreign_plan_still_works():
    """Validation refuses only what is out of range: a hand-built copy of a good plan runs."""
    plan = good_plan()
    x = torch.randn(T, H)
    for backend in BACKENDS:
        foreign = DispatchPlan(*(t.clone() for t in plan))
        assert torch.equal(fk.permute(x, foreign, backend=backend), fk.permute(x, plan, backend="reference"))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_compiled_moe_experts_with_ids_past_e_raises_under_inductor(backend):
    """The finding as reported: ids >= E under torch.compile (inductor) ran with no error and gave
    values around 1e28, because the id check is skipped while tracing."""
    I = 4
    x, w = torch.randn(T, H), torch.rand(T, K)
    w_gate_up, w_down = torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    torch._dynamo.reset()
    fn = torch.compile(lambda x, ids: fk.moe_experts(x, ids, w, w_gate_up, w_down, backend=backend))
    good = routed(T, K, E)
    assert torch.allclose(fn(x, good), fk.moe_experts(x, good, w, w_gate_up, w_down, backend="reference"),
                          atol=1e-5)
    with pytest.raises((ValueError, RuntimeError), match="moe_experts: topk_ids_TK must hold expert ids"):
        fn(x, bad_ids(E + 7, torch.int32))


CPU_LIBRARY_CASES = {
    # op called directly, with the argument that must be named
    "permute_fwd": ("torch.ops.finteam.permute_fwd(torch.randn(6, 8), bad_rows(12), 2)", "row_to_slot_N"),
    "permute_bwd": ("torch.ops.finteam.permute_bwd(torch.randn(12, 8), bad_rows(12), 2)", "slot_to_row_N"),
    "unpermute_fwd": ("torch.ops.finteam.unpermute_fwd(torch.randn(12, 8), bad_rows(12), torch.rand(6, 2))",
                      "slot_to_row_N"),
    "unpermute_bwd": ("torch.ops.finteam.unpermute_bwd(torch.randn(6, 8), torch.randn(12, 8), "
                      "torch.arange(12, dtype=torch.int32), bad_rows(12), torch.rand(6, 2))", "slot_to_row_N"),
    # in range but a row twice (and one never): that row of the gradient would be left unwritten
    "unpermute_bwd_repeat": ("torch.ops.finteam.unpermute_bwd(torch.randn(6, 8), torch.randn(12, 8), "
                             "torch.arange(12, dtype=torch.int32), torch.tensor([0] * 2 + list(range(2, 12)), "
                             "dtype=torch.int32), torch.rand(6, 2))", "slot_to_row_N"),
    "topk_gating_bwd": ("torch.ops.finteam.topk_gating_bwd(torch.rand(6, 2), torch.randn(6, 3), bad_ids(), "
                        "'softmax', True, 1.0)", "ids_TK"),
    "moe_experts_bwd": ("torch.ops.finteam.moe_experts_bwd(torch.randn(6, 8), torch.randn(6, 8), torch.rand(6, 2), "
                        "torch.randn(3, 8, 8), torch.randn(3, 8, 4), torch.randn(12, 8), "
                        "torch.tensor([0, 4, 8, 12]), bad_rows(12), torch.arange(12, dtype=torch.int32), 'silu')",
                        "row_to_slot_N"),
    "dispatch_fwd": ("torch.ops.finteam.dispatch_fwd(bad_ids(), 3)", "topk_ids_TK"),
    "moe_experts_fwd": ("torch.ops.finteam.moe_experts_fwd(torch.randn(6, 8), bad_ids(), torch.rand(6, 2), "
                        "torch.randn(3, 8, 8), torch.randn(3, 8, 4), 'silu', False)", "topk_ids_TK"),
    "router_losses_fwd": ("torch.ops.finteam.router_losses_fwd(torch.randn(6, 3), bad_ids(), 3)", "topk_ids_TK"),
    "grouped_gemm_fwd": ("torch.ops.finteam.grouped_gemm_fwd(torch.randn(9, 8), torch.randn(3, 5, 8), "
                         "torch.tensor([0, 4, 9, 10**8]))", "expert_offsets_E1"),
}


@pytest.mark.skipif("cpu" not in kernel_backends(), reason="the compiled CPU library is not built")
@pytest.mark.parametrize("op", sorted(CPU_LIBRARY_CASES))
def test_cpu_library_ops_refuse_indices_out_of_range(op):
    """In a subprocess, so that a read out of bounds shows as a failed test (a crash), not the
    end of the test run."""
    call, argument = CPU_LIBRARY_CASES[op]
    script = textwrap.dedent(f"""
        import torch
        from finteam_kernels import _ext
        _ext.load("cpu")

        def bad_rows(n):
            t = torch.arange(n, dtype=torch.int32).flip(0).contiguous()
            t[n // 2] = 10**8
            return t

        def bad_ids():
            ids = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 9], [1, 0], [2, 1]], dtype=torch.int32)
            return ids

        try:
            out = {call}
        except RuntimeError as err:
            print("REFUSED", err)
        else:
            print("RAN", out if isinstance(out, torch.Tensor) else out[0])
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"crashed with exit code {proc.returncode}: {proc.stderr[-2000:]}"
    assert "REFUSED" in proc.stdout, proc.stdout[-2000:]
    name = op.removesuffix("_repeat").removesuffix("_fwd").removesuffix("_bwd")
    assert f"{name}: {argument}" in proc.stdout, proc.stdout


def test_deepcopy_after_a_forward_with_gradients():
    layer = fk.FinTeamMoE(H, 4, E, K, z_loss_coef=1e-3)
    x = torch.randn(T, H, requires_grad=True)
    out = layer(x)
    twin = copy.deepcopy(layer)
    assert torch.equal(twin(x.detach()), out.detach())
    stats, twin_stats = layer.router_stats, copy.deepcopy(layer).router_stats
    assert stats.aux_loss.requires_grad and not twin_stats.aux_loss.requires_grad
    for a, b in zip(stats, twin_stats):
        assert torch.equal(a.detach(), b)
    (out.sum() + fk.router_aux_loss(layer)).backward()  # the original's graph is intact
    assert layer.gate.weight.grad is not None
