"""Stage `generate`: answer prompts with any checkpoint of the pipeline (greedy, or sampled
with --temperature), for a person to try the model. A prompt longer than the model's positions
leave room for is cut from the left (the end of a prompt says what to answer), and the log says so."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from . import model as models
from .checkpoint import load_model
from .progress import log
from .tokenizer import load as load_tokenizer


@torch.no_grad()
def answer(model_dir: Path, prompts: list[str], max_new_tokens: int = 48, temperature: float = 0.0,
           experts_implementation: str = "eager") -> list[str]:
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1; got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"--temperature must be >= 0 (0: greedy); got {temperature}")
    model = load_model(model_dir)
    if hasattr(model.config, "num_local_experts"):
        models.use_experts(model, experts_implementation)
    tokenizer = load_tokenizer(model_dir)
    positions = model.config.max_position_embeddings
    if max_new_tokens >= positions:
        raise ValueError(f"--max-new-tokens must be below the model's {positions} positions; got {max_new_tokens}")
    room = positions - max_new_tokens
    model.eval()
    out = []
    for number, prompt in enumerate(prompts, 1):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        if ids.shape[1] == 0:
            raise ValueError(f"prompt {number} is empty")
        if ids.shape[1] > room:
            log(f"generate  prompt {number} has {ids.shape[1]} tokens and the model {positions} positions: its first "
                f"{ids.shape[1] - room} tokens are dropped, the last {room} kept (room for {max_new_tokens} new)")
            ids = ids[:, -room:]
        sampled = temperature > 0
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=sampled, temperature=temperature if sampled else None, top_p=None, top_k=None,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        out.append(tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return out
