"""The models: transformers' Llama for the base, the experts and the dense baseline, and
transformers' Mixtral for the assembled team. Named sizes for models trained from scratch here.

A role expert is a `LlamaForCausalLM`; the team is a `MixtralForCausalLM` with the same
attention and one expert per role in its stacked layout (transformers 5: `gate_up_proj`
[E, 2I, H], `down_proj` [E, H, I]). The dense baseline is a Llama whose FFN is as wide as the
team's active experts together (top_k * I), so both spend the same FLOPs per token.
"""
from __future__ import annotations

import importlib

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig

SIZES = {
    # name: hidden, layers, heads, kv heads, FFN width, max positions, rope theta
    "smoke": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, max_position_embeddings=512, rope_theta=10000.0),
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256, max_position_embeddings=512, rope_theta=10000.0),
    # Llama-3-8B's shape, for estimates and for checking a downloaded checkpoint against.
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, max_position_embeddings=8192, rope_theta=500000.0),
}


def llama_config(size: str, vocab_size: int, pad_id: int, eos_id: int, **override) -> LlamaConfig:
    if size not in SIZES:
        raise ValueError(f"model.base: unknown size {size!r}; named sizes are {', '.join(SIZES)} (or give a checkpoint path)")
    spec = dict(SIZES[size])
    theta = spec.pop("rope_theta")
    spec.update(override)
    return LlamaConfig(vocab_size=vocab_size, pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=None,
                       tie_word_embeddings=True, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": theta},
                       attention_bias=False, mlp_bias=False, **spec)


def build(config, seed: int):
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def mixtral_config(base: LlamaConfig, num_experts: int, top_k: int, aux_loss_coef: float) -> MixtralConfig:
    """The Mixtral config whose attention, norms and embeddings match `base`'s exactly."""
    if getattr(base, "mlp_bias", False) or getattr(base, "attention_bias", False):
        raise ValueError("assemble: Llama checkpoints with biases have no Mixtral counterpart")
    return MixtralConfig(
        vocab_size=base.vocab_size, hidden_size=base.hidden_size, intermediate_size=base.intermediate_size,
        num_hidden_layers=base.num_hidden_layers, num_attention_heads=base.num_attention_heads,
        num_key_value_heads=base.num_key_value_heads, head_dim=base.head_dim, hidden_act=base.hidden_act,
        max_position_embeddings=base.max_position_embeddings, rms_norm_eps=base.rms_norm_eps,
        rope_parameters=dict(base.rope_parameters), tie_word_embeddings=base.tie_word_embeddings,
        pad_token_id=base.pad_token_id, eos_token_id=base.eos_token_id, bos_token_id=base.bos_token_id,
        sliding_window=None, num_local_experts=num_experts, num_experts_per_tok=top_k,
        router_aux_loss_coef=aux_loss_coef, router_jitter_noise=0.0, output_router_logits=False,
    )


def set_team_routing(model, top_k: int, aux_loss_coef: float) -> None:
    """Route a loaded Mixtral team with `top_k` experts per token (0 keeps its own) and weigh its
    load-balancing loss by `aux_loss_coef`, in the config (so the saved team keeps them) and in
    every module that copied them at construction: the routers, the MoE blocks, the model's loss."""
    config = model.config
    k = top_k or config.num_experts_per_tok
    if not 1 <= k <= config.num_local_experts:
        raise ValueError(f"top_k must be in 1..{config.num_local_experts} (the team's experts); got {top_k}")
    config.num_experts_per_tok, config.router_aux_loss_coef = k, aux_loss_coef
    for module in model.modules():
        if isinstance(getattr(module, "top_k", None), int):
            module.top_k = k
    if hasattr(model, "num_experts_per_tok"):
        model.num_experts_per_tok = k
    if hasattr(model, "router_aux_loss_coef"):
        model.router_aux_loss_coef = aux_loss_coef


def experts_available(name: str) -> str | None:
    """None when the experts implementation `name` can run here, else why not."""
    if name != "finteam":
        return None
    try:
        importlib.import_module("finteam_kernels.hf")
    except ImportError as err:
        return f"finteam_kernels.hf is not available ({err})"
    return None


def use_experts(model, name: str) -> None:
    """Run `model`'s MoE experts with implementation `name` ("finteam" registers our kernels in
    transformers' ExpertsInterface when finteam_kernels.hf is imported)."""
    why = experts_available(name)
    if why is not None:
        raise RuntimeError(f"instruct.experts_implementation={name!r} cannot run: {why}; set it to 'eager'")
    if hasattr(model, "set_experts_implementation") and model._can_set_experts_implementation():
        model.set_experts_implementation(name)


def num_params(model, active_top_k: int | None = None) -> int:
    """Parameters (tied ones once); with `active_top_k`, only those a token uses in a MoE."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        n = p.numel()
        if active_top_k and ".experts." in name:
            n = n // p.shape[0] * active_top_k
        total += n
    return total
