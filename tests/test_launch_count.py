"""How many kernels one FinTeamMoE forward launches, counted without a GPU: every Triton launch
(interpreted here) and every torch op that would launch a kernel on a GPU, inside the custom ops
too. At decode sizes, and under CUDA graphs, this count is the cost of a call; vLLM's inference
path is about 8. Also: no host synchronisation, and the layer's lean path (trusted routing,
counts reused, losses only when needed) gives the same bits as the public ops one by one."""
import pytest
import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode

import finteam_kernels as fk
from finteam_kernels.ops import dispatch_kernels
from finteam_kernels.ops.dispatch import dispatch_counted

triton = pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

# torch ops that allocate or reinterpret memory without launching anything
NO_LAUNCH = {"empty", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh", "alias"}
SYNCS = {"_local_scalar_dense", "item", "nonzero", "equal", "is_nonzero"}


class Launches(TorchDispatchMode):
    """Records `launches` (kernel launches, by name) and `syncs` (ops that read a device value
    on the host). A Triton launch counts once, whatever the interpreter does inside it."""

    def __init__(self):
        super().__init__()
        self.launches, self.syncs, self.in_kernel = [], [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._overloadpacket.__name__
        qualified = f"{func.namespace}::{name}"
        if qualified in OPDEFS:  # a Python custom op: count what its implementation launches
            with self:
                return OPDEFS[qualified]._init_fn(*args, **kwargs)
        if not self.in_kernel:
            if name in SYNCS:
                self.syncs.append(qualified)
            elif not func.is_view and name not in NO_LAUNCH:
                self.launches.append(qualified)
        return func(*args, **kwargs)

    def triton_launch(self, kernel_name):
        self.launches.append(f"triton::{kernel_name}")


@pytest.fixture
def count_launches(monkeypatch):
    """count_launches(fn) -> (launches, syncs) of one call of fn."""
    modes = []
    run = InterpretedFunction.run

    def counted_run(self, *args, **kwargs):
        mode = modes[-1] if modes else None
        if mode is None or mode.in_kernel or kwargs.get("warmup"):
            return run(self, *args, **kwargs)
        mode.triton_launch(self.fn.__name__)
        mode.in_kernel = True
        try:
            return run(self, *args, **kwargs)
        finally:
            mode.in_kernel = False

    monkeypatch.setattr(InterpretedFunction, "run", counted_run)

    def count(fn):
        mode = Launches()
        modes.append(mode)
        try:
            with mode:
                fn()
        finally:
            modes.pop()
        return mode.launches, mode.syncs

    return count


SHAPES = [
    (1, 128, 256, 3, 2),  # decode on the tiny team shape
    (4, 128, 256, 3, 2),  # a few tokens
    (300, 16, 8, 8, 2),  # 600 routed rows: two dispatch blocks in the interpreter
    (1500, 16, 8, 8, 2),  # 3000 rows: 6 blocks, each adding up the earlier blocks' counts
]


@pytest.mark.parametrize("T, H, I, E, K", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_forward_launches_at_most_8(count_launches, T, H, I, E, K, dtype):
    layer = fk.FinTeamMoE(H, I, E, K, backend="triton", dtype=dtype).eval()
    x = torch.randn(T, H, dtype=dtype)
    with torch.no_grad():
        launches, syncs = count_launches(lambda: layer(x))
    assert len(launches) <= 8, launches
    assert not syncs
    # gate, gating (+ its count's zero fill), dispatch, two GEMMs, combine; no checks, no losses
    assert not any("router" in name or "min" in name or "max" in name for name in launches), launches


@pytest.mark.parametrize("T, H, I, E, K", SHAPES)
def test_training_forward_launches_at_most_12(count_launches, T, H, I, E, K):
    layer = fk.FinTeamMoE(H, I, E, K, backend="triton", bias_update_rate=1e-3).train()
    x = torch.randn(T, H, requires_grad=True)
    launches, syncs = count_launches(lambda: layer(x))
    assert len(launches) <= 12, launches
    assert not syncs


def test_the_counter_sees_what_it_should(count_launches):
    """The count is not vacuous: the public ops one by one launch more (ids checked, zero fills,
    dispatch counting again), and a host read is seen as a sync."""
    T, H, I, E, K = 4, 16, 8, 3, 2
    layer = fk.FinTeamMoE(H, I, E, K, backend="triton").eval()
    x = torch.randn(T, H)

    def by_hand():
        logits = layer.gate(x)
        routing = fk.topk_gating(logits, K, expert_bias=layer.expert_bias, backend="triton")
        fk.moe_experts(x, routing.ids_TK, routing.weights_TK, layer.experts.gate_up_proj, layer.experts.down_proj,
                       backend="triton")
        fk.router_losses(logits, routing.ids_TK, E, backend="triton")

    with torch.no_grad():
        lean, _ = count_launches(lambda: layer(x))
        public, syncs = count_launches(by_hand)
    assert len(public) > len(lean) + 3, (public, lean)
    assert syncs  # the CPU id checks read their minimum and maximum


@pytest.mark.parametrize("T, H, I, E, K", SHAPES[:3])
@pytest.mark.parametrize("train", [False, True])
def test_lean_layer_gives_the_public_ops_bits(T, H, I, E, K, train):
    torch.manual_seed(1)
    layer = fk.FinTeamMoE(H, I, E, K, backend="triton", z_loss_coef=1e-3).train(train)
    x = torch.randn(T, H)
    with torch.set_grad_enabled(train):
        out = layer(x)
        stats = layer.router_stats
        logits = layer.gate(x)
        routing = fk.topk_gating(logits, K, expert_bias=layer.expert_bias, backend="triton")
        want = fk.moe_experts(x, routing.ids_TK, routing.weights_TK, layer.experts.gate_up_proj,
                              layer.experts.down_proj, backend="triton")
        losses = fk.router_losses(logits, routing.ids_TK, E, backend="triton")
    assert torch.equal(out, want)
    assert torch.equal(stats.aux_loss, losses.aux_loss) and torch.equal(stats.z_loss, losses.z_loss)
    assert torch.equal(stats.tokens_per_expert_E, routing.tokens_per_expert_E)
    assert stats.aux_loss.requires_grad == train


# (N, E): one block, a full block, two blocks, a few, more than SUM_MAX_BLOCKS, many experts
GIVEN_COUNTS = [(5, 3), (512, 3), (513, 8), (600, 8), (6000, 5), (40000, 3), (512 * 40, 64)]


@pytest.mark.parametrize("N, E", GIVEN_COUNTS)
def test_dispatch_with_given_counts_matches(N, E):
    """Every way the place kernel learns its prefix (one block, adding up earlier blocks, the scan)
    gives the plan dispatch gives when it counts itself, and leaves the given counts alone."""
    ids = torch.randint(0, E, (N, 1), dtype=torch.int32)
    counts = torch.bincount(ids.view(-1).long(), minlength=E).int()
    given = counts.clone()
    want = fk.dispatch(ids, E, backend="reference")
    got = dispatch_counted(ids, E, given)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert torch.equal(given, counts)


def test_dispatch_cases_reach_every_prefix_mode():
    block_n = dispatch_kernels.INTERPRETER_BLOCKING.block_n
    blocks = {-(-N // block_n) for N, _ in GIVEN_COUNTS}
    assert 1 in blocks
    assert any(1 < b <= dispatch_kernels.SUM_MAX_BLOCKS for b in blocks)
    assert any(b > dispatch_kernels.SUM_MAX_BLOCKS for b in blocks)
