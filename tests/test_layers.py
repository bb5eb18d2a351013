"""FinTeamMoE against a plain-PyTorch formulation written here (loops over tokens and choices), and
against transformers' own MoE blocks; state dicts, capacity dropping, balancing, compile,
autocast and argument errors."""
import math

import pytest
import torch
import torch.nn.functional as F
from backends import kernel_backends
from hf_tiny import FAMILIES, build, moe_blocks
from tolerance import assert_close

import finteam_kernels
from finteam_kernels import FinTeamMoE, router_aux_loss, update_expert_bias
from finteam_kernels._backend import why_unusable
from finteam_kernels.hf import moe_from_block
from finteam_kernels.router import capacity_keep

GLU = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda g: F.gelu(g, approximate="tanh")}


def naive_moe(layer: FinTeamMoE, x: torch.Tensor, *, groups=True, bias=True) -> torch.Tensor:
    """What the layer must compute, token by token, from its parameters (the layer's options are
    read from it; `groups`/`bias` switch those off, to show that a test input depends on them)."""
    E, K, H = layer.num_experts, layer.top_k, layer.hidden_size
    x_TH = x.reshape(-1, H)
    T = x_TH.shape[0]
    logits_TE = F.linear(x_TH, layer.gate.weight).float()
    scores_TE = logits_TE.softmax(-1) if layer.score == "softmax" else logits_TE.sigmoid()
    choice_TE = scores_TE.detach() + (layer.expert_bias if bias else 0)
    if groups and layer.num_groups > 1:
        per_group = E // layer.num_groups
        rating_TG = choice_TE.view(T, layer.num_groups, per_group).topk(min(2, per_group), dim=-1).values.sum(-1)
        best_TG = rating_TG.topk(layer.topk_groups, dim=-1).indices
        allowed_TE = torch.zeros(T, layer.num_groups, dtype=torch.bool).scatter_(1, best_TG, True)
        choice_TE = choice_TE.masked_fill(~allowed_TE.repeat_interleave(per_group, dim=1), -math.inf)
    ids_TK = choice_TE.topk(K, dim=-1).indices  # random inputs: no ties
    weights_TK = scores_TE.gather(1, ids_TK)
    if layer.renormalize:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
    weights_TK = weights_TK * layer.scaling
    load, capacity = [0] * E, math.inf
    if layer.capacity_factor is not None:
        capacity = math.ceil(layer.capacity_factor * T * K / E)
    keep = torch.zeros(T, K, dtype=torch.bool)
    for j in range(K):  # first choices queue before second choices, earlier tokens first
        for t in range(T):
            e = int(ids_TK[t, j])
            keep[t, j] = load[e] < capacity
            load[e] += 1
    w_gu, w_down = layer.experts.gate_up_proj, layer.experts.down_proj
    rows = []
    for t in range(T):
        out_H = x_TH.new_zeros(H)
        for j in range(K):
            if keep[t, j]:
                e = int(ids_TK[t, j])
                gate, up = (w_gu[e] @ x_TH[t]).chunk(2)
                out_H = out_H + weights_TK[t, j] * (w_down[e] @ (GLU[layer.activation](gate) * up))
        rows.append(out_H)
    # no rows: an empty output that is still in x's graph (so backward runs and leaves zeros)
    out_TH = torch.stack(rows) if rows else x_TH[:, :1].expand(0, H) * 0
    if layer.shared_expert is not None:
        s = layer.shared_expert
        shared_TH = F.linear(GLU[layer.activation](F.linear(x_TH, s.gate_proj.weight)) * F.linear(x_TH, s.up_proj.weight),
                             s.down_proj.weight)
        if layer.shared_expert_gate is not None:
            shared_TH = torch.sigmoid(F.linear(x_TH, layer.shared_expert_gate.weight)) * shared_TH
        out_TH = out_TH + shared_TH
    return out_TH.reshape(x.shape)


