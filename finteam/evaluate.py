"""Stage `evaluate`: task scores, routing and throughput, as JSON and a Markdown table.

Scores (metrics.py): classification and movement tasks are scored by log-likelihood, the way
the FinBen harness does for label tasks: each label's summed log-probability after the prompt,
highest wins (no sampling, no parsing). Entity and numeric tasks are answered by greedy
generation and parsed.

Routing: for the team, the share of each task's tokens (prompt and answer) that the router
sends to each expert, top-k assignments counted, per layer and averaged; a PNG heat map.

Throughput: the team with transformers' eager experts vs ours (`finteam`), and the dense
baseline, each on the same batch: training tokens/s (forward+backward+AdamW step), prefill
tokens/s (one forward over the batch), decode tokens/s (greedy generation with the KV cache);
medians of 25 timings, the three models' runs interleaved in a shuffled order so that a shared
host's drift falls on all of them alike.
"""
from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import model as models
from .batches import encode_example, pad_batch
from .checkpoint import load_model
from .data import Example
from .metrics import score

PALETTE = "viridis"


@torch.no_grad()
def choice_logprobs(model, tokenizer, prompts: list[str], choices: list[str], max_len: int, batch_size: int) -> torch.Tensor:
    """[examples, choices]: summed log-probability of each choice (and its EOS) after each prompt.

    Each prompt runs once: the prompts of a batch, left-padded, fill the KV cache; the cache is
    repeated once per choice and every choice's tokens run on it in one more forward. A prompt
    longer than `max_len` minus the longest choice loses its beginning. `choice_logprobs_plain`
    is the same number from one full prompt+choice sequence per pair (the reference)."""
    answers = [encode_example(tokenizer, "", c, max_len)[1] for c in choices]
    C, width_c = len(choices), max(len(a) for a in answers)
    choice_ids = torch.full((C, width_c), tokenizer.pad_token_id, dtype=torch.long)
    choice_mask = torch.zeros_like(choice_ids)
    for j, a in enumerate(answers):
        choice_ids[j, : len(a)], choice_mask[j, : len(a)] = torch.tensor(a), 1
    out = []
    for start in range(0, len(prompts), batch_size):
        encoded = [encode_example(tokenizer, p, None, max_len - width_c)[0] for p in prompts[start : start + batch_size]]
        B, width = len(encoded), max(len(e) for e in encoded)
        ids = torch.full((B, width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(encoded):
            ids[i, width - len(e) :], mask[i, width - len(e) :] = torch.tensor(e), 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        first = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                      position_ids=positions.to(model.device), use_cache=True)
        cache = first.cache
        cache.batch_repeat_interleave(C)  # row b * C + j: prompt b, choice j
        rest_ids, rest_mask = choice_ids.repeat(B, 1), choice_mask.repeat(B, 1)
        rest_pos = mask.sum(-1).repeat_interleave(C).unsqueeze(-1) + torch.arange(width_c)
        rest = model(input_ids=rest_ids.to(model.device), attention_mask=torch.cat([mask.repeat_interleave(C, 0), rest_mask], -1).to(model.device),
                     position_ids=rest_pos.to(model.device), cache=cache, use_cache=True)
        # the first choice token is predicted by the prompt's last position, token t by choice token t - 1
        logits = torch.cat([first.logits[:, -1:].float().repeat_interleave(C, 0), rest.logits[:, :-1].float()], 1)
        picked = torch.log_softmax(logits, -1).gather(-1, rest_ids.to(model.device).unsqueeze(-1)).squeeze(-1)
        out.append((picked * rest_mask.to(model.device)).sum(-1).view(B, C).cpu())
    return torch.cat(out)


@torch.no_grad()
def choice_logprobs_plain(model, tokenizer, prompts: list[str], choices: list[str], max_len: int, batch_size: int) -> torch.Tensor:
    """[examples, choices]: as `choice_logprobs`, one prompt+choice sequence per pair."""
    pairs = [encode_example(tokenizer, p, c, max_len) for p in prompts for c in choices]
    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = {k: v.to(model.device) for k, v in pad_batch(chunk, tokenizer.pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        labels = batch["labels"][:, 1:]
        picked = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        out.append((picked * (labels >= 0)).sum(-1).cpu())
    return torch.cat(out).view(len(prompts), len(choices))


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, max_len: int, batch_size: int) -> list[str]:
    """Greedy answers, one per prompt (left-padded batches, stopped at EOS or a blank line)."""
    answers = []
    for start in range(0, len(prompts), batch_size):
        encoded = [encode_example(tokenizer, p, None, max_len - max_new_tokens)[0] for p in prompts[start : start + batch_size]]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(encoded):
            ids[i, width - len(e) :] = torch.tensor(e)
            mask[i, width - len(e) :] = 1
        out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        for row in out[:, width:].cpu():
            answers.append(tokenizer.decode(row, skip_special_tokens=True).split("\n\n")[0].strip())
    return answers


def predict(model, tokenizer, tests: dict[str, list[Example]], meta: dict, cfg, max_len: int) -> dict[str, list[str]]:
    """{task: one answer per test example}: the most likely label, or the greedy generation."""
    model.eval()
    answers = {}
    for task, examples in tqdm(tests.items(), desc="evaluate", leave=False, disable=not sys.stderr.isatty()):
        choices, prompts = meta[task]["choices"], [e.prompt for e in examples]
        if choices:
            lp = choice_logprobs(model, tokenizer, prompts, choices, max_len, cfg.batch_size)
            answers[task] = [choices[i] for i in lp.argmax(-1).tolist()]
        else:
            answers[task] = generate(model, tokenizer, prompts, cfg.max_new_tokens, max_len, cfg.batch_size)
    return answers


def scores(answers: dict[str, list[str]], tests: dict[str, list[Example]], meta: dict, cfg) -> dict:
    """{task: {metric: value, "n": items}} of `answers` against the test examples."""
    results = {}
    for task, pred in answers.items():
        info, gold = meta[task], [e.answer for e in tests[task]]
        results[task] = {k: round(v, 4) for k, v in score(info["metric"], pred, gold, info["choices"], cfg.numeric_tolerance).items()}
        results[task]["n"] = len(gold)
    return results


def evaluate_model(model, tokenizer, tests: dict[str, list[Example]], meta: dict, cfg, max_len: int) -> dict:
    """{task: {metric: value}} on the test examples."""
    return scores(predict(model, tokenizer, tests, meta, cfg, max_len), tests, meta, cfg)


@torch.no_grad()
def routing(moe, tokenizer, tests: dict[str, list[Example]], max_len: int, batch_size: int) -> dict:
    """{task: [layer][expert] share of top-k assignments}, over prompt and answer tokens."""
    table = {}
    k, num_experts = moe.config.num_experts_per_tok, moe.config.num_local_experts
    for task, examples in tests.items():
        counts_LE = torch.zeros(moe.config.num_hidden_layers, num_experts)
        for start in range(0, len(examples), batch_size):
            pairs = [encode_example(tokenizer, e.prompt, e.answer, max_len) for e in examples[start : start + batch_size]]
            batch = {k_: v.to(moe.device) for k_, v in pad_batch(pairs, tokenizer.pad_token_id).items()}
            out = moe(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
            keep_T = batch["attention_mask"].reshape(-1).bool()
            for layer, logits_TE in enumerate(out.router_logits):
                ids_TK = logits_TE[keep_T].topk(k, dim=-1).indices.cpu()
                counts_LE[layer] += torch.bincount(ids_TK.reshape(-1), minlength=num_experts).float()
        table[task] = (counts_LE / counts_LE.sum(-1, keepdim=True).clamp_min(1)).tolist()
    return table


def heat_map(table: dict, expert_names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(table)
    layers = len(next(iter(table.values())))
    fig, axes = plt.subplots(1, layers + 1, figsize=(2.2 * (layers + 1) + 1, 0.45 * len(tasks) + 1.6), sharey=True)
    panels = [(f"layer {i}", [table[t][i] for t in tasks]) for i in range(layers)]
    panels.append(("mean", [torch.tensor(table[t]).mean(0).tolist() for t in tasks]))
    for ax, (title, grid) in zip(axes, panels):
        image = ax.imshow(grid, vmin=0, vmax=1, cmap=PALETTE, aspect="auto")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(expert_names)), expert_names, rotation=45, fontsize=8)
        ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v < 0.5 else "black")
    fig.colorbar(image, ax=axes, shrink=0.8, label="share of top-k assignments")
    fig.suptitle("Which expert each task's tokens are routed to")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def workloads(model, batch: int, seq_len: int, decode_tokens: int = 16) -> dict:
    """The timed workloads on random tokens, {name: (function, tokens it processes)}: a training
    step, a prefill and a greedy decode of `decode_tokens` after a quarter-length prompt."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def train_step():
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def prefill():
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)

    prompt = ids[:, : max(1, seq_len // 4)]

    def decode():
        model.eval()
        with torch.no_grad():
            model.generate(input_ids=prompt, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, do_sample=False,
                           pad_token_id=0, eos_token_id=None)

    return {"train": (train_step, ids.numel()), "prefill": (prefill, ids.numel()), "decode": (decode, batch * decode_tokens)}


def interleaved_tokens_per_s(runs: dict, repeats: int) -> dict:
    """{row: {f"{workload}_tok_s": tokens/s}} for `runs` = {row: workloads(...)}: the median of
    `repeats` timings after one warm-up round, every row's workloads run once in each round, in
    a fresh (seeded) random order, so that the drift of a shared host falls on all rows alike
    and their ratios hold. (In a fixed order each workload runs behind the same one every
    round, and that alone can move its median by a few percent on a CPU.)"""
    seconds = {row: {name: [] for name in w} for row, w in runs.items()}
    calls = [(row, name) for row, w in runs.items() for name in w]
    order = random.Random(0)
    for repeat in range(repeats + 1):
        order.shuffle(calls)
        for row, name in calls:
            fn = runs[row][name][0]
            t0 = time.perf_counter()
            fn()
            if repeat:
                seconds[row][name].append(time.perf_counter() - t0)
    return {row: {f"{name}_tok_s": round(tokens / statistics.median(seconds[row][name])) for name, (_, tokens) in w.items()}
            for row, w in runs.items()}


def throughput_table(moe_dir: Path, dense_dir: Path | None, cfg, repeats: int = 25) -> dict:
    """{row name: tokens/s numbers, or the reason the row could not run}. 25 rounds take about
    15 s of the tiny recipe on 2 cores; with 7, two runs of the same table differed by 4-7% in
    a ratio."""
    rows, runs = {}, {}
    for impl in ("eager", "finteam"):
        name = f"team, {impl} experts"
        why = models.experts_available(impl)
        if why:
            rows[name] = {"skipped": why}
            continue
        moe = load_model(moe_dir)
        models.use_experts(moe, impl)
        rows[name], runs[name] = None, workloads(moe, cfg.throughput_batch, cfg.throughput_seq_len)
    if dense_dir is not None:
        name = "dense (same active size)"
        rows[name], runs[name] = None, workloads(load_model(dense_dir), cfg.throughput_batch, cfg.throughput_seq_len)
    rows.update(interleaved_tokens_per_s(runs, repeats))
    return rows
