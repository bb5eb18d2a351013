"""Stage `data`: the three role corpora and the instruction tasks, written under `<run>/data/`.

  corpus/<role>.jsonl              {"text": ...} one document a line
  tasks/{train,valid,test}.jsonl   {"id", "task", "label", "conversations": [...]} (FinBen form)
  tasks.json                       per task: metric, role, label choices

Sources: the embedded synthetic world (`finteam/synthetic.py`, the default, offline), or per role
local .txt/.jsonl/.json/.parquet files and folders or `hf:NAME[:CONFIG][@SPLIT]` datasets read
through `datasets`; instruction tasks from conversation JSONL in the FinBen/PIXIU form
(`conversations`: [{"from": "human"|"agent"|..., "value": ...}]) or the OpenAI form
(`messages`: [{"role": "user"|"assistant"|..., "content": ...}]).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from . import prose
from .checkpoint import write_json, write_jsonl
from .config import ROLES, DataConfig, Recipe
from .progress import log
from .synthetic import World

USER_ROLES = {"human", "user", "system"}
ANSWER_ROLES = {"agent", "gpt", "assistant", "bot", "model"}


@dataclass
class Example:
    """One instruction example: everything before the last answer is the prompt."""

    id: str
    task: str
    prompt: str
    answer: str


def read_jsonl(path: str | Path) -> list[dict]:
    if Path(path).is_dir():
        raise ValueError(f"{path} is a folder; expected a JSONL file (one JSON object a line)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    return rows


def conversation_example(row: dict, task: str, where: str) -> Example:
    """An Example from one row in the FinBen `conversations` or the OpenAI `messages` form.
    Multi-turn prompts keep the earlier turns, each on its own line."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object with a 'conversations' or 'messages' list; got {_short(row)}")
    forms = {"conversations": ("from", "value"), "messages": ("role", "content")}
    form = next((f for f in forms if f in row), None)
    if form is None:
        raise ValueError(f"{where}: expected a 'conversations' (from/value) or 'messages' (role/content) list; "
                         f"got keys {sorted(row)}")
    who, what = forms[form]
    if not isinstance(row[form], list) or not all(isinstance(t, dict) for t in row[form]):
        raise ValueError(f"{where}: '{form}' must be a list of objects with '{who}' and '{what}'; got {_short(row[form])}")
    turns = [(t.get(who), t.get(what)) for t in row[form]]
    if not turns or turns[-1][0] not in ANSWER_ROLES:
        raise ValueError(f"{where}: the last turn must be the answer (one of {sorted(ANSWER_ROLES)}); "
                         f"got {turns[-1][0] if turns else 'no turns'!r}")
    for speaker, text in turns:
        if speaker not in USER_ROLES | ANSWER_ROLES or not isinstance(text, str):
            raise ValueError(f"{where}: a turn needs a known speaker and text; got {speaker!r}: {text!r}")
    prompt = "\n".join(text for _, text in turns[:-1])
    return Example(str(row.get("id", where)), row.get("task", task), prompt, turns[-1][1].strip())


