"""Stage `assemble`: the role experts become one Mixtral (Branch-Train-MiX, Sukhbaatar et al.
2024, "Branch-Train-MiX: Mixing Expert LLMs into a Mixture-of-Experts LLM").

Shape legend: E experts, H hidden, I FFN width, L layers.

- Each expert's FFN (Llama `gate_proj` [I, H], `up_proj` [I, H], `down_proj` [H, I]) becomes
  one expert of transformers' stacked layout: `gate_up_proj` [E, 2I, H] (gate rows first, as
  transformers' experts split them) and `down_proj` [E, H, I].
- Everything else (attention, norms, embeddings, head) is averaged over the experts, or taken
  from the base (`assemble.shared`), or, for checks, from one named expert.
- With `assemble.base_expert`, the base model's FFN is one more expert (the generalist).
- `assemble.expert_spread` s moves each role expert's FFN towards the experts' mean:
  mean + s * (own - mean). 1 keeps the experts as trained; 0 makes every role expert the
  uniform merge's FFN, so that with `shared: average` the team starts as exactly the merge
  (any routing gives the same output) and only tuning can tell its experts apart.
- Router rows, per layer, initialised by `router_init`:
    hidden  each role's documents through the base model; row e is the role's mean FFN input
            at that layer minus the mean over roles, scaled to `router_scale` (a token that
            reads like role e's text scores e highest from the first step)
    embed   the same with mean token embeddings, for every layer (cheaper, cruder)
    random  N(0, initializer_range), as transformers would
  The base expert's row is zero: it is nobody's specialist and wins by elimination.
- The result is saved with `save_pretrained` (safetensors): `AutoModelForCausalLM` loads it.

`merge` builds the no-router baseline: every weight the plain average of the experts' (a
uniform model soup), a dense Llama of one expert's size.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import MixtralForCausalLM

from . import model as models
from .checkpoint import load_model, save_model, stamp
from .config import ROLES, Recipe
from .data import load_corpus
from .progress import log


def average(tensors) -> torch.Tensor:
    """The element-wise mean of same-shaped tensors, in fp32."""
    return torch.stack([t.float() for t in tensors]).mean(0)


def ffn(sd: dict, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up [2I, H], down [H, I]) of one Llama layer."""
    p = f"model.layers.{layer}.mlp."
    return torch.cat([sd[p + "gate_proj.weight"], sd[p + "up_proj.weight"]]), sd[p + "down_proj.weight"]


@torch.no_grad()
def build_moe(experts: list, base=None, base_expert: bool = False, shared: str | int = "average", top_k: int = 2,
              aux_loss_coef: float = 0.02, router_rows: list[torch.Tensor] | None = None, seed: int = 0,
              spread: float = 1.0) -> MixtralForCausalLM:
    """A Mixtral whose expert e is `experts[e]`'s FFN (then the base's, if `base_expert`).

    shared: "average" | "base" | an index into `experts` (take the non-FFN weights from it).
    router_rows: per layer [E, H] router weights (default: transformers' random init).
    spread: each of `experts`' FFNs becomes mean + spread * (own - mean) (1: as trained).
    """
    if (base_expert or shared == "base") and base is None:
        raise ValueError("assemble: base_expert and shared='base' need the base model")
    sds = [m.state_dict() for m in experts]
    base_sd = base.state_dict() if base is not None else {}
    config = models.mixtral_config(experts[0].config, len(sds) + base_expert, top_k, aux_loss_coef)
    torch.manual_seed(seed)
    moe = MixtralForCausalLM(config)
    out = moe.state_dict()
    for name in out:
        if ".mlp." in name:
            continue
        if shared == "average":
            out[name].copy_(average(sd[name] for sd in sds))
        elif shared == "base":
            out[name].copy_(base_sd[name])
        else:
            out[name].copy_(sds[shared][name])
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}.mlp."
        ffns = [ffn(sd, layer) for sd in sds]
        if spread != 1.0:
            means = [average(f[i] for f in ffns) for i in range(2)]
            ffns = [tuple(m + spread * (w.float() - m) for w, m in zip(f, means)) for f in ffns]
        if base_expert:
            ffns.append(ffn(base_sd, layer))
        for e, (gate_up_2IH, down_HI) in enumerate(ffns):
            out[p + "experts.gate_up_proj"][e].copy_(gate_up_2IH)
            out[p + "experts.down_proj"][e].copy_(down_HI)
        if router_rows is not None:
            out[p + "gate.weight"].copy_(router_rows[layer])
    return moe


