"""Training batches as a pure function of the sample index (see train.py for why).

PackedTokens   pretraining: documents tokenized, joined with EOS and cut into full blocks of
               `seq_len` tokens (packing: no padding, every token trains); a block may span
               two documents, which is what EOS between them is for.
Instructions   instruction tuning: prompt + " " + answer + EOS, right-padded per micro-batch,
               labels -100 everywhere except the answer, so the loss is on answers only.
"""
from __future__ import annotations

import torch

IGNORE = -100


def shuffled(n: int, seed: int, index: torch.Tensor) -> torch.Tensor:
    """Item of each global sample index: epoch e reads a fresh permutation of range(n)."""
    out = torch.empty_like(index)
    epochs = index // n
    for epoch in epochs.unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        sel = epochs == epoch
        out[sel] = perm[index[sel] % n]
    return out


class PackedTokens:
    def __init__(self, texts: list[str], tokenizer, seq_len: int, seed: int):
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        eos = tokenizer.eos_token_id
        stream = torch.tensor([t for doc in ids for t in (*doc, eos)], dtype=torch.long)
        self.blocks = stream[: len(stream) // seq_len * seq_len].view(-1, seq_len)
        if len(self.blocks) == 0:
            raise ValueError(f"pretrain: the corpus holds {len(stream)} tokens, fewer than one block of {seq_len}")
        self.seed = seed

    @property
    def tokens(self) -> int:
        return self.blocks.numel()

    def get(self, first: int, size: int) -> dict[str, torch.Tensor]:
        rows = shuffled(len(self.blocks), self.seed, torch.arange(first, first + size))
        x = self.blocks[rows]
        return {"input_ids": x, "labels": x}


def encode_example(tokenizer, prompt: str, answer: str | None, max_len: int) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids + EOS); a prompt too long loses its beginning, so the question
    and the `Answer:` cue next to the answer survive."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a = [] if answer is None else tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    a = a[: max_len // 2]
    return p[-(max_len - len(a)) :], a


def pad_batch(pairs: list[tuple[list[int], list[int]]], pad_id: int, train_answer: bool = True) -> dict[str, torch.Tensor]:
    width = max(len(p) + len(a) for p, a in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for i, (p, a) in enumerate(pairs):
        n = len(p) + len(a)
        ids[i, :n] = torch.tensor(p + a)
        mask[i, :n] = 1
        if train_answer:
            labels[i, len(p) : n] = torch.tensor(a)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class Instructions:
    def __init__(self, examples, tokenizer, max_len: int, seed: int):
        if not examples:
            raise ValueError("instruct: no training examples")
        self.pairs = [encode_example(tokenizer, ex.prompt, ex.answer, max_len) for ex in examples]
        self.pad_id = tokenizer.pad_token_id
        self.seed = seed

    @property
    def tokens(self) -> int:
        return sum(len(p) + len(a) for p, a in self.pairs)

    def get(self, first: int, size: int) -> dict[str, torch.Tensor]:
        rows = shuffled(len(self.pairs), self.seed, torch.arange(first, first + size)).tolist()
        return pad_batch([self.pairs[i] for i in rows], self.pad_id)
