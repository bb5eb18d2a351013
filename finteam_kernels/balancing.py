"""Balancing the routers of a model's FinTeamMoE layers: what a trainer calls around its step.

- `router_aux_loss(model)`: the weighted load-balancing loss (Switch/Mixtral's E * sum f_e P_e)
  plus z-loss (ST-MoE) of every FinTeamMoE of the last forward, to add to the training loss.
- `update_expert_bias(model)`: aux-loss-free balancing (DeepSeek-V3): after the optimizer step,
  each layer moves its `expert_bias` by `bias_update_rate * sign(mean load - load_e)`, from the
  token counts of every forward since the last update, summed over the data-parallel group. The
  bias steers which experts are chosen, never their weights.

Shape legend: E experts.
"""
import torch
import torch.distributed as dist

from .layers import FinTeamMoE


def _layers(model: torch.nn.Module):
    return [m for m in model.modules() if isinstance(m, FinTeamMoE)]


def router_aux_loss(model: torch.nn.Module) -> torch.Tensor:
    """sum over the FinTeamMoE layers of `model` of aux_loss_coef * aux_loss + z_loss_coef *
    z_loss, from each layer's last forward (0-d float32; 0 when no layer has run)."""
    total = None
    for layer in _layers(model):
        stats = layer.router_stats
        if stats is None:
            continue
        loss = layer.aux_loss_coef * stats.aux_loss + layer.z_loss_coef * stats.z_loss
        total = loss if total is None else total + loss
    return total if total is not None else torch.zeros((), dtype=torch.float32)


@torch.no_grad()
def update_expert_bias(model: torch.nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Move every balancing layer's `expert_bias` towards equal load; call after optimizer.step().

    Counts are those of every training forward since the last call, summed over `group` (default:
    the whole default process group, when torch.distributed is initialised, so every rank gets the
    same bias; one all-reduce for all layers together). Layers with bias_update_rate == 0 are left
    alone.
    """
    layers = [layer for layer in _layers(model) if layer.bias_update_rate > 0]
    if not layers:
        return
    load = torch.cat([layer.expert_load_E for layer in layers])  # layers may differ in E
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(load, group=group)
    for layer, load_E in zip(layers, load.split([layer.num_experts for layer in layers])):
        error_E = load_E.double().mean() - load_E  # > 0: under-loaded, so raise its bias
        layer.expert_bias.add_(layer.bias_update_rate * torch.sign(error_E).to(layer.expert_bias.dtype))
        layer.expert_load_E.zero_()
