"""Who can run each benchmarked op here: our backends, the plain-PyTorch reference, and peers.

Shape legend: T tokens, H hidden, I expert intermediate, E experts, K top-k, N = T*K routed rows.

A provider turns one set of inputs (`Inputs`) into a `Call`: a function that runs the op once
and returns the tensor gradients flow from, and the leaves whose gradients a backward
computes. Builders make those leaves as aliases of the shared inputs (no copies), so every
provider times the same data. Anything a provider must prepare that a caller would hold anyway
(module construction, weight layout, host-side counts for libraries that want them there) is
done in the builder, outside the timed call.

Ours: `triton` (CUDA tensors), `cuda`, `cpu` (the compiled extension), each picked up as soon as
`finteam_kernels._backend.why_unusable` says it can run the op on this device; the Triton
interpreter is never timed. `reference`: `finteam_kernels.reference`, through the public ops.
Peers (a missing one is listed as skipped with the reason, never an error):
  hf-eager, hf-grouped_mm, hf-sonicmoe  transformers' Mixtral experts with that
                                        `experts_implementation`; as the layer, Mixtral's MoE
                                        block (softmax top-k router) at each shape's sizes
  torch-grouped_mm                      `torch._grouped_mm`, the grouped GEMM under hf-grouped_mm
  megablocks                            its gather/scatter (permute/unpermute) and dMoE layer
  megablocks-gmm                        the `grouped_gemm` package's gmm that megablocks uses
  scattermoe                            its GLU MLP (the expert computation)
  vllm                                  `fused_topk` and `fused_experts` (inference only)
  liger                                 Liger's fused MoE autograd function
A yardstick, neither ours nor a peer (training modes only):
  aten-gemms                            the expert computation's six GEMMs alone, through ATen,
                                        per expert on rows grouped beforehand, into fresh outputs:
                                        what an implementation made of ATen's GEMMs spends on them
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

import finteam_kernels
from finteam_kernels import _backend
from harness import has_module, random_tensor
from shapes import MoEShape

OURS = ("triton", "cuda", "cpu")


@dataclasses.dataclass
class Inputs:
    """One copy of an op's inputs on the device (fields an op does not use stay None)."""

    shape: MoEShape
    logits_TE: torch.Tensor  # float32: router logits with the routing's bias
    expert_bias_E: torch.Tensor | None
    ids_TK: torch.Tensor  # int32
    weights_TK: torch.Tensor  # float32
    plan: finteam_kernels.DispatchPlan
    x_TH: torch.Tensor | None = None  # activations, in the benchmark dtype
    y_NH: torch.Tensor | None = None  # expert outputs in grouped order (unpermute's input)
    x_NH: torch.Tensor | None = None  # permuted activations (the grouped GEMM's input)
    w_gate_up_E2IH: torch.Tensor | None = None
    w_down_EHI: torch.Tensor | None = None
    router_EH: torch.Tensor | None = None  # the layer's router weight


@dataclasses.dataclass
class Call:
    fn: Callable[[], torch.Tensor]
    grad_inputs: list[torch.Tensor]  # empty when built for inference


Builder = Callable[[Inputs, bool], Call]


@dataclasses.dataclass
class Provider:
    name: str
    kind: str  # "ours", "reference" or "peer"
    builders: dict[str, Builder]
    why_unusable: Callable[[str, torch.device], str | None]
    graph_safe: bool = False  # no host sync: may be captured in a CUDA graph
    forward_only: bool = False
    training_only: bool = False
    # Bytes a call moves beyond the op's own count, where a provider is known to (op, mode,
    # shape, experts hit, element size): lets the run skip cells that would take minutes.
    extra_bytes: Callable[[str, str, MoEShape, int, int], float] | None = None


def _leaf(t: torch.Tensor, train: bool) -> torch.Tensor:
    """An alias of `t` that is a leaf of its own graph (no copy)."""
    return t.detach().requires_grad_(train)


