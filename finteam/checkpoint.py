"""Checkpoints: every write atomic, every model in safetensors, every artefact stamped.

- Models are Hugging Face checkpoints (`save_pretrained`, safetensors) plus `finteam.json` (the
  recipe, the stage, `finteam.__version__` and the git commit), so transformers, vLLM or SGLang
  load them as they are. A folder is written beside its final place and renamed into it.
- Training state (for resume) lives in `<stage>/checkpoints/step_NNNNNN/`: the weights as
  safetensors (with the stamp in the file metadata) and `trainer.pt` (optimizer, scheduler, RNG,
  step) read back with `torch.load(weights_only=True)`. `checkpoints/latest` is a symlink swapped
  by rename, so a kill at any instant leaves the previous checkpoint or the new one, whole.
- A stage that finished writes `<stage>/finteam.json` with `"done": true`; reruns skip it.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import finteam


@functools.cache
def code_version() -> dict:
    """finteam's version and, when the code sits in a git checkout, its commit."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"version": finteam.__version__, "commit": commit}


def stamp(recipe, stage: str, **extra) -> dict:
    return {"stage": stage, **code_version(), "recipe": recipe.to_dict(), "time": time.strftime("%Y-%m-%d %H:%M:%S"), **extra}


def _replace_dir(tmp: Path, final: Path) -> None:
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def save_model(model, path: Path, meta: dict, tokenizer=None, state_dict=None) -> None:
    """A Hugging Face checkpoint at `path`, written beside it and renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    if state_dict is not None and model.config.tie_word_embeddings:
        # A gathered (FSDP) state dict holds the tied head as a separate copy of the embedding.
        state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    model.save_pretrained(tmp, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    write_json(tmp / "finteam.json", meta)
    _replace_dir(tmp, path)


def load_model(path: Path, experts_implementation: str | None = None, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    kwargs = {"experts_implementation": experts_implementation} if experts_implementation else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)


def unique_tensors(state_dict: dict) -> dict:
    """Drop the second name of tied tensors (safetensors refuses shared storage)."""
    seen, out = set(), {}
    for name, t in state_dict.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            out[name] = t.detach().contiguous()
    return out


def save_train_state(ckpt_dir: Path, step: int, weights: dict, trainer: dict, meta: dict, keep: int = 1) -> Path:
    """checkpoints/step_NNNNNN/{model.safetensors, trainer.pt, finteam.json}, then `latest` -> it."""
    final = ckpt_dir / f"step_{step:06d}"
    tmp = ckpt_dir / f"step_{step:06d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(unique_tensors(weights), tmp / "model.safetensors", metadata={"finteam": json.dumps(meta, default=str)})
    torch.save(trainer, tmp / "trainer.pt")
    write_json(tmp / "finteam.json", meta)
    _replace_dir(tmp, final)
    link = ckpt_dir / "latest.tmp"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(final.name)
    os.replace(link, ckpt_dir / "latest")
    for old in sorted(ckpt_dir.glob("step_*"))[:-keep]:
        if old.is_dir() and old != final:
            shutil.rmtree(old)
    return final


def load_train_state(ckpt_dir: Path) -> tuple[dict, dict] | None:
    """(weights, trainer state) of the latest complete checkpoint, or None."""
    latest = ckpt_dir / "latest"
    if not latest.exists():
        return None
    weights = load_file(latest / "model.safetensors")
    trainer = torch.load(latest / "trainer.pt", weights_only=True)
    return weights, trainer


def done(stage_dir: Path) -> dict | None:
    marker = stage_dir / "finteam.json"
    if marker.is_file():
        meta = json.loads(marker.read_text())
        if meta.get("done"):
            return meta
    return None


def mark_done(stage_dir: Path, meta: dict, seconds: float, summary: dict | None = None) -> None:
    write_json(stage_dir / "finteam.json", {**meta, "done": True, "seconds": round(seconds, 1), "summary": summary or {}})
