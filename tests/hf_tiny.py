"""Tiny random transformers MoE models of the four families the integration supports, built from
their config classes (no hub access). Sizes are small but awkward: odd expert intermediate
sizes, E not a power of two, K > 1, so an indexing slip cannot hide."""
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

COMMON = dict(
    vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=64,
    # transformers' default 0.02 makes the experts' share of the logits so small that a wrong
    # expert computation could hide under the tolerance; 0.2 makes them matter.
    initializer_range=0.2,
)

FAMILIES = {
    # the classic: softmax top-2 renormalised, SwiGLU; output_router_logits adds the aux loss to
    # the loss, so the routing weights' gradient is checked through two paths
    "mixtral": lambda: MixtralConfig(
        **COMMON, intermediate_size=21, num_local_experts=5, num_experts_per_tok=2, output_router_logits=True,
    ),
    # shared expert with its sigmoid gate, no renormalisation, routing weights in the model dtype
    "qwen2_moe": lambda: Qwen2MoeConfig(
        **COMMON, intermediate_size=40, moe_intermediate_size=19, shared_expert_intermediate_size=24,
        num_experts=6, num_experts_per_tok=3, norm_topk_prob=False,
    ),
    # renormalised top-3 of 7 experts, GeGLU with erf (covers the activation table)
    "qwen3_moe": lambda: Qwen3MoeConfig(
        **COMMON, intermediate_size=40, moe_intermediate_size=23, head_dim=8, num_experts=7,
        num_experts_per_tok=3, norm_topk_prob=True, hidden_act="gelu",
    ),
    # GeGLU with tanh, top-2 of 8 not renormalised
    "olmoe": lambda: OlmoeConfig(
        **COMMON, intermediate_size=17, num_experts=8, num_experts_per_tok=2, hidden_act="gelu_pytorch_tanh",
    ),
}


def build(family: str, experts_implementation: str, seed: int = 0):
    """A fresh model of `family` with seeded random weights (each call gets its own config, since
    transformers writes the experts implementation into the config object)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(FAMILIES[family](), experts_implementation=experts_implementation)
    return model.train()


def moe_blocks(model) -> list:
    """The sparse MoE blocks of a model (the modules holding a router `gate` and `experts`)."""
    return [m for m in model.modules() if hasattr(m, "experts") and hasattr(m, "gate")]
