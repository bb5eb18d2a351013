"""FinTeamMoE: the Mixture-of-Experts layer over the finteam_kernels ops.

Shape legend: T tokens, H hidden, I expert intermediate, E experts, K top-k, S shared expert
intermediate.

    logits_TE = gate(x_TH)                                  the router, a bias-free Linear
    routing   = topk_gating(logits_TE, K, score, renormalize, expert_bias, groups, scaling)
    out_TH    = moe_experts(x_TH, routing.ids_TK, routing.weights_TK [* kept], W_gu, W_down)
                (expert-parallel: parallel.expert_parallel_experts, same result)
    out_TH   += [sigmoid(shared_expert_gate(x_TH)) *] shared_expert(x_TH)

Parameter names and layouts are transformers 5's (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE):
`gate.weight [E, H]`, `experts.gate_up_proj [E, 2I, H]` (gate rows, then up rows),
`experts.down_proj [E, H, I]`, `shared_expert.{gate,up,down}_proj.weight` and
`shared_expert_gate.weight [1, H]`, so those blocks' state dicts load as they are (the older
per-expert `experts.<e>.w1/w2/w3` layout too: `_layer_state.py`). The `expert_bias [E]` buffer
(fp32, saved; zero when a checkpoint lacks it) steers selection only: aux-loss-free balancing,
updated by `finteam_kernels.update_expert_bias(model)` after the optimizer step.
"""
import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks
from ._autocast import cast_for_experts
from ._backend import BACKENDS
from ._layer_state import ExpertsStateMixin, check_number, zero_bias_when_missing
from .ops.moe_experts import routed_experts
from .ops.router_losses import routed_losses
from .ops.topk_gating import routed_gating
from .parallel import expert_parallel_experts, shard_range
from .reference import ACTIVATIONS
from .router import RouterStats, capacity_keep

_GLU_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh")}


class FinTeamExperts(ExpertsStateMixin, nn.Module):
    """The routed experts' weights: all E, or this rank's E/P under expert parallelism."""

    def __init__(self, num_experts, hidden_size, intermediate_size, *, dtype=None, device=None):
        super().__init__()
        self.num_experts, self.expert_range, self.ep_group = num_experts, (0, num_experts), None
        factory = dict(dtype=dtype, device=device)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, **factory))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **factory))
        self.reset_parameters()
        self.register_state_hooks()

    def reset_parameters(self) -> None:
        # nn.Linear's effective init, per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        for w in (self.gate_up_proj, self.down_proj):
            bound = w.shape[2] ** -0.5
            nn.init.uniform_(w, -bound, bound)

    def shard_(self, ep_group) -> None:
        """Keep only this rank's experts of `ep_group` (freeing the others)."""
        if self.ep_group is not None:
            raise RuntimeError("FinTeamMoE.shard_experts_: the experts are already sharded")
        lo, hi = shard_range(self.num_experts, ep_group)
        with torch.no_grad():
            for name in ("gate_up_proj", "down_proj"):
                w = getattr(self, name)
                setattr(self, name, nn.Parameter(w[lo:hi].clone(), requires_grad=w.requires_grad))
        self.expert_range, self.ep_group = (lo, hi), ep_group

    def forward(self, x_TH, topk_ids_TK, topk_weights_TK, activation: str, backend,
                tokens_per_expert_E=None) -> torch.Tensor:
        """The routing comes from the layer's own topk_gating (ids in range, counts of those ids)."""
        x_TH, w_gate_up_E2IH, w_down_EHI = cast_for_experts(x_TH, self.gate_up_proj, self.down_proj)
        if self.ep_group is None:
            return routed_experts(x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI, activation, backend,
                                  tokens_per_expert_E=tokens_per_expert_E)
        return expert_parallel_experts(
            x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI, activation, self.ep_group, backend=backend
        )

    def extra_repr(self) -> str:
        E_local, I2, H = self.gate_up_proj.shape
        shard = "" if self.ep_group is None else f", holding experts [{self.expert_range[0]}, {self.expert_range[1]})"
        return f"num_experts={self.num_experts}, hidden_size={H}, intermediate_size={I2 // 2}{shard}"


class SharedExpert(nn.Module):
    """A dense GLU MLP that every token goes through, named like Qwen2-MoE's."""

    def __init__(self, hidden_size, intermediate_size, activation, *, dtype=None, device=None):
        super().__init__()
        factory = dict(bias=False, dtype=dtype, device=device)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **factory)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **factory)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **factory)
        self.act_fn = _GLU_ACTIVATIONS[activation]

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x_TH)) * self.up_proj(x_TH))