def _grads(train: bool, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(tensors) if train else []


# --- our ops (every kernel backend and the reference go through the same public functions) ---


def _finteam_builders(backend: str) -> dict[str, Builder]:
    def gating(inp: Inputs, train: bool) -> Call:
        s = inp.shape
        logits = _leaf(inp.logits_TE, train)
        kwargs = dict(s.gating_kwargs(), renormalize=s.renormalize, expert_bias=inp.expert_bias_E, backend=backend)
        return Call(lambda: finteam_kernels.topk_gating(logits, s.top_k, **kwargs).weights_TK, _grads(train, logits))

    def dispatch(inp: Inputs, train: bool) -> Call:
        E = inp.shape.num_experts
        return Call(lambda: finteam_kernels.dispatch(inp.ids_TK, E, backend=backend).row_to_slot_N, [])

    def permute(inp: Inputs, train: bool) -> Call:
        x = _leaf(inp.x_TH, train)
        return Call(lambda: finteam_kernels.permute(x, inp.plan, backend=backend), _grads(train, x))

    def unpermute(inp: Inputs, train: bool) -> Call:
        y, w = _leaf(inp.y_NH, train), _leaf(inp.weights_TK, train)
        return Call(lambda: finteam_kernels.unpermute(y, inp.plan, w, backend=backend), _grads(train, y, w))

    def grouped_gemm(inp: Inputs, train: bool) -> Call:
        x, w = _leaf(inp.x_NH, train), _leaf(inp.w_gate_up_E2IH, train)
        offsets = inp.plan.expert_offsets_E1
        return Call(lambda: finteam_kernels.grouped_gemm(x, w, offsets, backend=backend), _grads(train, x, w))

    def moe_experts(inp: Inputs, train: bool) -> Call:
        x, w = _leaf(inp.x_TH, train), _leaf(inp.weights_TK, train)
        gu, down = _leaf(inp.w_gate_up_E2IH, train), _leaf(inp.w_down_EHI, train)
        return Call(
            lambda: finteam_kernels.moe_experts(x, inp.ids_TK, w, gu, down, backend=backend), _grads(train, x, w, gu, down)
        )

    def layer(inp: Inputs, train: bool) -> Call:
        s = inp.shape
        with torch.device("meta"):
            moe = finteam_kernels.FinTeamMoE(
                s.hidden, s.intermediate, s.num_experts, s.top_k, score=s.score, renormalize=s.renormalize,
                backend=backend, dtype=inp.x_TH.dtype,
            )
        _set_params(moe, _layer_params(inp), train)
        x = _leaf(inp.x_TH, train)
        return Call(lambda: moe(x), _grads(train, x, *moe.parameters()))

    builders = {"gating": gating, "dispatch": dispatch, "permute": permute, "unpermute": unpermute}
    builders |= {"grouped_gemm": grouped_gemm, "moe_experts": moe_experts, "layer": layer}
    return builders


_OP_NAMES = {"gating": ("topk_gating",), "layer": ("topk_gating", "moe_experts")}


def _ours_unusable(backend: str) -> Callable[[str, torch.device], str | None]:
    def why(op: str, device: torch.device) -> str | None:
        if backend == "triton" and device.type != "cuda":
            return "Triton kernels run on CUDA tensors (the interpreter is a testing tool, not timed)"
        if op == "layer" and not hasattr(finteam_kernels, "FinTeamMoE"):
            return "finteam_kernels.FinTeamMoE does not exist yet"
        for name in _OP_NAMES.get(op, (op,)):
            reason = _backend.why_unusable(backend, device, name)
            if reason is not None:
                return reason
        return None

    return why


def _layer_params(inp: Inputs) -> dict[str, torch.Tensor]:
    return {"gate.weight": inp.router_EH, "experts.gate_up_proj": inp.w_gate_up_E2IH, "experts.down_proj": inp.w_down_EHI}


def _set_params(module: nn.Module, tensors: dict[str, torch.Tensor], train: bool) -> None:
    """Point `module`'s parameters (built on the meta device) at the shared tensors; buffers
    still on the meta device (counters, balancing biases) start as zeros next to them."""
    device = next(iter(tensors.values())).device
    for name, tensor in tensors.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        setattr(owner, leaf, nn.Parameter(tensor.detach(), requires_grad=train))
    for name, param in module.named_parameters():
        if param.is_meta:
            raise RuntimeError(f"parameter {name} of {type(module).__name__} has no benchmark tensor")
    for owner in module.modules():
        for name, buffer in owner.named_buffers(recurse=False):
            if buffer is not None and buffer.is_meta:
                setattr(owner, name, torch.zeros_like(buffer, device=device))


# --- transformers ---


def _mixtral_config(shape: MoEShape, implementation: str):
    from transformers import MixtralConfig

    config = MixtralConfig(
        hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_local_experts=shape.num_experts,
        num_experts_per_tok=shape.top_k, hidden_act="silu",
    )
    config._experts_implementation = implementation
    return config


def _hf_builders(implementation: str) -> dict[str, Builder]:
    def moe_experts(inp: Inputs, train: bool) -> Call:
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts

        with torch.device("meta"):
            experts = MixtralExperts(_mixtral_config(inp.shape, implementation))
        _set_params(experts, {"gate_up_proj": inp.w_gate_up_E2IH, "down_proj": inp.w_down_EHI}, train)
        x = _leaf(inp.x_TH, train)
        # transformers hands its experts int64 ids and routing weights in the activations' dtype.
        ids, w = inp.ids_TK.long(), _leaf(inp.weights_TK.to(inp.x_TH.dtype), train)
        return Call(lambda: experts(x, ids, w), _grads(train, x, w, *experts.parameters()))

    def layer(inp: Inputs, train: bool) -> Call:
        # Mixtral's block (softmax top-k router) at the shape's sizes, for every shape.
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        with torch.device("meta"):
            block = MixtralSparseMoeBlock(_mixtral_config(inp.shape, implementation))
        _set_params(block, _layer_params(inp), train)
        x = _leaf(inp.x_TH, train)
        return Call(lambda: block(x.unsqueeze(0)), _grads(train, x, *block.parameters()))

    return {"moe_experts": moe_experts, "layer": layer}


def _hf_eager_extra_bytes(op: str, mode: str, s: MoEShape, experts_hit: int, itemsize: int) -> float:
    """transformers' eager experts index the weights once per expert hit, and the backward of
    each index makes a gradient the size of all E experts' weights (zeros but one slice) that
    autograd then adds into the total: about four full-size passes per expert hit."""
    if mode == "forward" or op not in ("moe_experts", "layer"):
        return 0.0
    return 4.0 * experts_hit * s.num_experts * s.expert_bytes(itemsize)


def _hf_unusable(implementation: str) -> Callable[[str, torch.device], str | None]:
    def why(op: str, device: torch.device) -> str | None:
        if not has_module("transformers"):
            return "transformers is not installed"
        if implementation == "sonicmoe":
            if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
                return "sonicmoe needs a Hopper or newer GPU"
            from transformers.integrations.sonicmoe import is_sonicmoe_loadable

            try:
                is_sonicmoe_loadable(raise_error=True)
            except Exception as err:  # noqa: BLE001 - any failure to load is a reason to skip
                return f"sonicmoe cannot load: {err}"
        return None

    return why


# --- torch._grouped_mm ---


def _torch_grouped_mm(inp: Inputs, train: bool) -> Call:
    x, w = _leaf(inp.x_NH, train), _leaf(inp.w_gate_up_E2IH, train)
    ends = inp.plan.expert_offsets_E1[1:].to(torch.int32)
    return Call(lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=ends), _grads(train, x, w))


