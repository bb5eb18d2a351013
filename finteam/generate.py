"""Stage `generate`: answer prompts with any checkpoint of the pipeline (greedy, or sampled
with --temperature), for a person to try the model."""
from __future__ import annotations

from pathlib import Path

import torch

from . import model as models
from .checkpoint import load_model
from .tokenizer import load as load_tokenizer


@torch.no_grad()
def answer(model_dir: Path, prompts: list[str], max_new_tokens: int = 48, temperature: float = 0.0,
           experts_implementation: str = "eager") -> list[str]:
    model = load_model(model_dir)
    if hasattr(model.config, "num_local_experts"):
        models.use_experts(model, experts_implementation)
    tokenizer = load_tokenizer(model_dir)
    model.eval()
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        sampled = temperature > 0
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=sampled, temperature=temperature if sampled else None, top_p=None, top_k=None,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        out.append(tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return out
