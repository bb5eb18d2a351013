"""Expert parallelism for instruction-tuning the team (`distributed.expert_parallel` P > 1).

Shape legend: E experts, P ranks of an expert group, L = E/P experts per rank, W ranks, R = W/P replicas.

Layout. The W ranks form a 2-D device mesh (R replicas x P), rank = replica * P + ep index, so
the P ranks of an expert group are neighbours (on one node, the all_to_all rides its fast links).
Every MixtralSparseMoeBlock becomes a `finteam_kernels.hf.moe_from_block(block)` (the same weights under the
same names) that keeps the experts [ep*L, (ep+1)*L); tokens reach them through all_to_all
(finteam_kernels/parallel.py). FSDP2 shards those experts over the R ranks that hold the same
ones (the mesh's replica dimension), and everything else over all W ranks. Data stays
data-parallel over all W ranks, exactly as without expert parallelism.

Gradient scale. Plain FSDP2 gives every parameter the mean over the W ranks of their losses'
gradients. An expert's gradient on its rank already sums the contributions of the P ranks of its
group (their rows came in through all_to_all, and their gradients go back the same way); FSDP2
then reduces it over the R replicas. Summed over R, that is the sum over all W ranks, so the
experts' FSDP2 units divide by W, not by their group size R.

Router loss. transformers records the router logits for `output_router_logits` with hooks on its
own router class, which FinTeamMoE replaces; `RouterLoss` records them with hooks on the
FinTeamMoE routers instead and applies transformers' `load_balancing_loss_func` (one loss over
all layers' logits concatenated, padding masked), so the objective does not depend on P.

State. Checkpoints hold full tensors under transformers' names, as without expert parallelism
(and so either layout resumes from the other's checkpoints): to save, each tensor is gathered
over its FSDP2 mesh and the experts then over their expert group, on rank 0; to resume, rank 0
reads them and broadcasts one full tensor at a time, of which every rank keeps its piece.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from .train import DataParallel, model_loss


def is_expert(name: str) -> bool:
    return ".mlp.experts." in name


class ExpertParallel(DataParallel):
    """P-way expert parallelism times W/P-way FSDP2 for a Mixtral; see the module docstring."""

    def __init__(self, size: int, device: torch.device):
        from torch.distributed.device_mesh import init_device_mesh

        W = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if W % size:
            raise ValueError(f"distributed.expert_parallel ({size}) must divide the number of processes "
                             f"(run under torchrun); got {W}")
        self.P, self.W, self.device = size, W, device
        self.mesh = init_device_mesh(device.type, (W // size, size), mesh_dim_names=("replica", "ep"))
        self.world = init_device_mesh(device.type, (W,), mesh_dim_names=("world",))
        self.group = self.mesh.get_group("ep")

    def convert(self, model, where: str) -> None:
        """Swap every MoE block of `model` for a FinTeamMoE holding this rank's experts (before
        the model moves to the device, so the other experts never reach it)."""
        from finteam_kernels.hf import moe_from_block

        E = model.config.num_local_experts
        if E % self.P:
            raise ValueError(f"distributed.expert_parallel ({self.P}) must divide the number of experts; "
                             f"{where} has {E}")
        model.config.output_router_logits = False
        for layer in model.model.layers:
            # backend None: $FINTEAM_BACKEND or "auto", as experts_implementation="finteam" runs them.
            layer.mlp = moe_from_block(layer.mlp, backend=None).shard_experts_(self.group)

    def shard(self, model) -> None:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            experts = fully_shard(layer.mlp.experts, mesh=self.mesh["replica"])
            experts.set_gradient_divide_factor(float(self.W))
            # With replicas, a sum and then the division: FSDP2 would otherwise fold the factor
            # into the reduce-scatter as PREMUL_SUM, which NCCL has and gloo does not. Not with one
            # replica: there FSDP2 skips the reduce-scatter, divides once itself, and with the
            # forced sum would divide a second time (torch 2.13).
            experts.set_force_sum_reduction_for_comms(self.W // self.P > 1)
            fully_shard(layer, mesh=self.world)
        fully_shard(model, mesh=self.world)

    def clip(self, model, max_norm: float) -> torch.Tensor:
        # Every rank's pieces are disjoint (FSDP2 shards, and distinct experts across the expert
        # group), so the squared norm is the sum over all ranks of the local squared norms.
        grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                 for p in model.parameters() if p.grad is not None]
        squared = torch.zeros((), dtype=torch.float32, device=self.device)
        for g in grads:
            squared += torch.linalg.vector_norm(g, dtype=torch.float32).square()
        dist.all_reduce(squared)
        norm = squared.sqrt()
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.to(g.dtype))
        return norm

    def _full(self, name: str, piece: torch.Tensor) -> torch.Tensor:
        """The whole tensor of which `piece` (of parameter `name`) is this rank's part, on the CPU
        (a collective: every rank calls it in the same order)."""
        full = piece.full_tensor() if isinstance(piece, DTensor) else piece
        if is_expert(name):
            parts = [torch.empty_like(full) for _ in range(self.P)]
            dist.all_gather(parts, full.contiguous(), group=self.group)
            full = torch.cat(parts)
        return full.cpu()

    def _piece(self, name: str, param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of the full tensor `full` of parameter `name`, laid out as `param`."""
        if is_expert(name):
            L = param.shape[0]
            lo = dist.get_rank(self.group) * L
            full = full[lo : lo + L]
        return distribute_tensor(full.to(self.device), param.device_mesh, param.placements, src_data_rank=None)

    def state(self, model, opt) -> tuple[dict, dict]:
        rank0 = dist.get_rank() == 0
        weights = self.weights(model) or {}
        names = {id(p): name for name, p in model.named_parameters()}
        state = {}
        for name, p in model.named_parameters():  # model order, the same on every rank
            if p in opt.state:
                full = {k: v if k == "step" else self._full(name, v) for k, v in opt.state[p].items()}
                if rank0:
                    state[name] = full
        groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": [names[id(p)] for p in group["params"]]}
                  for group in opt.param_groups]
        return weights, {"state": state, "param_groups": groups}

    def restore(self, model, opt, weights: dict, opt_state: dict) -> None:
        params = dict(model.named_parameters())
        rank0 = dist.get_rank() == 0
        # What rank 0 read, less the tensors: which moments each parameter has, the steps, the
        # hyperparameters. The tensors follow one at a time.
        outline = [None]
        if rank0:
            missing = sorted(set(params) - set(weights))
            outline = [{"missing": missing, "param_groups": opt_state["param_groups"],
                        "state": {name: {k: v if k == "step" else None for k, v in moments.items()}
                                  for name, moments in opt_state["state"].items()}}]
        dist.broadcast_object_list(outline, src=0)
        outline = outline[0]
        if outline["missing"]:
            raise RuntimeError(f"resume: the checkpoint lacks {outline['missing']}")
        with torch.no_grad():
            for name, p in params.items():
                p.to_local().copy_(self._received(name, p, weights.get(name)).to_local())
        names = {id(p): name for name, p in params.items()}
        state, groups, i = {}, [], 0
        for group, saved in zip(opt.param_groups, outline["param_groups"]):
            ids = []
            for p in group["params"]:
                name = names[id(p)]
                if name in outline["state"]:
                    state[i] = {k: v if k == "step" else self._received(name, p, opt_state["state"][name][k] if rank0 else None)
                                for k, v in outline["state"][name].items()}
                ids.append(i)
                i += 1
            groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": ids})
        opt.load_state_dict({"state": state, "param_groups": groups})

    def _received(self, name: str, param: torch.Tensor, full: torch.Tensor | None) -> DTensor:
        """This rank's piece of the full tensor `full` that rank 0 holds for parameter `name`."""
        shape = (param.shape[0] * self.P, *param.shape[1:]) if is_expert(name) else param.shape
        full = full.to(self.device, param.dtype) if full is not None else torch.empty(shape, dtype=param.dtype,
                                                                                        device=self.device)
        dist.broadcast(full, src=0)
        return self._piece(name, param, full)

    def weights(self, model) -> dict | None:
        rank0 = dist.get_rank() == 0
        weights = {}
        for name, p in model.named_parameters():
            full = self._full(name, p.detach())
            if rank0:
                weights[name] = full
        return weights if rank0 else None