def _torch_unusable(op: str, device: torch.device) -> str | None:
    return None if hasattr(torch, "_grouped_mm") else f"torch {torch.__version__} has no torch._grouped_mm"


# --- the yardstick: the experts' GEMMs alone ---


class _ExpertGemms(torch.autograd.Function):
    """The six GEMMs of the expert computation per expert, and nothing else: forward
    h = x_e @ W_gate_up[e]^T and y = a_e @ W_down[e]^T, backward the four products of their
    gradients. The activation a_NI and its gradient dh_N2I are fixed stand-ins, so no gated
    unit, gather, combine or routing-weight gradient is timed; the outputs are fresh tensors, as
    ATen allocates them (our CPU backend reuses large ones: csrc/cpu/alloc.h). Not
    reference.grouped_gemm under autograd: its cat and its weights' unbind/stack would be timed
    as copies on top of the GEMMs. h_N2I is written only to be the first GEMM's output."""

    @staticmethod
    def forward(ctx, x_NH, w_gate_up_E2IH, w_down_EHI, offsets, a_NI, dh_N2I):
        ctx.save_for_backward(x_NH, w_gate_up_E2IH, w_down_EHI, a_NI, dh_N2I)
        ctx.offsets = offsets
        h_N2I = x_NH.new_empty((x_NH.shape[0], w_gate_up_E2IH.shape[1]))
        y_NH = x_NH.new_empty(x_NH.shape)
        for e, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])):
            torch.mm(x_NH[lo:hi], w_gate_up_E2IH[e].t(), out=h_N2I[lo:hi])
            torch.mm(a_NI[lo:hi], w_down_EHI[e].t(), out=y_NH[lo:hi])
        return y_NH

    @staticmethod
    def backward(ctx, dy_NH):
        x_NH, w_gate_up_E2IH, w_down_EHI, a_NI, dh_N2I = ctx.saved_tensors
        dx_NH, da_NI = torch.empty_like(x_NH), torch.empty_like(a_NI)
        dw_gate_up_E2IH, dw_down_EHI = torch.empty_like(w_gate_up_E2IH), torch.empty_like(w_down_EHI)
        for e, (lo, hi) in enumerate(zip(ctx.offsets[:-1], ctx.offsets[1:])):
            torch.mm(dy_NH[lo:hi], w_down_EHI[e], out=da_NI[lo:hi])
            torch.mm(dy_NH[lo:hi].t(), a_NI[lo:hi], out=dw_down_EHI[e])
            torch.mm(dh_N2I[lo:hi], w_gate_up_E2IH[e], out=dx_NH[lo:hi])
            torch.mm(dh_N2I[lo:hi].t(), x_NH[lo:hi], out=dw_gate_up_E2IH[e])
        return dx_NH, dw_gate_up_E2IH, dw_down_EHI, None, None, None


