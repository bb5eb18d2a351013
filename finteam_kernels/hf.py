"""transformers integration: run the experts of transformers' own MoE models on finteam_kernels.

transformers 5 stores the experts of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE (and many more) as
3-D tensors, `gate_up_proj [E, 2I, H]` (gate rows, then up rows) and `down_proj [E, H, I]`, and
looks their forward up by name in `transformers.integrations.moe.ExpertsInterface`. Importing
this module registers "finteam" there, so

    AutoModelForCausalLM.from_pretrained(path, experts_implementation="finteam")

runs every experts module on `finteam_kernels.moe_experts`, sharing the weights (no copies, same
checkpoint layout). Routers stay transformers' own, and so does the `output_router_logits` loss.
`patch(model)` switches a model that is already loaded, and `moe_from_block(block)` replaces a
whole sparse MoE block (router included) by a FinTeamMoE that shares its weights.

Shape legend: T tokens, H hidden, I expert intermediate, E experts, K top-k.

Only experts that `moe_experts` computes exactly are accepted: gated (GLU), concatenated
gate/up, untransposed, bias-free, no post-expert norm, transformers' default gate, an activation
of the table below, and no expert-parallel sentinel ids. Anything else is refused with an error
naming the module and the property, never computed approximately.
"""
import warnings

import torch
from torch import nn
from transformers import activations
from transformers.integrations.moe import ExpertsInterface

from ._autocast import cast_for_experts
from .layers import FinTeamMoE
from ._checks import check_ids
from .ops.moe_experts import routed_experts

NAME = "finteam"

# The sparse MoE blocks `moe_from_block` turns into a FinTeamMoE.
_BLOCKS = ("MixtralSparseMoeBlock", "Qwen2MoeSparseMoeBlock", "Qwen3MoeSparseMoeBlock", "OlmoeSparseMoeBlock")

# The activation module transformers built from `config.hidden_act`, mapped to moe_experts'
# names. Each entry computes the same function: the tanh-approximated GELUs differ only in
# rounding. By class name, as transformers 5 releases renamed some (PytorchGELUTanh -> GELUTanh).
_ACTIVATION_CLASSES = {
    "SiLUActivation": "silu",
    "GELUActivation": "gelu",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "NewGELUActivation": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh",
    "AccurateGELUActivation": "gelu_tanh",
}
_ACTIVATIONS = {nn.SiLU: "silu"} | {
    getattr(activations, cls): name for cls, name in _ACTIVATION_CLASSES.items() if hasattr(activations, cls)
}

# Flags that transformers' `use_experts_implementation` sets on an experts module, with the value
# moe_experts needs and what the other value would mean.
_REQUIRED_FLAGS = (
    ("has_gate", True, "non-gated experts (up_proj only)"),
    ("has_bias", False, "biased experts"),
    ("is_transposed", False, "transposed weights ([E, H, 2I])"),
    ("is_concatenated", True, "interleaved gate/up rows"),
    ("has_post_expert_norm", False, "a norm after each expert"),
    ("_is_expert_parallel", False, "transformers' expert parallelism (sentinel expert ids)"),
)


def is_hf_experts(module: nn.Module) -> bool:
    """True for an experts module made by transformers' `use_experts_implementation`."""
    # has_gate and is_concatenated since transformers 5.17; _is_expert_parallel only from later versions
    return hasattr(module, "has_gate") and hasattr(module, "is_concatenated") and hasattr(module, "config")


def hf_activation(act_fn) -> str | None:
    """moe_experts' name for a transformers activation module, None if it has none."""
    return _ACTIVATIONS.get(type(act_fn))  # by exact type: a subclass may compute something else


def activation_of(experts: nn.Module) -> str:
    """moe_experts' name for the activation of a transformers experts module, after checking that
    moe_experts computes that module exactly; raises ValueError naming what is not supported."""
    where = f"finteam experts: {type(experts).__name__}"
    for flag, needed, meaning in _REQUIRED_FLAGS:
        if getattr(experts, flag, needed) != needed:
            raise ValueError(f"{where} has {meaning} ({flag}={not needed}), which finteam_kernels does not support")
    # A model that overrides the gate (clamping, a different GLU) would be computed wrongly.
    if getattr(type(experts)._apply_gate, "__qualname__", "") != "_default_apply_gate":
        raise ValueError(f"{where} has its own _apply_gate, which finteam_kernels does not support")
    name = hf_activation(getattr(experts, "act_fn", None))
    if name is None:
        hidden_act = getattr(experts.config, "hidden_act", "?")
        raise ValueError(
            f"{where} uses activation {type(getattr(experts, 'act_fn', None)).__name__} (hidden_act={hidden_act!r}); "
            "finteam_kernels supports SwiGLU (silu, swish) and GeGLU (gelu, gelu_python, gelu_pytorch_tanh, "
            "gelu_python_tanh, gelu_new, gelu_fast, gelu_accurate)"
        )
    for param, dims in (("gate_up_proj", 3), ("down_proj", 3)):
        w = getattr(experts, param, None)
        if not isinstance(w, torch.Tensor) or w.dim() != dims:
            raise ValueError(f"{where}.{param} must be a {dims}-D tensor; got {type(w).__name__}")
    return name