def _short(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


def read_conversations(path: str | Path, task: str = "") -> list[Example]:
    """Every example of a conversation JSONL file (either form; the two may even be mixed)."""
    return [conversation_example(row, task, f"{path}:{i + 1}") for i, row in enumerate(read_jsonl(path))]


def read_texts(spec: str, text_field: str = "text") -> list[str]:
    """Documents from a local file or folder (.txt: one document per blank-line-separated block;
    .jsonl/.json/.parquet: the `text_field` column) or `hf:NAME[:CONFIG][@SPLIT]`."""
    if spec.startswith("hf:"):
        import datasets

        name, _, split = spec[3:].partition("@")
        name, _, config = name.partition(":")
        table = datasets.load_dataset(name, config or None, split=split or "train")
        return _column(table, text_field, spec)
    path = Path(spec)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    docs: list[str] = []
    for file in files:
        if file.suffix == ".txt":
            docs += [block.strip() for block in file.read_text(encoding="utf-8").split("\n\n") if block.strip()]
        elif file.suffix in (".jsonl", ".json", ".parquet"):
            import datasets

            kind = "parquet" if file.suffix == ".parquet" else "json"
            docs += _column(datasets.load_dataset(kind, data_files=str(file), split="train"), text_field, str(file))
        elif not path.is_dir():
            raise ValueError(f"data: {file} is not .txt, .jsonl, .json or .parquet")
    return docs


def _column(table, text_field: str, where: str) -> list[str]:
    if text_field not in table.column_names:
        raise ValueError(f"data: {where} has no column {text_field!r} (data.text_field); columns: {table.column_names}")
    return [t for t in table[text_field] if isinstance(t, str) and t.strip()]


def synthetic(cfg: DataConfig, seed: int) -> tuple[dict[str, list[str]], dict[str, list[dict]], dict]:
    world = World(cfg.world, seed)
    corpora = {role: prose.corpus(world, role, seed) for role in ROLES}
    meta = {name: {"metric": m, "role": role, "choices": choices} for name, (m, role, choices) in prose.TASKS.items()}
    return corpora, prose.tasks(world, seed), meta


def from_files(cfg: DataConfig) -> tuple[dict[str, list[dict]], dict]:
    """Instruction splits and task metadata from the recipe's conversation files."""
    splits: dict[str, list[dict]] = {"train": [], "valid": [], "test": []}
    meta = {}
    for source in cfg.instructions:
        for split in splits:
            path = getattr(source, split)
            for ex in read_conversations(path, source.name) if path else []:
                splits[split].append(as_row(Example(ex.id, source.name, ex.prompt, ex.answer)))
        dropped = drop_overlap(splits, source.name)
        if dropped:
            log(f"data  {source.name}: dropped {dropped} train/valid rows whose text is also in a later split")
        choices = source.choices or sorted({r["label"] for r in splits["train"] if r["task"] == source.name})
        if source.metric in ("entities", "numeric"):
            choices = []
        meta[source.name] = {"metric": source.metric, "role": source.role, "choices": choices}
    return splits, meta


def text_key(prompt: str) -> str:
    """What makes two prompts the same item: the text after the last `Text:` (FinBen prompts
    wrap one post in several instruction wordings), else the whole prompt."""
    head, sep, text = prompt.rpartition("Text:")
    return (text.split("\nAnswer:")[0] if sep else prompt).strip()


def drop_overlap(splits: dict[str, list[dict]], task: str) -> int:
    """Remove from train what valid or test holds, and from valid what test holds (by
    `text_key`), so held-out scores are held out; returns how many rows went."""
    dropped = 0
    later: set[str] = set()
    for split in ("test", "valid", "train"):
        rows = splits[split]
        keep = [r for r in rows if r["task"] != task or text_key(prompt_of(r)) not in later]
        dropped += len(rows) - len(keep)
        splits[split] = keep
        later |= {text_key(prompt_of(r)) for r in keep if r["task"] == task}
    return dropped


def prompt_of(row: dict) -> str:
    return row["conversations"][0]["value"]


def as_row(ex: Example) -> dict:
    return {"id": ex.id, "task": ex.task, "label": ex.answer,
            "conversations": [{"from": "human", "value": ex.prompt}, {"from": "agent", "value": ex.answer}]}


def run(recipe: Recipe, out: Path) -> dict:
    cfg = recipe.data
    seed = recipe.seed
    corpora, splits, meta = {}, {"train": [], "valid": [], "test": []}, {}
    if cfg.source == "synthetic" or cfg.keep_synthetic_tasks:
        corpora, world_splits, world_meta = synthetic(cfg, seed)
        # Instruction files replace the world's tasks unless the recipe keeps both.
        if not cfg.instructions or cfg.keep_synthetic_tasks:
            splits, meta = world_splits, world_meta
    if cfg.source == "files":
        corpora = {role: [d for spec in cfg.corpora[role] for d in read_texts(spec, cfg.text_field)] for role in ROLES}
    if cfg.instructions:
        file_splits, file_meta = from_files(cfg)
        for split, rows in file_splits.items():
            splits[split] += rows
        meta.update(file_meta)
    check_tasks(splits, meta, cfg)
    for role in ROLES:
        if not corpora[role]:
            raise ValueError(f"data: the {role} corpus is empty")
        write_jsonl(out / "corpus" / f"{role}.jsonl", [{"text": t} for t in corpora[role]])
        log(f"data  {role:5s} corpus  {len(corpora[role])} documents")
    for split, rows in splits.items():
        write_jsonl(out / "tasks" / f"{split}.jsonl", rows)
    write_json(out / "tasks.json", meta)
    counts = {split: len(rows) for split, rows in splits.items()}
    log(f"data  tasks {', '.join(meta)}  train/valid/test {counts['train']}/{counts['valid']}/{counts['test']}")
    return {"corpora": {r: len(corpora[r]) for r in ROLES}, "tasks": counts}


def check_tasks(splits: dict[str, list[dict]], meta: dict, cfg: DataConfig) -> None:
    """Every task needs training and test examples; found here, before any training, rather
    than as an empty results table at the end."""
    files = {source.name: source for source in cfg.instructions}
    for task in meta:
        for split in ("train", "test"):
            if not any(r["task"] == task for r in splits[split]):
                source = files.get(task)
                later = " once rows also in valid or test are removed" if split == "train" else ""
                where = (f"{getattr(source, split)!r} holds none{later}" if source
                         else "the synthetic world made too few: raise data.world.examples_per_task")
                raise ValueError(f"data: task {task!r} has no {split} examples ({where})")


def load_corpus(data_dir: Path, role: str) -> list[str]:
    return [row["text"] for row in read_jsonl(data_dir / "corpus" / f"{role}.jsonl")]


def load_tasks(data_dir: Path, split: str) -> list[Example]:
    return read_conversations(data_dir / "tasks" / f"{split}.jsonl")


def load_task_meta(data_dir: Path) -> dict:
    return json.loads((data_dir / "tasks.json").read_text())