def run(fn, layer, x):
    """Output, and the gradients of x and every parameter, for a loss that weighs each output
    element differently (a plain sum would hide a permutation of rows)."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = fn(x)
    out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape).to(out.dtype))
    grads = {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    return out.detach(), grads


def assert_runs_match(actual, expected, baseline=None, computed_in=None):
    assert_close(actual[0], expected[0], baseline=None if baseline is None else baseline[0], name="out",
                 computed_in=computed_in)
    for name, g in expected[1].items():
        assert actual[1][name] is not None, f"{name} has no gradient"
        if g is None:  # the plain formulation never touched it (no tokens): it must be exactly zero
            assert not actual[1][name].any(), f"{name}: non-zero gradient"
            continue
        assert_close(actual[1][name], g, baseline=None if baseline is None else baseline[1][name],
                     name=f"grad {name}", computed_in=computed_in)


CONFIGS = {
    # Mixtral-like: softmax top-2 renormalised, odd sizes
    "softmax_top2": dict(hidden_size=12, intermediate_size=7, num_experts=5, top_k=2),
    # K == E: every expert for every token
    "k_equals_e": dict(hidden_size=8, intermediate_size=5, num_experts=3, top_k=3),
    # top-1 without renormalisation (Switch): the weight is the raw probability
    "top1_raw": dict(hidden_size=10, intermediate_size=6, num_experts=7, top_k=1, renormalize=False),
    # DeepSeek-V3: sigmoid scores, selection bias, 4 groups of 2 with the best 2 kept, scaling
    "deepseek_v3": dict(hidden_size=12, intermediate_size=5, num_experts=8, top_k=3, score="sigmoid",
                        num_groups=4, topk_groups=2, scaling=2.5, shared_expert_size=6),
    # Qwen2-MoE: shared expert with its sigmoid gate, GeGLU (erf), no renormalisation
    "qwen2_shared_gated": dict(hidden_size=9, intermediate_size=4, num_experts=6, top_k=2, renormalize=False,
                               shared_expert_size=7, shared_expert_gate=True, activation="gelu"),
    # capacity: many drops, GeGLU (tanh)
    "capacity": dict(hidden_size=8, intermediate_size=6, num_experts=4, top_k=2, capacity_factor=0.5,
                     activation="gelu_tanh"),
}


def make(config, **overrides):
    layer = FinTeamMoE(**{**CONFIGS[config], **overrides})
    with torch.no_grad():
        layer.gate.weight.mul_(4)  # sharper routing: different tokens pick different experts
        layer.expert_bias.copy_(torch.randn(layer.num_experts) * 0.05)
    return layer


@pytest.mark.parametrize("config", CONFIGS)
def test_matches_plain_pytorch(config):
    layer = make(config)
    x = torch.randn(2, 9, layer.hidden_size)  # 3-D input: the layer flattens and restores it
    assert_runs_match(run(layer, layer, x), run(lambda x: naive_moe(layer, x), layer, x))


def test_the_test_inputs_depend_on_bias_groups_and_capacity():
    """The options must change the result on the inputs used above, or their tests prove nothing."""
    torch.manual_seed(0)
    deepseek = make("deepseek_v3")
    x = torch.randn(2, 9, 12)
    out = naive_moe(deepseek, x)
    assert not torch.allclose(out, naive_moe(deepseek, x, groups=False))
    assert not torch.allclose(out, naive_moe(deepseek, x, bias=False))
    torch.manual_seed(0)
    make("deepseek_v3")
    capped = make("capacity")
    capped(torch.randn(2, 9, 8))
    assert capped.router_stats.dropped > 0


def layer_backends() -> list[str]:
    """The backends that run every op the layer calls on CPU tensors here."""
    ops = ("topk_gating", "router_losses", "dispatch", "moe_experts")
    return ["reference"] + [b for b in kernel_backends()
                            if all(why_unusable(b, torch.device("cpu"), op) is None for op in ops)]


@pytest.mark.parametrize("backend", layer_backends())
@pytest.mark.parametrize("config", CONFIGS)
def test_every_backend_matches_plain_pytorch(config, backend):
    layer = make(config, backend=backend)
    x = torch.randn(13, layer.hidden_size)
    assert_runs_match(run(layer, layer, x), run(lambda x: naive_moe(layer, x), layer, x))


@pytest.mark.parametrize("backend", layer_backends())
@pytest.mark.parametrize("config", ["deepseek_v3", "capacity"])
@pytest.mark.parametrize("shape", [(0, 12), (12,)], ids=["no_tokens", "one_token_1d"])
def test_no_tokens_and_a_single_unbatched_token(shape, config, backend):
    layer = make(config, hidden_size=12, backend=backend)
    x = torch.randn(shape)
    actual, expected = run(layer, layer, x), run(lambda x: naive_moe(layer, x), layer, x)
    assert actual[0].shape == shape
    assert_runs_match(actual, expected)  # with no tokens: zero gradients, every parameter still in the graph


def test_capacity_drop_order_and_count():
    """E=3, K=2, T=5, capacity ceil(0.5*10/3) = 2 per expert. Queue: first choices 0,1,0,1,0 of
    tokens 0..4, then second choices 1,0,2,2,1. Expert 0 keeps tokens 0 and 2; expert 1 keeps the
    first choices of tokens 1 and 3, so token 0's second choice loses to token 3's first choice."""
    ids_TK = torch.tensor([[0, 1], [1, 0], [0, 2], [1, 2], [0, 1]])
    keep_TK, dropped = capacity_keep(ids_TK, 3, 0.5)
    expected = torch.tensor([[True, False], [True, False], [True, True], [True, True], [False, False]])
    assert torch.equal(keep_TK, expected) and dropped == 4
    # Through the layer: a router that reproduces those choices; token 4 loses all its experts.
    layer = FinTeamMoE(3, 4, 3, 2, capacity_factor=0.5)
    with torch.no_grad():
        layer.gate.weight.copy_(torch.eye(3) * 10)
    x = torch.tensor([[3.0, 2, 0], [2, 3, 0], [3, 0, 2], [0, 3, 2], [3, 2, 0]])
    out = layer(x)
    assert int(layer.router_stats.dropped) == 4
    assert torch.equal(layer.router_stats.tokens_per_expert_E, torch.tensor([4, 4, 2], dtype=torch.int32))
    assert torch.equal(out[4], torch.zeros(3))
    assert_close(out.detach(), naive_moe(layer, x).detach())


def test_dropless_by_default():
    layer = make("softmax_top2")
    layer(torch.randn(40, 12))
    assert layer.capacity_factor is None and int(layer.router_stats.dropped) == 0


IGNORE_ROUTER_LOGITS_WARNING = pytest.mark.filterwarnings("ignore:moe_from_block. transformers' output_router_logits")


@IGNORE_ROUTER_LOGITS_WARNING
@pytest.mark.parametrize("family", FAMILIES)
def test_moe_from_block_shares_weights_and_matches_the_block(family):
    block = moe_blocks(build(family, "eager"))[0]
    layer = moe_from_block(block)
    for name, p in layer.named_parameters():
        assert p is block.get_parameter(name), f"{name} is not the block's own parameter"
    x = torch.randn(2, 7, block.gate.weight.shape[1])
    assert_runs_match(run(layer, layer, x), run(block, layer, x))


def test_moe_from_block_warns_that_transformers_router_loss_will_not_see_it():
    block = moe_blocks(build("mixtral", "eager"))[0]  # hf_tiny's Mixtral sets output_router_logits
    with pytest.warns(UserWarning, match="router_aux_loss"):
        moe_from_block(block)


def test_moe_from_block_refuses_what_it_cannot_compute():
    block = moe_blocks(build("mixtral", "eager"))[0]
    block.jitter_noise = 0.1  # multiplicative noise on the input in training
    with pytest.raises(ValueError, match="jitter"):
        moe_from_block(block)
    with pytest.raises(ValueError, match=r"Linear is not supported; expected one of MixtralSparseMoeBlock"):
        moe_from_block(torch.nn.Linear(2, 2))


@IGNORE_ROUTER_LOGITS_WARNING
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_state_dicts_load_both_ways_with_transformers_blocks(family):
    block = moe_blocks(build(family, "eager"))[0]
    twin = moe_from_block(moe_blocks(build(family, "eager", seed=5))[0])
    twin.load_state_dict(block.state_dict())  # a block's state dict as it is (no expert_bias: zero)
    x = torch.randn(11, block.gate.weight.shape[1])
    with torch.no_grad():
        assert_close(twin(x), block(x[None])[0])
    other = moe_blocks(build(family, "eager", seed=6))[0]
    result = other.load_state_dict(twin.state_dict(), strict=False)
    assert result.unexpected_keys == ["expert_bias"] and not result.missing_keys
    with torch.no_grad():
        assert_close(other(x[None])[0], block(x[None])[0])


def test_state_dict_round_trip_keeps_the_bias():
    layer, twin = make("deepseek_v3"), make("deepseek_v3")
    twin.load_state_dict(layer.state_dict())
    assert torch.equal(twin.expert_bias, layer.expert_bias)
    x = torch.randn(10, 12)
    assert torch.equal(twin(x), layer(x))


@pytest.mark.parametrize("names", [("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj")])
def test_loads_the_older_per_expert_layout(names):
    layer = make("softmax_top2", shared_expert_size=4)
    state = {k: v for k, v in layer.state_dict().items() if not k.startswith("experts.")}
    I = layer.intermediate_size
    for e in range(layer.num_experts):
        gate_up = layer.experts.gate_up_proj[e].detach()
        state[f"experts.{e}.{names[0]}.weight"] = gate_up[:I].clone()
        state[f"experts.{e}.{names[1]}.weight"] = gate_up[I:].clone()
        state[f"experts.{e}.{names[2]}.weight"] = layer.experts.down_proj[e].detach().clone()
    twin = FinTeamMoE(12, 7, 5, 2, shared_expert_size=4)
    twin.load_state_dict(state)  # strict: nothing left over, nothing missing
    assert torch.equal(twin.experts.gate_up_proj, layer.experts.gate_up_proj)
    assert torch.equal(twin.experts.down_proj, layer.experts.down_proj)


def test_an_incomplete_per_expert_layout_is_refused():
    state = make("softmax_top2").state_dict()
    del state["experts.gate_up_proj"]
    state["experts.0.w1.weight"] = torch.zeros(7, 12)  # only one expert's gate: not convertible
    with pytest.raises(RuntimeError, match=r"(?s)Missing key\(s\).*experts.gate_up_proj.*Unexpected key\(s\).*experts.0.w1"):
        FinTeamMoE(12, 7, 5, 2).load_state_dict(state)


def test_router_stats_and_router_aux_loss():
    first = make("softmax_top2", aux_loss_coef=0.1, z_loss_coef=0.01)
    second = make("softmax_top2", aux_loss_coef=0.2)
    model = torch.nn.Sequential(first, second)
    assert float(router_aux_loss(model)) == 0.0  # nothing has run yet
    model(torch.randn(20, 12))
    expected = sum(
        m.aux_loss_coef * m.router_stats.aux_loss + m.z_loss_coef * m.router_stats.z_loss for m in (first, second))
    assert_close(router_aux_loss(model).detach(), expected.detach())
    losses = finteam_kernels.router_losses(first.gate(torch.zeros(0, 12)), torch.zeros(0, 2, dtype=torch.int32), 5)
    assert losses.aux_loss == 0  # (the op's own spec: no tokens, no loss)
    assert int(first.router_stats.tokens_per_expert_E.sum()) == 40
    router_aux_loss(model).backward()
    assert first.gate.weight.grad.abs().sum() > 0 and second.gate.weight.grad.abs().sum() > 0


def test_update_expert_bias_moves_towards_balance():
    torch.manual_seed(0)
    layer = FinTeamMoE(16, 8, 8, 2, bias_update_rate=0.01)
    with torch.no_grad():
        layer.gate.weight[0].fill_(0.05)  # expert 0 is most tokens' first choice
    x = torch.randn(256, 16).abs()
    layer.eval()
    layer(x)
    assert int(layer.expert_load_E.sum()) == 0  # eval forwards are not counted
    layer.train()
    imbalance = []  # max load / mean load, of each step
    for step in range(30):
        layer(x)
        layer(x)  # two micro-batches per step: both are counted
        counts = layer.router_stats.tokens_per_expert_E.float()
        imbalance.append(float(counts.max() / counts.mean()))
        load = layer.expert_load_E.clone()
        assert int(load.sum()) == 2 * 256 * 2
        bias = layer.expert_bias.clone()
        update_expert_bias(layer)
        assert int(layer.expert_load_E.sum()) == 0
        # overloaded experts go down by the rate, underloaded ones up
        assert_close(layer.expert_bias - bias, 0.01 * torch.sign(load.double().mean() - load).float())
    # A sign update oscillates around balance rather than settling: judge the last ten steps.
    assert imbalance[0] > 3 and max(imbalance[-10:]) < imbalance[0] / 2, imbalance


def test_the_bias_stays_fp32_when_the_model_is_cast():
    layer = make("deepseek_v3", bias_update_rate=1e-3)
    bias = layer.expert_bias.clone()
    layer.bfloat16()
    assert layer.gate.weight.dtype == torch.bfloat16 and torch.equal(layer.expert_bias, bias)
    layer(torch.randn(16, 12, dtype=torch.bfloat16))
    update_expert_bias(layer)
    step_E = (layer.expert_bias - bias).abs()
    assert float(step_E.max()) == pytest.approx(1e-3, rel=1e-3)  # a bf16 bias near 0.05 would round these away


def test_torch_compile_matches_eager():
    """Every option at once (one compilation: compiling is slow on a CPU): sigmoid, groups,
    scaling, shared expert with gate, capacity, bias counting (a buffer mutated in forward), and
    router_stats set in forward. aot_eager traces with dynamo and AOTAutograd like inductor does;
    inductor's code generation adds minutes on a 2-core CPU and nothing layer-specific."""
    layer = make("deepseek_v3", shared_expert_gate=True, capacity_factor=0.9, bias_update_rate=0.01)
    compiled = torch.compile(layer, backend="aot_eager")
    x = torch.randn(2, 9, 12)
    expected = run(layer, layer, x)
    expected_stats = layer.router_stats
    actual = run(compiled, layer, x)
    assert_runs_match(actual, expected)
    for name, value in layer.router_stats._asdict().items():
        assert_close(value.detach(), getattr(expected_stats, name).detach(), name=name)
    assert torch.equal(layer.expert_load_E, 2 * expected_stats.tokens_per_expert_E.long())


