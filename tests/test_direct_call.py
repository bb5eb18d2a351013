"""The public ops reach their kernels three ways: directly without autograd (`_backend.direct_call`),
through a torch.autograd.Function of their own outside torch.compile and other tracing
(`_backend.eager_function`), and through their torch.library custom op where something traces.
All three must give the same bits, the last two the same gradients too."""
import contextlib

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from backends import kernel_backends
from routing import routed

import finteam_kernels as fk

BACKENDS = kernel_backends()


def both_ways(fn, *tensors):
    """fn's outputs with autograd off (direct kernel call) and on (through the custom op)."""
    with torch.no_grad():
        direct = fn(*tensors)
    through_op = fn(*[t.detach().requires_grad_(t.is_floating_point()) for t in tensors])
    return direct, through_op


def assert_same(direct, through_op):
    direct = direct if isinstance(direct, tuple) else (direct,)
    through_op = through_op if isinstance(through_op, tuple) else (through_op,)
    for a, b in zip(direct, through_op):
        assert torch.equal(a, b.detach())


def op_inputs(backend: str):
    """Every op's inputs on a few tokens and a prime number of experts: E, K, logits_TE, x_TH,
    w_gate_up_E2IH, w_down_EHI, ids_TK, weights_TK and the dispatch plan of the ids."""
    T, E, K, H, I = 9, 5, 2, 16, 12
    ids_TK = routed(T, K, E)
    return (E, K, torch.randn(T, E), torch.randn(T, H), torch.randn(E, 2 * I, H), torch.randn(E, H, I), ids_TK,
            torch.rand(T, K), fk.dispatch(ids_TK, E, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_direct_and_custom_op_calls_agree(backend):
    E, K, logits_TE, x_TH, w_gate_up_E2IH, w_down_EHI, ids_TK, weights_TK, plan = op_inputs(backend)

    assert_same(*both_ways(lambda l: fk.topk_gating(l, K, backend=backend), logits_TE))
    assert_same(*both_ways(lambda l: fk.router_losses(l, ids_TK, E, backend=backend), logits_TE))
    assert_same(*both_ways(lambda x: fk.permute(x, plan, backend=backend), x_TH))
    x_NH = fk.permute(x_TH, plan, backend=backend)
    assert_same(*both_ways(lambda y, w: fk.unpermute(y, plan, w, backend=backend), x_NH, weights_TK))
    assert_same(*both_ways(lambda x, w: fk.grouped_gemm(x, w, plan.expert_offsets_E1, backend=backend),
                           x_NH, w_gate_up_E2IH))
    assert_same(*both_ways(lambda x, w, a, b: fk.moe_experts(x, ids_TK, w, a, b, backend=backend),
                           x_TH, weights_TK, w_gate_up_E2IH, w_down_EHI))


class Transparent(TorchDispatchMode):
    """A dispatch mode that runs every op as it is: with one active, the ops count as traced and
    take their custom ops (as under fake tensors or AOTAutograd)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class Watching(TorchFunctionMode):
    """A torch function mode that runs every call as it is and keeps what it saw: with one
    active the ops count as traced too (a tracer built on a function mode sees each op whole)."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.add(str(func))
        return func(*args, **(kwargs or {}))


def outputs_and_grads(fn, tensors, mode=None):
    """fn's outputs and the gradients of a fixed random projection of them, under `mode` (the ops
    then take their custom ops) or none (eager autograd functions); the grad_fn names of the
    outputs."""
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in tensors]
    with mode if mode is not None else contextlib.nullcontext():
        out = fn(*leaves)
        out = out if isinstance(out, tuple) else (out,)
        floats = [o for o in out if o.requires_grad]
        g = torch.Generator().manual_seed(1)
        loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in floats)
        loss.backward()
    names = {o.grad_fn.name() for o in floats}
    return [o.detach() for o in out], [t.grad for t in leaves if t.requires_grad], names


@pytest.mark.parametrize("mode", [Transparent, Watching])
@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_autograd_and_custom_op_agree_in_outputs_and_gradients(backend, mode):
    E, K, logits_TE, x_TH, w_gate_up_E2IH, w_down_EHI, ids_TK, weights_TK, plan = op_inputs(backend)
    x_NH = fk.permute(x_TH, plan, backend=backend)
    cases = {
        "topk_gating": (lambda l: fk.topk_gating(l, K, backend=backend)[:1], logits_TE),
        "router_losses": (lambda l: tuple(fk.router_losses(l, ids_TK, E, backend=backend)), logits_TE),
        "permute": (lambda x: fk.permute(x, plan, backend=backend), x_TH),
        "unpermute": (lambda y, w: fk.unpermute(y, plan, w, backend=backend), x_NH, weights_TK),
        "grouped_gemm": (lambda x, w: fk.grouped_gemm(x, w, plan.expert_offsets_E1, backend=backend),
                         x_NH, w_gate_up_E2IH),
        "moe_experts": (lambda x, w, a, b: fk.moe_experts(x, ids_TK, w, a, b, backend=backend),
                        x_TH, weights_TK, w_gate_up_E2IH, w_down_EHI),
    }
    for op, (fn, *tensors) in cases.items():
        eager_out, eager_grads, eager_names = outputs_and_grads(fn, tensors)
        watcher = mode()
        op_out, op_grads, op_names = outputs_and_grads(fn, tensors, watcher)
        if mode is Watching:  # it saw the op itself, not only the kernels inside it
            assert f"finteam.{op}.default" in watcher.seen, (op, sorted(watcher.seen))
        # each way is the one asked for: the eager function is named after the op, the custom
        # op's autograd node after its schema
        assert eager_names == {f"{op}Backward"}, op
        assert all(name.startswith(f"GeneratedBackwardFor_finteam_{op}") for name in op_names), (op, op_names)
        assert len(eager_grads) == len(tensors) and all(g is not None for g in eager_grads), op
        for a, b in zip(eager_out + eager_grads, op_out + op_grads):
            assert torch.equal(a, b), op


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_autograd_refuses_a_second_derivative(backend):
    """As the custom ops do (their backward ops have no autograd): an error, not a wrong answer."""
    x = torch.randn(4, 8, requires_grad=True)
    weights = fk.topk_gating(x, 2, renormalize=False, backend=backend).weights_TK
    (grad,) = torch.autograd.grad((weights ** 2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad.sum().backward()
