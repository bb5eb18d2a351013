"""experts_implementation="finteam" against transformers' own "eager" experts, on tiny random
models of each supported family: logits, loss and every gradient, fp32 and bf16, and a few
training steps; patch() of a loaded model; refusal of experts we do not compute exactly."""
import copy

import pytest
import torch
from backends import kernel_backends
from hf_tiny import FAMILIES, build, moe_blocks
from tolerance import assert_close
from transformers import AutoModelForCausalLM, GptOssConfig

import finteam_kernels.hf as hf
from finteam_kernels._backend import why_unusable

BATCH, SEQ = 2, 9


def tokens(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=g)


def forward_backward(model, ids):
    """Logits, loss and the gradient of every parameter, for loss = the model's own LM loss."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def pair(family, dtype=torch.float32):
    """An eager model and a finteam model with the same weights."""
    eager = build(family, "eager").to(dtype)
    fast = build(family, "finteam", seed=1).to(dtype)
    fast.load_state_dict(eager.state_dict())
    return eager, fast


def assert_same_run(actual, expected, baseline=None):
    """Same logits, loss and gradients: fp32 tightly; a bf16 run (bf16 weights or bf16 autocast)
    by the rule of tests/tolerance.py, whatever dtype its results are stored in."""
    names = ("logits", "loss")
    pairs = [(n, a, e, None if baseline is None else b) for n, a, e, b in zip(names, actual, expected, baseline or expected)]
    assert actual[2].keys() == expected[2].keys()
    for name, g in actual[2].items():
        pairs.append((f"grad {name}", g, expected[2][name], None if baseline is None else baseline[2][name]))
    for name, a, e, b in pairs:
        assert_close(a, e, baseline=b, name=name, computed_in=None if baseline is None else torch.bfloat16)


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_matches_eager(family):
    eager, fast = pair(family)
    ids = tokens(eager)
    expected, actual = forward_backward(eager, ids), forward_backward(fast, ids)
    # The experts must matter, or matching would prove nothing. (An expert that no token chose
    # has an exactly zero gradient in both, which is checked too.)
    for block in moe_blocks(fast):
        assert block.experts.gate_up_proj.grad.abs().sum() > 0
    assert_same_run(actual, expected)


@pytest.mark.parametrize("backend", ["reference"] + [
    b for b in kernel_backends() if why_unusable(b, torch.device("cpu"), "moe_experts") is None])
def test_backend_is_passed_through(backend, monkeypatch):
    """patch(model, backend=...) reaches the experts op, and each backend gives eager's results."""
    seen = []
    original = hf.routed_experts
    monkeypatch.setattr(hf, "routed_experts", lambda *a, **kw: seen.append(a[6]) or original(*a, **kw))
    eager = build("mixtral", "eager")
    fast = hf.patch(copy.deepcopy(eager), backend=backend)
    ids = tokens(eager)
    expected, actual = forward_backward(eager, ids), forward_backward(fast, ids)
    assert seen == [backend] * eager.config.num_hidden_layers
    assert_same_run(actual, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_within_twice_pytorch_error(family):
    """bf16 finteam vs an fp32 reference: at most twice the error of transformers' eager bf16."""
    reference = build(family, "eager")
    with torch.no_grad():
        for p in reference.parameters():  # bf16-representable weights: only the arithmetic differs
            p.copy_(p.bfloat16().float())
    baseline = copy.deepcopy(reference).bfloat16()
    fast = hf.patch(copy.deepcopy(reference).bfloat16())
    ids = tokens(reference)
    assert_same_run(forward_backward(fast, ids), forward_backward(reference, ids), forward_backward(baseline, ids))


def test_bf16_autocast_within_twice_pytorch_error():
    """fp32 weights under bf16 autocast: the experts compute in bf16 like eager's F.linear does."""
    reference = build("qwen2_moe", "eager")
    fast = hf.patch(copy.deepcopy(reference))
    ids = tokens(reference)
    expected = forward_backward(reference, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        baseline, actual = forward_backward(reference, ids), forward_backward(fast, ids)
    assert actual[0].dtype == baseline[0].dtype
    assert_same_run(actual, expected, baseline)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_steps_give_the_same_losses(family):
    eager, fast = pair(family)
    ids = tokens(eager)
    losses = []
    for model in (eager, fast):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        run = []
        for _ in range(4):
            optimizer.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            run.append(loss.detach())
        losses.append(torch.stack(run))
    assert losses[0][0] > losses[0][-1]  # it trains, so the steps after the first test something
    assert_close(losses[1], losses[0], name="losses")


def test_patch_switches_a_loaded_model_and_keeps_its_weights():
    eager = build("olmoe", "eager")
    before = {k: v.data_ptr() for k, v in eager.state_dict().items()}
    expected = forward_backward(eager, tokens(eager))
    patched = hf.patch(eager)
    assert patched is eager
    assert eager.config._experts_implementation == "finteam"
    assert {k: v.data_ptr() for k, v in eager.state_dict().items()} == before  # no copies
    assert_same_run(forward_backward(eager, tokens(eager)), expected)


def test_from_pretrained_with_finteam(tmp_path):
    """The path users take: save a checkpoint, load it with experts_implementation="finteam"."""
    eager = build("qwen3_moe", "eager")
    eager.save_pretrained(tmp_path)
    fast = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="finteam").train()
    assert fast.config._experts_implementation == "finteam"
    ids = tokens(eager)
    assert_same_run(forward_backward(fast, ids), forward_backward(eager, ids))


def mixtral_experts():
    return moe_blocks(build("mixtral", "eager"))[0].experts


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("has_bias", True, "biased experts"),  # GPT-OSS style: the bias would be dropped
        ("has_gate", False, "non-gated experts"),  # up_proj only: no gate_up_proj to read
        ("is_transposed", True, "transposed weights"),  # [E, H, 2I]: would be read as [E, 2I, H]
        ("is_concatenated", False, "interleaved gate/up"),  # gate/up rows alternate
        ("has_post_expert_norm", True, "norm after each expert"),
        ("_is_expert_parallel", True, "sentinel expert ids"),  # ids >= E mean "not on this rank"
    ],
)
def test_refuses_experts_it_would_compute_wrongly(flag, value, message):
    experts = mixtral_experts()
    setattr(experts, flag, value)
    with pytest.raises(ValueError, match=message):
        hf.activation_of(experts)