@torch.no_grad()
def ffn_inputs(base, tokenizer, texts: list[str], max_len: int) -> torch.Tensor:
    """[L, H]: the mean input of each layer's FFN (after its norm) over the tokens of `texts`."""
    layers = base.model.layers
    sums = torch.zeros(len(layers), base.config.hidden_size)
    count = 0
    mask_box = {}

    def hook(i):
        def grab(module, args):
            x = args[0]
            sums[i] += (x.float() * mask_box["m"].unsqueeze(-1)).sum((0, 1)).cpu()
        return grab

    handles = [layer.mlp.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        for start in range(0, len(texts), 16):
            batch = tokenizer(texts[start : start + 16], return_tensors="pt", padding=True, truncation=True, max_length=max_len)
            batch = {k: v.to(base.device) for k, v in batch.items()}
            mask_box["m"] = batch["attention_mask"].float()
            base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            count += int(batch["attention_mask"].sum())
    finally:
        for h in handles:
            h.remove()
    return sums / max(count, 1)


@torch.no_grad()
def mean_embeddings(base, tokenizer, texts: list[str], max_len: int) -> torch.Tensor:
    ids = [t[:max_len] for t in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    flat = torch.tensor([i for row in ids for i in row], dtype=torch.long, device=base.device)
    mean_H = base.model.embed_tokens.weight[flat].float().mean(0).cpu()
    return mean_H.expand(base.config.num_hidden_layers, -1)


def rows_from_means(means_RLH: torch.Tensor, scale: float) -> torch.Tensor:
    """Router rows [R, L, H]: each role's mean minus the mean over roles, scaled to `scale`."""
    centred_RLH = means_RLH - means_RLH.mean(0, keepdim=True)
    return scale * centred_RLH / centred_RLH.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def router_rows(recipe: Recipe, base, tokenizer, data_dir: Path, num_experts: int, seed: int) -> list[torch.Tensor] | None:
    """Per layer [E, H] router weights for `recipe.assemble.router_init` (None: random)."""
    how = recipe.assemble.router_init
    if how == "random":
        return None
    n, max_len = recipe.data.router_prompts, recipe.model.seq_len
    measure = ffn_inputs if how == "hidden" else mean_embeddings
    means_RLH = torch.stack([measure(base, tokenizer, load_corpus(data_dir, role)[:n], max_len) for role in ROLES])
    rows_RLH = rows_from_means(means_RLH, recipe.assemble.router_scale)
    rows = []
    for layer in range(rows_RLH.shape[1]):
        w_EH = torch.zeros(num_experts, rows_RLH.shape[2])
        w_EH[: len(ROLES)] = rows_RLH[:, layer]
        rows.append(w_EH)
    return rows


def run(recipe: Recipe, data_dir: Path, base_dir: Path, expert_dirs: list[Path], tokenizer, out: Path, seed: int,
        device=None) -> dict:
    """The team from the experts; the base runs the router-init prompts on `device`, and the
    weights are combined on the CPU."""
    cfg = recipe.assemble
    experts = [load_model(d) for d in expert_dirs]
    base = load_model(base_dir).to(device or "cpu")
    rows = router_rows(recipe, base, tokenizer, data_dir, len(ROLES) + cfg.base_expert, seed)
    moe = build_moe(experts, base.cpu(), cfg.base_expert, cfg.shared, cfg.top_k, cfg.router_aux_loss_coef, rows, seed,
                    cfg.expert_spread)
    save_model(moe, out / "model", stamp(recipe, "assemble", seed=seed), tokenizer)
    total, active = models.num_params(moe), models.num_params(moe, cfg.top_k)
    spread = f", experts at {cfg.expert_spread} of their distance from the mean" if cfg.expert_spread != 1 else ""
    log(f"assemble  Mixtral with {moe.config.num_local_experts} experts, top-{cfg.top_k}, router init {cfg.router_init}"
        f"{spread}: {total / 1e6:.2f}M parameters, {active / 1e6:.2f}M active")
    return {"experts": moe.config.num_local_experts, "params": total, "active_params": active}


@torch.no_grad()
def merge(expert_dirs: list[Path], recipe: Recipe, tokenizer, out: Path, seed: int) -> dict:
    experts = [load_model(d) for d in expert_dirs]
    merged = experts[0]
    sds = [m.state_dict() for m in experts]
    for name, t in merged.state_dict().items():
        t.copy_(average(sd[name] for sd in sds))
    save_model(merged, out / "model", stamp(recipe, "merge", seed=seed), tokenizer)
    return {"params": models.num_params(merged)}