class RouterLoss:
    """The training loss of a Mixtral whose MoE blocks are FinTeamMoE: `loss_of(model, batch)`
    (the model's own loss by default) plus `config.router_aux_loss_coef` times transformers'
    load-balancing loss, as `output_router_logits=True` adds it to an unconverted Mixtral."""

    def __init__(self, model, loss_of=model_loss):
        from finteam_kernels import FinTeamMoE

        self.loss_of = loss_of
        self.coef = model.config.router_aux_loss_coef
        self.num_experts, self.top_k = model.config.num_local_experts, model.config.num_experts_per_tok
        self.logits: list[torch.Tensor] | None = None  # a list only during a training forward
        for module in model.modules():
            if isinstance(module, FinTeamMoE):
                module.gate.register_forward_hook(self._record)

    def _record(self, module, args, logits_TE) -> None:
        # Recording stops after the forward: gradient checkpointing reruns the routers in the
        # backward, and those logits are no part of the loss.
        if self.logits is not None:
            self.logits.append(logits_TE)

    def __call__(self, model, batch: dict) -> torch.Tensor:
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

        if not self.coef:  # as an unconverted Mixtral with output_router_logits off (instruct.py)
            return self.loss_of(model, batch)
        self.logits = []
        try:
            loss = self.loss_of(model, batch)
            logits = tuple(self.logits)
        finally:
            self.logits = None
        aux = load_balancing_loss_func(logits, self.num_experts, self.top_k, batch.get("attention_mask"))
        return loss + self.coef * aux.to(loss.device)
