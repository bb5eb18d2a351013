"""The inputs of each benchmark cell: the weights of a shape (made once per run), the routed
tokens of a cell, and the copies its timing rotates through so that it does not time the cache.

Shape legend: T tokens, H hidden, I expert intermediate, E experts, K top-k, N = T*K routed rows.
"""
from __future__ import annotations

import dataclasses

import torch

import harness
import providers
import shapes as shape_table
from finteam_kernels import reference
from shapes import MoEShape


class WeightBank:
    """The experts' and router's weights of each shape, made once per run and shared by every
    token count, routing and provider (random, scaled like an initialised layer)."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype, self._made = device, dtype, {}

    def get(self, s: MoEShape) -> dict[str, torch.Tensor]:
        if s.name not in self._made:
            self._made.clear()  # one shape's weights at a time: the full shapes are large
            E, H, I = s.num_experts, s.hidden, s.intermediate
            self._made[s.name] = {
                "w_gate_up_E2IH": self._random((E, 2 * I, H), H),
                "w_down_EHI": self._random((E, H, I), I),
                "router_EH": self._random((E, H), H),
            }
        return self._made[s.name]

    def _random(self, shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
        return harness.random_tensor(shape, self.device, self.dtype, scale=fan_in**-0.5)


def make_inputs(op: str, s: MoEShape, T: int, routing: str, bank: WeightBank) -> providers.Inputs:
    device, dtype = bank.device, bank.dtype
    logits_TE = shape_table.router_logits(s, T, routing)
    routed = shape_table.route(s, logits_TE)
    plan = reference.dispatch(routed.ids_TK, s.num_experts)
    bias = shape_table.selection_bias(s)
    N = T * s.top_k
    inp = providers.Inputs(
        shape=s,
        logits_TE=logits_TE.to(device),
        expert_bias_E=None if bias is None else bias.to(device),
        ids_TK=routed.ids_TK.to(device),
        weights_TK=routed.weights_TK.to(device),
        plan=type(plan)(*(t.to(device) for t in plan)),
    )
    if op in ("permute", "moe_experts", "layer"):
        inp.x_TH = harness.random_tensor((T, s.hidden), device, dtype)
    if op == "unpermute":
        inp.y_NH = harness.random_tensor((N, s.hidden), device, dtype)
    if op == "grouped_gemm":
        inp.x_NH = harness.random_tensor((N, s.hidden), device, dtype)
    if op in ("grouped_gemm", "moe_experts", "layer"):
        weights = bank.get(s)
        inp.w_gate_up_E2IH = weights["w_gate_up_E2IH"]
        if op != "grouped_gemm":
            inp.w_down_EHI = weights["w_down_EHI"]
        if op == "layer":
            inp.router_EH = weights["router_EH"]
    return inp


def _clone(inp: providers.Inputs) -> providers.Inputs:
    """Another copy of the inputs at other addresses (same values), for cache rotation."""
    def copy(value):
        if isinstance(value, torch.Tensor):
            return value.clone()
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            return type(value)(*(copy(v) for v in value))
        return value

    return dataclasses.replace(inp, **{f.name: copy(getattr(inp, f.name)) for f in dataclasses.fields(inp)})


def _tensor_bytes(inp: providers.Inputs) -> int:
    fields = (getattr(inp, f.name) for f in dataclasses.fields(inp))
    return sum(t.numel() * t.element_size() for t in fields if isinstance(t, torch.Tensor))


def rotation(inp: providers.Inputs, working_set: float, device: torch.device) -> list[providers.Inputs]:
    """The inputs and enough clones that rotating through them keeps calls out of the cache
    (`working_set`: the bytes one call touches), the clones within an eighth of the GPU's
    memory or 2 GiB of the host's."""
    copies = harness.rotation_copies(int(working_set), device)
    budget = torch.cuda.get_device_properties(device).total_memory // 8 if device.type == "cuda" else 2 << 30
    copies = max(1, min(copies, budget // max(1, _tensor_bytes(inp))))
    return [inp] + [_clone(inp) for _ in range(copies - 1)]