class FinTeamMoE(nn.Module):
    """A Mixture-of-Experts layer: x [..., H] -> [..., H]. See the module docstring for the math
    and the state dict; `router_stats` holds what the router did in the last forward.

    `backend` is passed to every op ("auto" picks per device, None defers to $FINTEAM_BACKEND).
    Beyond transformers' options: `shared_expert_gate` (Qwen2-MoE's sigmoid gate on the shared
    expert) and DeepSeek-V3's `num_groups`/`topk_groups`/`scaling` (see `topk_gating`).
    """

    def __init__(
        self, hidden_size, intermediate_size, num_experts, top_k, *, score="softmax", renormalize=True,
        aux_loss_coef=0.01, z_loss_coef=0.0, bias_update_rate=0.0, capacity_factor=None, shared_expert_size=None,
        shared_expert_gate=False, activation="silu", num_groups=1, topk_groups=1, scaling=1.0, backend="auto",
        ep_group=None, dtype=None, device=None,
    ):
        super().__init__()
        op = "FinTeamMoE"
        for name, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size),
                            ("num_experts", num_experts)):
            _checks.check_int(op, name, value, 1)
        _checks.check_int(op, "top_k", top_k, 1, num_experts, " (at most num_experts)")
        _checks.check_choice(op, "score", score, ("softmax", "sigmoid"))
        _checks.check_choice(op, "activation", activation, ACTIVATIONS)
        if backend is not None:
            _checks.check_choice(op, "backend", backend, BACKENDS)
        for name, value in (("renormalize", renormalize), ("shared_expert_gate", shared_expert_gate)):
            if not isinstance(value, bool):
                raise TypeError(f"{op}: {name} must be a bool; got {value!r}")
        for name, value in (("aux_loss_coef", aux_loss_coef), ("z_loss_coef", z_loss_coef),
                            ("bias_update_rate", bias_update_rate)):
            check_number(op, name, value, lo=0.0)
        if capacity_factor is not None:
            check_number(op, "capacity_factor", capacity_factor, lo=0.0, strict=True)
        check_number(op, "scaling", scaling, lo=0.0, strict=True)
        _checks.check_int(op, "num_groups", num_groups, 1, num_experts)
        if num_experts % num_groups:
            raise ValueError(f"{op}: num_groups ({num_groups}) must divide num_experts ({num_experts})")
        _checks.check_int(op, "topk_groups", topk_groups, 1, num_groups, " (at most num_groups)")
        if num_groups > 1 and top_k > topk_groups * (num_experts // num_groups):
            raise ValueError(f"{op}: top_k ({top_k}) must be at most topk_groups * experts per group "
                             f"({topk_groups} * {num_experts // num_groups})")
        if shared_expert_size is not None:
            _checks.check_int(op, "shared_expert_size", shared_expert_size, 1)
        elif shared_expert_gate:
            raise ValueError(f"{op}: shared_expert_gate=True needs a shared expert (shared_expert_size)")

        self.hidden_size, self.intermediate_size, self.num_experts, self.top_k = (
            hidden_size, intermediate_size, num_experts, top_k)
        self.score, self.renormalize, self.activation, self.backend = score, renormalize, activation, backend
        self.num_groups, self.topk_groups, self.scaling = num_groups, topk_groups, float(scaling)
        self.aux_loss_coef, self.z_loss_coef = float(aux_loss_coef), float(z_loss_coef)
        self.bias_update_rate, self.capacity_factor = float(bias_update_rate), capacity_factor

        factory = dict(dtype=dtype, device=device)
        self.gate = nn.Linear(hidden_size, num_experts, bias=False, **factory)
        self.experts = FinTeamExperts(num_experts, hidden_size, intermediate_size, **factory)
        self.shared_expert = (None if shared_expert_size is None
                              else SharedExpert(hidden_size, shared_expert_size, activation, **factory))
        self.shared_expert_gate = nn.Linear(hidden_size, 1, **factory, bias=False) if shared_expert_gate else None
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32, device=device))
        # Token counts since the last update_expert_bias (not saved: they belong to one step).
        self.register_buffer("expert_load_E", torch.zeros(num_experts, dtype=torch.int64, device=device),
                             persistent=False)
        self.register_load_state_dict_pre_hook(zero_bias_when_missing)
        self._router_stats: RouterStats | None = None
        self._last_routing = None  # what router_stats is made of, until it is first read
        if ep_group is not None:
            self.shard_experts_(ep_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x_TH = x.reshape(-1, self.hidden_size)
        logits_TE = self.gate(x_TH)
        # the arguments were checked when the layer was built: gating, experts and losses skip it
        routing = routed_gating(logits_TE, self.top_k, self.score, self.renormalize, self.expert_bias,
                                self.num_groups, self.topk_groups, self.scaling, self.backend)
        weights_TK, dropped = routing.weights_TK, None
        if self.capacity_factor is not None:
            keep_TK, dropped = capacity_keep(routing.ids_TK, self.num_experts, self.capacity_factor, self.backend)
            weights_TK = weights_TK * keep_TK
        out_TH = self.experts(x_TH, routing.ids_TK, weights_TK, self.activation, self.backend,
                              tokens_per_expert_E=routing.tokens_per_expert_E)
        if self.shared_expert is not None:
            shared_TH = self.shared_expert(x_TH)
            if self.shared_expert_gate is not None:
                shared_TH = torch.sigmoid(self.shared_expert_gate(x_TH)) * shared_TH
            out_TH = out_TH + shared_TH
        # The losses join the graph now when a backward can reach them; otherwise they are
        # computed only if router_stats is read (evaluation and decoding never pay for them).
        losses = None
        if torch.is_grad_enabled() and logits_TE.requires_grad:
            losses = routed_losses(logits_TE, routing.ids_TK, self.num_experts, self.backend)
        # Plain attribute writes: nn.Module.__setattr__ (which looks for a parameter, buffer or
        # module of the name) costs 1-2 us a call, a few percent of a decode step's layer.
        self.__dict__["_router_stats"] = None
        self.__dict__["_last_routing"] = (logits_TE.detach(), routing, dropped, losses)
        if self.training and self.bias_update_rate > 0:
            with torch.no_grad():
                self.expert_load_E += routing.tokens_per_expert_E
        return out_TH.view(*x.shape[:-1], self.hidden_size)

    @property
    def router_stats(self) -> RouterStats | None:
        """What the router did in the last forward (None before the first); no host sync."""
        if self._last_routing is not None:
            logits_TE, routing, dropped, losses = self._last_routing
            if losses is None:
                losses = routed_losses(logits_TE, routing.ids_TK, self.num_experts, self.backend)
            if dropped is None:
                dropped = torch.zeros((), dtype=torch.int64, device=logits_TE.device)
            self._router_stats = RouterStats(losses.aux_loss, losses.z_loss, routing.tokens_per_expert_E, dropped)
            self._last_routing = None
        return self._router_stats

    def __getstate__(self):
        """For copy.deepcopy and pickling: the last forward's losses are part of that forward's
        autograd graph, which a copy cannot share (and deepcopy refuses non-leaf tensors), so a
        copy keeps them detached."""
        state = self.__dict__.copy()
        stats = self.router_stats
        state["_router_stats"] = None if stats is None else RouterStats(*(t.detach() for t in stats))
        state["_last_routing"] = None
        return state

    def _apply(self, fn, recurse=True):
        bias_E = self.expert_bias
        super()._apply(fn, recurse)
        # A model-wide cast (.bfloat16()) must not round the bias: routing math is fp32, and bf16
        # would swallow the small steps of update_expert_bias. Device moves still apply.
        if self.expert_bias.dtype != torch.float32:
            self.expert_bias = bias_E.to(self.expert_bias.device)
        return self

    def _check_input(self, x) -> None:
        weight = self.gate.weight
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"FinTeamMoE: x must be a tensor [..., {self.hidden_size}]; got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"FinTeamMoE: x must be [..., {self.hidden_size}] (hidden_size last); got shape {tuple(x.shape)}")
        if x.device != weight.device:
            raise ValueError(f"FinTeamMoE: x is on {x.device} but the layer is on {weight.device}")
        if not torch.is_autocast_enabled(x.device.type) and x.dtype != weight.dtype:
            raise TypeError(f"FinTeamMoE: x is {x.dtype} but the layer's parameters are {weight.dtype} "
                            "(cast one of them, or run under torch.autocast)")

    def shard_experts_(self, ep_group) -> "FinTeamMoE":
        """Turn this full layer into its rank's shard of `ep_group` (E/P experts); returns self.
        Its state dict then names the global experts it holds: `experts.gate_up_proj[lo:hi]`."""
        self.experts.shard_(ep_group)
        return self

    def extra_repr(self) -> str:
        options = [f"top_k={self.top_k}", f"score={self.score!r}", f"activation={self.activation!r}"]
        if self.capacity_factor is not None:
            options.append(f"capacity_factor={self.capacity_factor}")
        if self.num_groups > 1:
            options.append(f"num_groups={self.num_groups}, topk_groups={self.topk_groups}")
        return ", ".join(options)