def _aten_gemms_experts(inp: Inputs, train: bool) -> Call:
    K, I = inp.shape.top_k, inp.shape.intermediate
    x_NH = inp.x_TH[inp.plan.row_to_slot_N.long() // K]  # the rows grouped by expert, untimed
    offsets = inp.plan.expert_offsets_E1.tolist()
    a_NI = random_tensor((x_NH.shape[0], I), x_NH.device, x_NH.dtype)
    dh_N2I = random_tensor((x_NH.shape[0], 2 * I), x_NH.device, x_NH.dtype)
    x, w_gate_up, w_down = _leaf(x_NH, train), _leaf(inp.w_gate_up_E2IH, train), _leaf(inp.w_down_EHI, train)
    return Call(lambda: _ExpertGemms.apply(x, w_gate_up, w_down, offsets, a_NI, dh_N2I), _grads(train, x, w_gate_up, w_down))


# --- GPU-only peers ---


def _megablocks_routing(inp: Inputs):
    """megablocks' routing metadata from our plan: the slot of each grouped row, the expert of
    each grouped row, and the inclusive end of each expert's rows (all int32)."""
    indices = inp.plan.row_to_slot_N
    bin_ids = inp.ids_TK.reshape(-1)[indices.long()].to(torch.int32)
    bins = inp.plan.expert_offsets_E1[1:].to(torch.int32)
    return indices, bin_ids, bins


def _megablocks_builders() -> dict[str, Builder]:
    def permute(inp: Inputs, train: bool) -> Call:
        from megablocks import ops

        indices, bin_ids, bins = _megablocks_routing(inp)
        x = _leaf(inp.x_TH, train)
        return Call(lambda: ops.gather(x, indices, bin_ids, bins, inp.shape.top_k), _grads(train, x))

    def unpermute(inp: Inputs, train: bool) -> Call:
        from megablocks import ops

        indices, bin_ids, bins = _megablocks_routing(inp)
        y, w = _leaf(inp.y_NH, train), _leaf(inp.weights_TK.reshape(-1).to(inp.y_NH.dtype), train)
        return Call(lambda: ops.scatter(y, indices, bin_ids, w, bins, inp.shape.top_k), _grads(train, y, w))

    def grouped_gemm(inp: Inputs, train: bool) -> Call:
        import grouped_gemm

        # gmm wants the group sizes on the host: read here, outside the timed call.
        sizes = inp.plan.tokens_per_expert_E.to("cpu", torch.int64)
        x, w = _leaf(inp.x_NH, train), _leaf(inp.w_gate_up_E2IH, train)
        return Call(lambda: grouped_gemm.ops.gmm(x, w, sizes, trans_b=True), _grads(train, x, w))

    def layer(inp: Inputs, train: bool) -> Call:
        from megablocks.layers.arguments import Arguments
        from megablocks.layers.dmoe import dMoE

        s = inp.shape
        args = Arguments(
            hidden_size=s.hidden, ffn_hidden_size=s.intermediate, moe_num_experts=s.num_experts, moe_top_k=s.top_k,
            mlp_type="glu", mlp_impl="grouped", bf16=inp.x_TH.dtype == torch.bfloat16,
            fp16=inp.x_TH.dtype == torch.float16, device=inp.x_TH.device,
        )
        moe = dMoE(args).to(inp.x_TH.dtype)
        moe.requires_grad_(train)
        x = _leaf(inp.x_TH.unsqueeze(1), train)  # megablocks takes [sequence, batch, hidden]
        return Call(lambda: moe(x)[0], _grads(train, x, *moe.parameters()))

    return {"permute": permute, "unpermute": unpermute, "grouped_gemm": grouped_gemm, "layer": layer}


def _scattermoe_experts(inp: Inputs, train: bool) -> Call:
    from scattermoe.mlp import GLUMLP

    s = inp.shape
    mlp = GLUMLP(s.hidden, s.intermediate, s.num_experts, s.top_k).to(inp.x_TH.device, inp.x_TH.dtype)
    mlp.requires_grad_(train)
    x, w = _leaf(inp.x_TH, train), _leaf(inp.weights_TK.to(inp.x_TH.dtype), train)
    ids = inp.ids_TK.long()
    return Call(lambda: mlp(x, w, ids), _grads(train, x, w, *mlp.parameters()))


def _vllm_builders() -> dict[str, Builder]:
    def gating(inp: Inputs, train: bool) -> Call:
        from vllm.model_executor.layers.fused_moe import fused_topk

        s = inp.shape
        return Call(lambda: fused_topk(inp.logits_TE, inp.logits_TE, s.top_k, s.renormalize)[0], [])

    def moe_experts(inp: Inputs, train: bool) -> Call:
        from vllm.model_executor.layers.fused_moe import fused_experts

        return Call(lambda: fused_experts(inp.x_TH, inp.w_gate_up_E2IH, inp.w_down_EHI, inp.weights_TK, inp.ids_TK), [])

    return {"gating": gating, "moe_experts": moe_experts}


def _liger_experts(inp: Inputs, train: bool) -> Call:
    from liger_kernel.ops.fused_moe import LigerFusedMoEFunction

    x, w = _leaf(inp.x_TH, train), _leaf(inp.weights_TK, train)
    gu, down = _leaf(inp.w_gate_up_E2IH, train), _leaf(inp.w_down_EHI, train)
    return Call(lambda: LigerFusedMoEFunction.apply(x, gu, down, inp.ids_TK, w), _grads(train, x, w, gu, down))


def _gpu_peer_unusable(*modules: str) -> Callable[[str, torch.device], str | None]:
    def why(op: str, device: torch.device) -> str | None:
        missing = [m for m in modules if not has_module(m)]
        if missing:
            return f"{', '.join(missing)} not installed"
        if device.type != "cuda":
            return "needs a CUDA GPU"
        return None

    return why


def all_providers() -> list[Provider]:
    ours = [
        Provider(name, "ours", _finteam_builders(name), _ours_unusable(name), graph_safe=name != "cpu") for name in OURS
    ]
    reference = Provider("reference", "reference", _finteam_builders("reference"), _ours_unusable("reference"))
    megablocks = _megablocks_builders()
    peers = [
        Provider("hf-eager", "peer", _hf_builders("eager"), _hf_unusable("eager"), extra_bytes=_hf_eager_extra_bytes),
        Provider("hf-grouped_mm", "peer", _hf_builders("grouped_mm"), _hf_unusable("grouped_mm")),
        Provider("hf-sonicmoe", "peer", _hf_builders("sonicmoe"), _hf_unusable("sonicmoe")),
        Provider("torch-grouped_mm", "peer", {"grouped_gemm": _torch_grouped_mm}, _torch_unusable, graph_safe=True),
        Provider("megablocks", "peer", {k: v for k, v in megablocks.items() if k != "grouped_gemm"}, _gpu_peer_unusable("megablocks")),
        Provider("megablocks-gmm", "peer", {"grouped_gemm": megablocks["grouped_gemm"]}, _gpu_peer_unusable("grouped_gemm")),
        Provider("scattermoe", "peer", {"moe_experts": _scattermoe_experts}, _gpu_peer_unusable("scattermoe")),
        Provider("vllm", "peer", _vllm_builders(), _gpu_peer_unusable("vllm"), forward_only=True),
        Provider("liger", "peer", {"moe_experts": _liger_experts}, _gpu_peer_unusable("liger_kernel")),
    ]
    yardstick = Provider("aten-gemms", "yardstick", {"moe_experts": _aten_gemms_experts}, lambda op, device: None,
                         training_only=True)
    return ours + [reference] + peers + [yardstick]


def for_op(op: str, device: torch.device, shape: MoEShape | None = None) -> tuple[list[Provider], list[tuple[str, str]]]:
    """The providers that can run `op` here, and (name, reason) for those that cannot."""
    usable, skipped = [], []
    for provider in all_providers():
        if op not in provider.builders:
            continue
        reason = provider.why_unusable(op, device)
        if reason is None and shape is not None:
            reason = _unsupported_options(provider, op, shape)
        if reason is None:
            usable.append(provider)
        else:
            skipped.append((provider.name, reason))
    return usable, skipped


def _unsupported_options(provider: Provider, op: str, shape: MoEShape) -> str | None:
    """Peers whose gating has no sigmoid, bias or group-limited routing cannot run such a shape."""
    special = shape.score != "softmax" or shape.expert_bias or shape.num_groups > 1
    if op == "gating" and provider.kind == "peer" and special:
        return "no sigmoid / bias / group-limited top-k"
    return None