def test_refuses_an_unsupported_activation_and_a_custom_gate():
    experts = mixtral_experts()
    experts.act_fn = torch.nn.ReLU()
    with pytest.raises(ValueError, match=r"activation ReLU \(hidden_act='silu'\)"):
        hf.activation_of(experts)
    experts = mixtral_experts()
    type(experts)._apply_gate, original = (lambda self, h: h), type(experts)._apply_gate
    try:
        with pytest.raises(ValueError, match="its own _apply_gate"):
            hf.activation_of(experts)
    finally:
        type(experts)._apply_gate = original


def gpt_oss():
    config = GptOssConfig(
        vocab_size=61, hidden_size=32, intermediate_size=16, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, layer_types=["full_attention"],
    )
    return AutoModelForCausalLM.from_config(config, experts_implementation="eager")


def test_patch_refuses_a_model_it_cannot_run_and_leaves_it_unchanged():
    model = gpt_oss()  # biased, transposed, interleaved experts with a clamped gate
    with pytest.raises(ValueError, match="GptOssExperts"):
        hf.patch(model)
    assert model.config._experts_implementation == "eager"
    with pytest.raises(ValueError, match="has no transformers experts module"):
        hf.patch(torch.nn.Linear(2, 2))


def test_loading_an_unsupported_model_with_finteam_fails_at_the_first_forward():
    model = gpt_oss()
    model.set_experts_implementation("finteam")
    with pytest.raises(ValueError, match="GptOssExperts"):
        model(input_ids=torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.parametrize("backend", ["reference"] + [
    b for b in kernel_backends() if why_unusable(b, torch.device("cpu"), "moe_experts") is None])
def test_expert_ids_out_of_range_are_refused(backend):
    """The experts forward trusts the module it checked, never the ids: one past E is an error."""
    experts = moe_blocks(hf.patch(build("mixtral", "eager"), backend=backend))[0].experts
    E, _, H = experts.gate_up_proj.shape
    x, weights = torch.randn(3, H), torch.full((3, 2), 0.5)
    for bad in (E, -1):
        ids = torch.tensor([[0, 1], [1, bad], [0, 1]])
        with pytest.raises(ValueError, match=r"top_k_index must hold expert ids in \[0, "):
            hf.finteam_experts_forward(experts, x, ids, weights)