def finteam_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The experts forward that transformers calls for experts_implementation="finteam":
    hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K] -> [T, H]."""
    activation = activation_of(self)
    # autocast does not reach into custom ops: cast as it would for the eager experts' F.linear
    x_TH, w_gate_up_E2IH, w_down_EHI = cast_for_experts(hidden_states, self.gate_up_proj, self.down_proj)
    # activation_of checked the module (weights' layout, activation) and the model shapes x and
    # the routing, so of moe_experts' argument checks only the ids' range is left to do.
    ids_checked = check_ids("finteam experts", "top_k_index", top_k_index, w_gate_up_E2IH.shape[0])
    out_TH = routed_experts(
        x_TH, top_k_index, top_k_weights, w_gate_up_E2IH, w_down_EHI, activation,
        getattr(self, "finteam_backend", None), ids_checked=ids_checked,
    )
    return out_TH if out_TH.dtype == hidden_states.dtype else out_TH.to(hidden_states.dtype)


def register() -> None:
    """Make "finteam" a valid `experts_implementation` (idempotent)."""
    ExpertsInterface.register(NAME, finteam_experts_forward)


def patch(model: nn.Module, backend: str | None = None) -> nn.Module:
    """Run every transformers experts module of `model` on finteam_kernels; returns `model`.

    `backend` is passed to `moe_experts` (None: $FINTEAM_BACKEND, else "auto"). Every experts
    module is checked before anything is switched, so a refused model is left as it was.
    """
    register()
    experts = [m for m in model.modules() if is_hf_experts(m)]
    if not experts:
        raise ValueError(f"finteam_kernels.hf.patch: {type(model).__name__} has no transformers experts module to patch")
    for module in experts:
        activation_of(module)
    for module in experts:
        module.finteam_backend = backend
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(NAME)
    for module in experts:
        # A bare block, or a sub-model whose class set_experts_implementation skips.
        module.config._experts_implementation_internal = NAME
    return model


def moe_from_block(block: nn.Module, *, backend="auto") -> FinTeamMoE:
    """A FinTeamMoE sharing the weights (no copies) of a transformers 5 Mixtral, Qwen2-MoE,
    Qwen3-MoE or OLMoE sparse MoE block, computing what the block computes."""
    if type(block).__name__ not in _BLOCKS:
        raise ValueError(f"moe_from_block: {type(block).__name__} is not supported; expected one of "
                         f"{', '.join(_BLOCKS)}")
    if getattr(block, "jitter_noise", 0.0):
        raise ValueError("moe_from_block: router jitter noise (router_jitter_noise > 0) is not supported")
    router, experts = block.gate, block.experts
    if getattr(experts.config, "output_router_logits", False):
        warnings.warn("moe_from_block: transformers' output_router_logits loss cannot see FinTeamMoE routers; "
                      "set config.output_router_logits=False and add finteam_kernels.router_aux_loss(model) to "
                      "the loss instead", stacklevel=2)
    shared = getattr(block, "shared_expert", None)
    E, I2, H = experts.gate_up_proj.shape
    weight = experts.gate_up_proj
    layer = FinTeamMoE(
        H, I2 // 2, E, router.top_k, renormalize=getattr(router, "norm_topk_prob", True),
        aux_loss_coef=getattr(experts.config, "router_aux_loss_coef", 0.01), activation=activation_of(experts),
        shared_expert_size=None if shared is None else shared.gate_proj.out_features,
        shared_expert_gate=getattr(block, "shared_expert_gate", None) is not None,
        backend=backend, dtype=weight.dtype, device="meta",
    )
    if shared is not None and hf_activation(shared.act_fn) != layer.activation:
        raise ValueError("moe_from_block: the shared expert's activation differs from the experts'")
    if shared is not None and any(getattr(shared, n).bias is not None for n in ("gate_proj", "up_proj", "down_proj")):
        raise ValueError("moe_from_block: a shared expert with biases is not supported")
    shared_modules = ((layer.gate, router, ("weight",)), (layer.experts, experts, ("gate_up_proj", "down_proj")))
    if shared is not None:
        shared_modules += tuple((getattr(layer.shared_expert, n), getattr(shared, n), ("weight",))
                                for n in ("gate_proj", "up_proj", "down_proj"))
    if layer.shared_expert_gate is not None:
        shared_modules += ((layer.shared_expert_gate, block.shared_expert_gate, ("weight",)),)
    for ours, theirs, names in shared_modules:
        for name in names:
            setattr(ours, name, getattr(theirs, name))
    layer.expert_bias = torch.zeros(E, dtype=torch.float32, device=weight.device)
    layer.expert_load_E = torch.zeros(E, dtype=torch.int64, device=weight.device)
    return layer.train(block.training)


register()