@pytest.mark.parametrize("config", ["softmax_top2", "qwen2_shared_gated"])
def test_bf16_autocast_and_bf16_weights(config):
    """fp32 weights under bf16 autocast, and bf16 weights: within twice plain PyTorch's own bf16
    error (the plain formulation computed the same way) of the fp32 result."""
    layer = make(config)
    with torch.no_grad():
        for p in layer.parameters():  # bf16-representable weights: only the arithmetic differs
            p.copy_(p.bfloat16().float())
    x = torch.randn(3, 8, layer.hidden_size).bfloat16().float()
    expected = run(lambda x: naive_moe(layer, x), layer, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = run(layer, layer, x)
        baseline = run(lambda x: naive_moe(layer, x), layer, x)
    assert actual[0].dtype == torch.bfloat16
    assert_runs_match(actual, expected, baseline, computed_in=torch.bfloat16)
    layer = layer.bfloat16()
    assert_runs_match(run(layer, layer, x.bfloat16()), expected, run(lambda x: naive_moe(layer, x), layer, x.bfloat16()))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(hidden_size=0), ValueError, r"FinTeamMoE: hidden_size must be >= 1; got 0"),
        (dict(num_experts=2.0), TypeError, r"FinTeamMoE: num_experts must be an int; got 2.0"),
        (dict(top_k=5), ValueError, r"FinTeamMoE: top_k must be in \[1, 4\] \(at most num_experts\); got 5"),
        (dict(score="softmin"), ValueError, r"FinTeamMoE: score must be one of 'softmax', 'sigmoid'; got 'softmin'"),
        (dict(activation="relu"), ValueError, r"FinTeamMoE: activation must be one of 'silu', 'gelu', 'gelu_tanh'"),
        (dict(backend="gpu"), ValueError, r"FinTeamMoE: backend must be one of 'auto', .*; got 'gpu'"),
        (dict(renormalize=1), TypeError, r"FinTeamMoE: renormalize must be a bool; got 1"),
        (dict(aux_loss_coef=-0.1), ValueError, r"FinTeamMoE: aux_loss_coef must be a finite number >= 0.0; got -0.1"),
        (dict(capacity_factor=0), ValueError, r"FinTeamMoE: capacity_factor must be a finite number > 0.0; got 0"),
        (dict(capacity_factor="1"), TypeError, r"FinTeamMoE: capacity_factor must be a number; got '1'"),
        (dict(scaling=float("nan")), ValueError, r"FinTeamMoE: scaling must be a finite number > 0.0; got nan"),
        (dict(num_groups=3), ValueError, r"FinTeamMoE: num_groups \(3\) must divide num_experts \(4\)"),
        (dict(num_groups=2, topk_groups=3), ValueError, r"FinTeamMoE: topk_groups must be in \[1, 2\]"),
        (dict(num_groups=4, topk_groups=1), ValueError, r"FinTeamMoE: top_k \(2\) must be at most topk_groups"),
        (dict(shared_expert_gate=True), ValueError, r"FinTeamMoE: shared_expert_gate=True needs a shared expert"),
        (dict(shared_expert_size=0), ValueError, r"FinTeamMoE: shared_expert_size must be >= 1; got 0"),
        (dict(ep_group=object()), RuntimeError, r"FinTeamMoE: ep_group needs torch.distributed to be initialised"),
    ],
)
def test_constructor_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        FinTeamMoE(**{**dict(hidden_size=8, intermediate_size=4, num_experts=4, top_k=2), **kwargs})


@pytest.mark.parametrize(
    "x, error, message",
    [
        ([1.0] * 8, TypeError, r"FinTeamMoE: x must be a tensor \[\.\.\., 8\]; got list"),
        (torch.zeros(4, 7), ValueError, r"FinTeamMoE: x must be \[\.\.\., 8\] \(hidden_size last\); got shape \(4, 7\)"),
        (torch.tensor(1.0), ValueError, r"got shape \(\)"),
        (torch.zeros(4, 8, dtype=torch.float64), TypeError, r"FinTeamMoE: x is torch.float64 but the layer's parameters are torch.float32"),
        (torch.zeros(4, 8, dtype=torch.int64), TypeError, r"FinTeamMoE: x is torch.int64"),
        (torch.zeros(4, 8, device="meta"), ValueError, r"FinTeamMoE: x is on meta but the layer is on cpu"),
    ],
)
def test_input_errors(x, error, message):
    with pytest.raises(error, match=message):
        FinTeamMoE(8, 4, 4, 2)(x)
