"""Stage `tokenizer`: a byte-level BPE trained on the role corpora (tiny recipes), or the base
model's own tokenizer (recipes that start from a checkpoint).

Byte-level BPE (GPT-2 style: bytes mapped to printable characters, then merges) never meets an
unknown character, which matters for real corpora full of tickers, currency signs and tables.
The result is saved as a transformers `PreTrainedTokenizerFast`, so each model checkpoint can
carry it and `AutoTokenizer.from_pretrained(checkpoint)` works.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .config import ROLES, Recipe
from .data import load_corpus, load_tasks
from .progress import log

PAD, EOS = "<|pad|>", "<|endoftext|>"


def train_bpe(texts, vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=None)


def run(recipe: Recipe, data_dir: Path, out: Path) -> dict:
    if recipe.tokenizer.kind == "base":
        tok = AutoTokenizer.from_pretrained(recipe.model.base)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    else:
        # The prompts' wording is part of what the tokenizer should compress well.
        texts = [t for role in ROLES for t in load_corpus(data_dir, role)]
        texts += [ex.prompt + " " + ex.answer for ex in load_tasks(data_dir, "train")]
        tok = train_bpe(texts, recipe.tokenizer.vocab_size)
    tok.save_pretrained(out)
    sample = load_corpus(data_dir, ROLES[0])[0][:200]
    ids = tok(sample)["input_ids"]
    log(f"tokenizer  {len(tok)} tokens  ({len(sample) / max(len(ids), 1):.1f} characters per token on a macro sample)")
    return {"vocab_size": len(tok)}


def load(path: Path):
    return AutoTokenizer.from_pretrained(path)
