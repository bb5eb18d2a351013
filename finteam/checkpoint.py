"""Checkpoints: every write atomic, every model in safetensors, every artefact stamped.

- Models are Hugging Face checkpoints (`save_pretrained`, safetensors) plus `finteam.json` (the
  recipe, the stage, `finteam.__version__` and the git commit), so transformers, vLLM or SGLang
  load them as they are. A folder is written beside its final place and renamed into it.
- Training state (for resume) lives in `<stage>/checkpoints/step_NNNNNN/`: the weights as
  safetensors (with the stamp in the file metadata) and `trainer.pt` (optimizer, scheduler, RNG,
  step) read back with `torch.load(weights_only=True)`. `checkpoints/latest` is a symlink swapped
  by rename, so a kill at any instant leaves the previous checkpoint or the new one, whole.
- Every saved folder (model or training state) gets `SHA256SUMS` (the `sha256sum` format, so
  `sha256sum -c SHA256SUMS` checks it by hand too); loading a model or resuming checks it first,
  so a truncated or corrupted file stops the run with one line naming the file.
- A stage that finished writes `<stage>/finteam.json` with `"done": true`; reruns skip it.
- `RunLock`: one run at a time per run folder (an `flock` on `<run>/finteam.lock`, which names
  the holder: pid, host, start time, command).
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import pickle
import shutil
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import finteam

SUMS = "SHA256SUMS"


class CheckpointError(ValueError):
    """A saved file that is missing, truncated or corrupted; the message names it."""


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


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_sums(folder: Path) -> None:
    """`folder/SHA256SUMS`: the digest of every other file in it (hashed in threads: hashlib
    releases the GIL, and a large checkpoint comes in several shards)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != SUMS)
    with ThreadPoolExecutor(min(8, max(1, len(files)))) as pool:
        digests = list(pool.map(sha256, files))
    lines = [f"{d}  {p.relative_to(folder).as_posix()}\n" for d, p in zip(digests, files)]
    (folder / SUMS).write_text("".join(lines))


def verify_sums(folder: Path, remedy: str) -> None:
    """Check every file `folder/SHA256SUMS` lists (folders without one, such as a checkpoint
    made elsewhere, are taken as they are); a CheckpointError names the first bad file."""
    sums = folder / SUMS
    if not sums.is_file():
        return
    listed = []
    for line in sums.read_text().splitlines():
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise CheckpointError(f"checkpoint file {sums} is corrupted (a line reads {line!r}); {remedy}")
        listed.append((digest, folder / name))
    for digest, path in listed:
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing (listed in {sums}); {remedy}")
    with ThreadPoolExecutor(min(8, max(1, len(listed)))) as pool:
        found = list(pool.map(sha256, [p for _, p in listed]))
    for (digest, path), got in zip(listed, found):
        if got != digest:
            raise CheckpointError(f"checkpoint file {path} is truncated or corrupted (sha256 {got[:12]}..., saved as "
                                  f"{digest[:12]}...); {remedy}")


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
    write_sums(tmp)
    _replace_dir(tmp, path)


def load_model(path: Path, experts_implementation: str | None = None, dtype=torch.float32):
    """The transformers model saved at `path`, its files checked against SHA256SUMS first."""
    from transformers import AutoModelForCausalLM

    if not (Path(path) / "config.json").is_file():
        raise CheckpointError(f"no checkpoint at {path} (no config.json there): the stage that makes it has not run")
    remedy = f"rerun the stage that wrote {path} with --force"
    verify_sums(Path(path), remedy)
    kwargs = {"experts_implementation": experts_implementation} if experts_implementation else {}
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except (SafetensorError, OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot load the checkpoint {path}: {str(err).splitlines()[0]}") from None


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
    write_sums(tmp)
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
    remedy = f"delete {ckpt_dir} to start the stage over"
    verify_sums(latest.resolve(), remedy)
    try:
        weights = load_file(latest / "model.safetensors")
        trainer = torch.load(latest / "trainer.pt", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"cannot resume from {latest.resolve()}: {str(err).splitlines()[0]}; {remedy}") from None
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


class RunLock:
    """One run at a time in a run folder: an exclusive `flock` on `<run>/finteam.lock`, held
    for the life of the process (the kernel drops it when the process ends, even when killed),
    and a file that names the holder for the run that is turned away."""

    def __init__(self, run_dir: Path, command: str):
        self.path = Path(run_dir) / "finteam.lock"
        self.command = command
        self.file = None

    def __enter__(self) -> RunLock:
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise RunLocked(f"{self.path.parent} is in use by {holder}; wait for it to finish "
                            "(or give this run another out_dir)") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')} "
                        f"({self.command})\n")
        self.file.flush()
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()  # closing the only descriptor releases the lock


class RunLocked(RuntimeError):
    """Another process holds the run folder's lock; the message names it."""
