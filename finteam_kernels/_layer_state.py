"""State dict layouts that FinTeamMoE's experts save and accept.

Shape legend: E experts, L experts held here, H hidden, I expert intermediate.

Saved: `gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]` (transformers 5's layout). A shard of
an expert-parallel layer saves `gate_up_proj[lo:hi]` and `down_proj[lo:hi]`, naming the global
experts it holds, so the shards of all ranks together form a full checkpoint without collisions.

Accepted on load, besides that:
- a full checkpoint by a shard (it takes its experts' slice);
- the older per-expert layout, `<e>.w1.weight [I, H]` (gate), `<e>.w3.weight [I, H]` (up),
  `<e>.w2.weight [H, I]` (down), as Mixtral checkpoints of transformers 4 have it, or the same
  with `gate_proj`/`up_proj`/`down_proj` (Qwen2-MoE, OLMoE of transformers 4).
"""
import math
import numbers

import torch

# per-expert names of the older layout: (gate, up, down)
_PER_EXPERT_NAMES = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))


def check_number(op: str, name: str, value, *, lo: float, strict: bool = False) -> None:
    """A finite real `value` >= lo (> lo when strict); bool is not a number here."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a number; got {value!r}")
    if not math.isfinite(value) or not (value > lo if strict else value >= lo):
        raise ValueError(f"{op}: {name} must be a finite number {'>' if strict else '>='} {lo}; got {value!r}")


def shard_key(name: str, expert_range: tuple[int, int]) -> str:
    return f"{name}[{expert_range[0]}:{expert_range[1]}]"


class ExpertsStateMixin:
    """State dict hooks of a module holding `gate_up_proj`/`down_proj` for the global experts
    `expert_range` of `num_experts`."""

    def register_state_hooks(self) -> None:
        self.register_state_dict_post_hook(ExpertsStateMixin._name_shard)
        self.register_load_state_dict_pre_hook(ExpertsStateMixin._accept_layouts)

    def _is_shard(self) -> bool:
        return self.expert_range != (0, self.num_experts)

    @staticmethod
    def _name_shard(module, state_dict, prefix, local_metadata) -> None:
        if module._is_shard():
            for name in ("gate_up_proj", "down_proj"):
                state_dict[prefix + shard_key(name, module.expert_range)] = state_dict.pop(prefix + name)

    @staticmethod
    def _accept_layouts(module, state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs) -> None:
        lo, hi = module.expert_range
        _from_per_expert(state_dict, prefix, module.num_experts)
        for name in ("gate_up_proj", "down_proj"):
            own = prefix + shard_key(name, module.expert_range)
            if own in state_dict:
                state_dict[prefix + name] = state_dict.pop(own)
            elif module._is_shard() and prefix + name in state_dict:
                full = state_dict[prefix + name]
                if full.shape[0] == module.num_experts:
                    state_dict[prefix + name] = full[lo:hi]


def zero_bias_when_missing(module, state_dict, prefix, *args) -> None:
    """A checkpoint without `expert_bias` (every transformers MoE block's) means no bias."""
    state_dict.setdefault(prefix + "expert_bias", torch.zeros_like(module.expert_bias))


def _from_per_expert(state_dict: dict, prefix: str, num_experts: int) -> None:
    """Replace a complete per-expert layout (all E experts) in `state_dict` by the 3-D tensors."""
    for gate, up, down in _PER_EXPERT_NAMES:
        keys = [[f"{prefix}{e}.{part}.weight" for part in (gate, up, down)] for e in range(num_experts)]
        if not all(k in state_dict for ks in keys for k in ks):
            continue
        gate_up = [torch.cat([state_dict.pop(g), state_dict.pop(u)]) for g, u, _ in keys]
        state_dict[prefix + "gate_up_proj"] = torch.stack(gate_up)
        state_dict[prefix + "down_proj"] = torch.stack([state_dict.pop(d) for _, _, d in keys])
