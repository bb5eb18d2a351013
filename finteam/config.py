"""Recipes: one dataclass per stage, read from YAML with every field checked before any work.

A recipe is a YAML file whose sections mirror the dataclasses below (`data`, `tokenizer`,
`model`, `pretrain`, `assemble`, `instruct`, `evaluate`); a field left out keeps its default.
The named recipes live in `finteam/recipes/` (`tiny`, the default; `smoke`; `llama3-8b`), and
`finteam <stage> --recipe NAME_OR_PATH --set section.field=value` reads one and overrides fields.

Every field declares what it accepts where it is declared (`setting(default, ge=..., gt=...,
le=..., choices=..., check=...)`): `check_fields` walks the recipe and tests each value against
its own declaration, and floats must also be finite. What spans several fields (top_k against
the number of experts, the input files) is checked by `check`. Unknown fields, wrong types, values
out of range and missing input files are errors that name the recipe and the field.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

RECIPES_DIR = Path(__file__).parent / "recipes"
ROLES = ("macro", "micro", "quant")
METRICS = ("classification", "entities", "numeric", "movement")
BASELINES = ("dense", "experts", "merge")


class RecipeError(ValueError):
    """A recipe that cannot run: the message names the recipe, the field and the problem."""


def setting(default=dataclasses.MISSING, *, factory=dataclasses.MISSING, ge=None, gt=None, le=None, choices=None,
            check=None, affects_results: bool = True):
    """A recipe field and what it accepts: bounds `ge` (>=), `gt` (>), `le` (<=) for numbers;
    `choices` (a tuple, or a function that returns one when the set lives elsewhere) for a string
    or each item of a list; `check(value)` returning what was expected, or None when the value is
    fine. `affects_results=False` marks how a run is carried out (device, logging, checkpoint
    cadence) rather than what it computes: changing it never makes a finished stage stale."""
    meta = {k: v for k, v in dict(ge=ge, gt=gt, le=le, choices=choices, check=check).items() if v is not None}
    meta["affects_results"] = affects_results
    return field(default=default, default_factory=factory, metadata=meta)


def _nonempty(value: str) -> str | None:
    return None if value.strip() else "a non-empty string"


def _experts_implementations() -> tuple[str, ...]:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ("finteam", "eager", *ALL_EXPERTS_FUNCTIONS.valid_keys())


@dataclass
class WorldConfig:
    economies: int = setting(4, ge=1, le=8)  # fictional economies (the world names 8), each with a central bank that follows a rule
    companies: int = setting(24, ge=2)  # fictional listed companies spread over the economies (notes compare pairs)
    quarters: int = setting(24, ge=3)  # simulated quarters (each with earnings and a rate decision)
    days_per_quarter: int = setting(21, ge=13)  # trading days per quarter (results on day 4, rate decisions on day 12)
    docs_per_role: int = setting(3000, ge=1)  # documents written per role corpus
    copy_docs: float = setting(0.0, ge=0.0, le=1.0)  # share of micro documents that name a place and a partner twice (text to copy from context)
    examples_per_task: int = setting(500, ge=10)  # instruction examples per task, before the 80/10/10 split


@dataclass
class InstructionSource:
    name: str = ""  # task name as it appears in the results table
    train: str = ""  # conversation JSONL (FinBen `conversations` or OpenAI `messages` form)
    valid: str = ""  # optional; held out for early checks
    test: str = ""  # scored by `evaluate`
    metric: str = setting("classification", choices=METRICS)
    choices: list[str] = field(default_factory=list)  # label set; empty: the answers seen in train
    role: str = setting("", choices=("", *ROLES))  # which role's knowledge the task leans on (for the routing table)


@dataclass
class DataConfig:
    source: str = setting("synthetic", choices=("synthetic", "files"))  # synthetic (the embedded world, offline) | files
    world: WorldConfig = field(default_factory=WorldConfig)
    # source=files: per role, a list of local .txt/.jsonl/.json/.parquet files or folders, or
    # `hf:NAME[:CONFIG][@SPLIT]` for a Hugging Face dataset read through `datasets`.
    corpora: dict[str, list[str]] = field(default_factory=dict)
    text_field: str = setting("text", check=_nonempty)  # the column that holds a document in JSONL/Parquet/HF sources
    instructions: list[InstructionSource] = field(default_factory=list)
    # Instruction files replace the synthetic world's tasks; true keeps both.
    keep_synthetic_tasks: bool = False
    router_prompts: int = setting(64, ge=1)  # documents per role fed through the base model for router init


@dataclass
class TokenizerConfig:
    kind: str = setting("bpe", choices=("bpe", "base"))  # bpe: train a byte-level BPE on the corpora | base: the base model's own
    vocab_size: int = setting(2048, ge=258)  # BPE vocabulary size (kind=bpe): at least the 256 bytes and 2 special tokens


@dataclass
class ModelConfig:
    # A named size (see finteam/model.py: smoke, tiny, llama3-8b) initialised from scratch and
    # trained on the mixed corpora, or a folder holding a transformers Llama checkpoint to start from.
    base: str = setting("tiny", check=_nonempty)
    seq_len: int = setting(128, ge=16)  # tokens per packed training sequence
    gradient_checkpointing: bool = setting(False, affects_results=False)  # recompute activations in backward (large models)


@dataclass
class TrainConfig:
    steps: int = setting(100, ge=1)  # optimizer steps
    batch_size: int = setting(16, ge=1)  # sequences per micro-batch per process
    grad_accum: int = setting(1, ge=1)  # micro-batches per optimizer step
    lr: float = setting(3e-3, gt=0)  # peak learning rate (AdamW)
    min_lr_ratio: float = setting(0.1, ge=0, le=1)  # the cosine decays to lr * min_lr_ratio
    warmup: int = setting(10, ge=0)  # linear warm-up steps
    weight_decay: float = setting(0.1, ge=0)
    grad_clip: float = setting(1.0, ge=0)  # max global grad norm; 0 disables clipping
    save_every: int = setting(50, ge=1, affects_results=False)  # checkpoint every N steps (and on Ctrl-C and at the end)
    log_every: int = setting(10, ge=1, affects_results=False)  # a log line every N steps


@dataclass
class PretrainConfig:
    base: TrainConfig = field(default_factory=TrainConfig)  # the shared base (named sizes only)
    expert: TrainConfig = field(default_factory=TrainConfig)  # each role expert, from the base
    # What trains in each expert: "all" weights, or the "ffn" alone (attention, norms and
    # embeddings stay the base's, so the assembled team with `assemble.shared: base` is exactly
    # expert e wherever its router picks e; averaging attention that moved apart loses the
    # experts' knowledge, docs/pipeline.md).
    expert_trains: str = setting("all", choices=("all", "ffn"))


@dataclass
class AssembleConfig:
    top_k: int = setting(2, ge=1)  # experts per token (at most the team's experts)
    base_expert: bool = False  # also add the base model's FFN as one more expert
    shared: str = setting("average", choices=("average", "base"))  # attention/norms/embeddings: average (of the experts) | base
    router_init: str = setting("hidden", choices=("hidden", "embed", "random"))
    router_scale: float = setting(4.0, gt=0)  # norm of each router row for hidden/embed init (logit sharpness)
    router_aux_loss_coef: float = setting(0.02, ge=0)  # weight of transformers' load-balancing loss in the MiX phase
    # Each role expert's FFN = mean + expert_spread * (its own - mean): 1 keeps the experts as
    # trained, 0 starts the team as exactly the uniform merge (docs/pipeline.md measures both).
    expert_spread: float = setting(1.0, ge=0, le=1)


@dataclass
class MixConfig:
    # Branch-Train-MiX's "MiX" phase: the assembled team trains further on the three corpora
    # mixed (next-token loss plus the router loss), so the averaged layers heal and the router
    # learns before any task is seen. The dense baseline and the uniform merge continue on the
    # same tokens, so the comparison stays compute-matched.
    enabled: bool = True
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class InstructConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    trainable: str = setting("all", choices=("all", "router", "router+attention", "all-but-router"))  # the team's
    max_len: int = setting(192, ge=16)  # longest prompt+answer kept (longer prompts are cut from the left)
    # How answer tokens are averaged into the loss: "example" (each example's answer tokens
    # averaged, then the examples: a one-word label weighs as much as a 12-token entity list)
    # or "token" (every answer token alike, as transformers' own loss does). docs/pipeline.md
    # measures both.
    loss: str = setting("example", choices=("example", "token"))
    # How transformers runs the MoE experts: "finteam" (our kernels) or a transformers name
    # such as "eager". "finteam" needs finteam_kernels.hf.
    experts_implementation: str = setting("finteam", choices=_experts_implementations)
    # The team while it is tuned, and so as it is scored: experts per token (0 keeps
    # assemble.top_k, the MiX phase's) and the weight of transformers' load-balancing loss.
    # docs/pipeline.md measures top-1 without that loss after a top-2 MiX phase.
    top_k: int = setting(0, ge=0)
    router_aux_loss_coef: float = setting(0.02, ge=0)
    # The team's peak tuning rate; 0 tunes it at train.lr, as every other model. The team has
    # three times a dense model's FFN parameters; docs/pipeline.md measures other rates.
    team_lr: float = setting(0.0, ge=0)
    # Multiplies the peak rate of the team's expert FFN weights alone. Each expert's gradient sums
    # only the tokens routed to it (K/E of them), so under AdamW its update carries a shared
    # direction at about sqrt(K/E) of a dense FFN's signal; sqrt(E/K) (1.22 for top-2 of 3)
    # makes up for it. docs/pipeline.md measures it.
    expert_lr_scale: float = setting(1.0, gt=0)

    TEAM_ONLY = ("trainable", "top_k", "router_aux_loss_coef", "team_lr", "expert_lr_scale")

    @classmethod
    def needs(cls, team: bool) -> tuple[str, ...]:
        """The fields a model's tuning reads: the team reads them all, a dense model not those
        above, so that changing one retunes the team only."""
        if team:
            return ("instruct",)
        return tuple(f"instruct.{f.name}" for f in dataclasses.fields(cls) if f.name not in cls.TEAM_ONLY)


@dataclass
class EvaluateConfig:
    max_examples: int = setting(200, ge=1)  # test examples scored per task
    batch_size: int = setting(32, ge=1)
    max_new_tokens: int = setting(24, ge=1)  # generation budget for entity and numeric answers
    numeric_tolerance: float = setting(0.01, ge=0)  # relative tolerance of a numeric exact match
    throughput: bool = True  # measure training/prefill/decode tokens/s, eager vs finteam experts
    throughput_batch: int = setting(8, ge=1)
    throughput_seq_len: int = setting(128, ge=2)
    # Documents a role for the held-out loss table (finteam/heldout.py); 0 skips it.
    heldout_docs: int = setting(48, ge=0)
    # Per role, held-out text in the same forms as `data.corpora` (read with `data.text_field`); a role left out
    # is not scored. Without it, the synthetic world draws fresh documents and real corpora get no table.
    heldout_files: dict[str, list[str]] = field(default_factory=dict)
    baselines: list[str] = setting(factory=lambda: list(BASELINES), choices=BASELINES)


@dataclass
class DistributedConfig:
    # Under torchrun every stage that trains shards with FSDP2 (fully_shard) across processes.
    backend: str = setting("auto", choices=("auto", "nccl", "gloo"), affects_results=False)  # auto: nccl on CUDA, gloo on CPU
    # Instruction tuning of the team: each layer's experts split over groups of this many
    # processes (expert parallelism, see finteam/expert_parallel.py); 1: FSDP2 shards them like the rest.
    # Must divide the team's expert count and the number of processes.
    expert_parallel: int = setting(1, ge=1, affects_results=False)


@dataclass
class Recipe:
    name: str = setting("tiny", check=_nonempty, affects_results=False)
    seed: int = setting(0, ge=0)
    out_dir: str = setting("runs/{name}", check=_nonempty, affects_results=False)  # where every stage writes; {name} is the recipe name
    device: str = setting("auto", choices=("auto", "cpu", "cuda"), affects_results=False)
    # auto: bf16 autocast on CUDA, fp32 on CPU (measured faster) | fp32 | bf16
    precision: str = setting("auto", choices=("auto", "fp32", "bf16"))
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    assemble: AssembleConfig = field(default_factory=AssembleConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    instruct: InstructConfig = field(default_factory=InstructConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir.format(name=self.name))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def recipe_path(name_or_path: str) -> Path:
    """A named recipe (`tiny`) or a YAML path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if path.is_dir():
            raise RecipeError(f"recipe {str(path)!r} is a folder; expected a YAML file")
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist")
        return path
    named = RECIPES_DIR / f"{name_or_path}.yaml"
    if not named.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
        raise RecipeError(f"unknown recipe {name_or_path!r}: expected one of {known} or a .yaml path")
    return named


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (plain
    YAML keeps the last value, so a duplicated field silently overrides the first)."""

    def construct_mapping(self, node, deep=False):
        lines: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in lines:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {lines[key] + 1})", key_node.start_mark)
            lines[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, where: str):
    """YAML text, or a RecipeError naming `where` and, for syntax errors, the line and column."""
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as err:
        mark, start = err.problem_mark, err.context_mark
        at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        began = (f" ({err.context} that began on line {start.line + 1})"
                 if err.problem and start is not None and mark is not None and start.line != mark.line else "")
        raise RecipeError(f"{where}{at}: {err.problem or err.context}{began}") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{where}: not valid YAML ({err})") from None


def load_recipe(name_or_path: str = "tiny", overrides: list[str] | None = None, check_inputs: bool = True) -> Recipe:
    """Read, override (`section.field=value`, the value parsed as YAML) and check a recipe;
    `check_inputs=False` skips the existence of the input files (to read a recipe meant for
    another machine)."""
    path = recipe_path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"recipe {path}: cannot be read ({err})") from None
    raw = parse_yaml(text, f"recipe {path}")
    if raw is None:
        raise RecipeError(f"recipe {path} is empty; a recipe needs at least `name:` (see finteam/recipes/tiny.yaml)")
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path}: expected a mapping at the top level; got {type(raw).__name__}")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set {item!r}: expected section.field=value")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--set {item!r}: {part!r} is not a section")
        node[leaf] = parse_yaml(value, f"--set {item!r}")
    recipe = _build(Recipe, raw, where=str(path), prefix="")
    check(recipe, where=str(path), check_inputs=check_inputs)
    return recipe


def _build(cls, raw, where: str, prefix: str):
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {where}: {prefix.rstrip('.') or 'top level'} must be a mapping; got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, raw)) - names)
    if unknown:
        raise RecipeError(
            f"recipe {where}: unknown field '{prefix}{unknown[0]}'; {cls.__name__} has {', '.join(sorted(names))}"
        )
    kwargs = {key: _convert(hints[key], value, where, prefix + key) for key, value in raw.items()}
    return cls(**kwargs)


def _convert(hint, value, where: str, key: str):
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where, key + ".")
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"recipe {where}: {key} must be a list; got {value!r}")
        (item,) = typing.get_args(hint)
        return [_convert(item, v, where, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"recipe {where}: {key} must be a mapping; got {value!r}")
        _, item = typing.get_args(hint)
        return {str(k): _convert(item, v, where, f"{key}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        raise AssertionError(f"{key}: union fields are not used in recipes")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise RecipeError(f"recipe {where}: {key} must be {hint.__name__}; got {value!r}")
    return value


def expectation(spec: typing.Mapping, value) -> str | None:
    """What a field declared with `spec` (its `setting` metadata) expects, when `value` is not
    that; None when it is."""
    if "choices" in spec:
        allowed = spec["choices"]() if callable(spec["choices"]) else spec["choices"]
        if value not in allowed:
            return "one of " + ", ".join(repr(a) if a == "" else str(a) for a in allowed)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        bounds = [f"{op} {spec[k]}" for k, op in (("ge", ">="), ("gt", ">"), ("le", "<=")) if k in spec]
        inside = spec.get("ge", -math.inf) <= value <= spec.get("le", math.inf) and value > spec.get("gt", -math.inf)
        if not (inside and math.isfinite(value)):
            return " and ".join(bounds + ["finite"] * isinstance(value, float)) or "finite"
    if "check" in spec:
        return spec["check"](value)
    return None


def check_fields(config, where: str, prefix: str = "") -> None:
    """Every field of `config` (a recipe or a section, recursively) against its declaration."""
    for f in dataclasses.fields(config):
        key, value = prefix + f.name, getattr(config, f.name)
        items = [(f"{key}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list) else [(key, value)]
        for name, item in items:
            if dataclasses.is_dataclass(item):
                check_fields(item, where, name + ".")
                continue
            expected = expectation(f.metadata, item)
            if expected is not None:
                raise RecipeError(f"recipe {where}: {name} must be {expected}; got {item!r}")


def check(recipe: Recipe, where: str, check_inputs: bool = True) -> None:
    """Every check that can be made without reading data, so a bad recipe fails before any work."""
    check_fields(recipe, where)
    experts = len(ROLES) + recipe.assemble.base_expert
    if recipe.assemble.top_k > experts:
        raise RecipeError(f"recipe {where}: assemble.top_k must be in 1..{experts} (the experts); got {recipe.assemble.top_k}")
    if recipe.instruct.top_k > experts:
        raise RecipeError(f"recipe {where}: instruct.top_k must be in 0..{experts} (0 keeps assemble.top_k); "
                          f"got {recipe.instruct.top_k}")
    ep = recipe.distributed.expert_parallel
    if experts % ep:
        raise RecipeError(f"recipe {where}: distributed.expert_parallel must be >= 1 and divide the team's {experts} experts "
                          f"({len(ROLES)} roles{' + the base' * recipe.assemble.base_expert}); got {ep}")
    if ep > 1 and recipe.instruct.experts_implementation != "finteam":
        raise RecipeError(f"recipe {where}: distributed.expert_parallel > 1 runs the experts on finteam_kernels, so "
                          f"instruct.experts_implementation must be 'finteam'; got {recipe.instruct.experts_implementation!r}")
    named = is_named_size(recipe.model.base)
    if recipe.tokenizer.kind == "base" and named:
        raise RecipeError(f"recipe {where}: tokenizer.kind 'base' takes the tokenizer of a checkpoint folder, but model.base "
                          f"is the named size {recipe.model.base!r}; use tokenizer.kind 'bpe' or a checkpoint folder")
    data = recipe.data
    if data.source == "files":
        missing_roles = [r for r in ROLES if not data.corpora.get(r)]
        if missing_roles:
            raise RecipeError(f"recipe {where}: data.corpora needs files for roles {', '.join(missing_roles)}")
        if not data.instructions and not data.keep_synthetic_tasks:
            raise RecipeError(f"recipe {where}: data.source is files but data.instructions is empty "
                              "(or set keep_synthetic_tasks to use the synthetic tasks)")
    unknown = sorted(set(recipe.evaluate.heldout_files) - set(ROLES))
    if unknown:
        raise RecipeError(f"recipe {where}: evaluate.heldout_files takes the roles {', '.join(ROLES)}; got {', '.join(unknown)}")
    for i, task in enumerate(data.instructions):
        if not task.name or not task.train or not task.test:
            raise RecipeError(f"recipe {where}: data.instructions[{i}] needs name, train and test")
    for path, key, kind in input_files(recipe) if check_inputs else []:
        problem = _input_problem(Path(path), kind)
        if problem:
            raise RecipeError(f"recipe {where}: {key} names {path!r}, which {problem}")


def is_named_size(base: str) -> bool:
    from .model import SIZES

    return base in SIZES


def _input_problem(path: Path, kind: str) -> str | None:
    """Why `path` cannot serve as an input of `kind` (file, corpus, checkpoint), or None."""
    if kind == "checkpoint":
        from .model import SIZES

        if not (path / "config.json").is_file():
            return (f"is neither a named size ({', '.join(SIZES)}) nor a checkpoint folder (a folder with config.json): "
                    + ("it has no config.json" if path.is_dir() else "it does not exist" if not path.exists() else "it is a file"))
        return None
    if not path.exists():
        return "does not exist"
    if kind == "file":
        if path.is_dir():
            return "is a folder; expected a JSONL file"
        if path.stat().st_size == 0:
            return "is empty"
    return None


def settings_of(recipe: Recipe, needs: typing.Iterable[str] | None = None) -> dict:
    """The fields under each dotted name in `needs` (a section, such as `pretrain.base`, or one
    field; None: the whole recipe) that change what a stage computes, flattened to
    {"pretrain.base.lr": 0.003, ...}: what a stage's fingerprint is made of. Fields declared
    with `affects_results=False` are left out."""
    out: dict = {}

    def walk(value, spec, key):
        if not spec.get("affects_results", True):
            return
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                walk(getattr(value, f.name), f.metadata, f"{key}.{f.name}" if key else f.name)
        else:
            out[key] = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value] \
                if isinstance(value, list) else value

    for name in [""] if needs is None else needs:
        value, spec = recipe, {}
        for part in name.split(".") if name else []:
            spec = {f.name: f for f in dataclasses.fields(value)}[part].metadata
            value = getattr(value, part)
        walk(value, spec, name)
    return out


def check_world(recipe: Recipe, world_size: int) -> None:
    """What needs the number of processes (known under torchrun, not when the recipe is read)."""
    ep = recipe.distributed.expert_parallel
    if world_size % ep:
        raise RecipeError(f"recipe {recipe.name}: distributed.expert_parallel must divide the number of processes "
                          f"(torchrun --nproc_per_node times nodes); expert_parallel is {ep}, got {world_size} process(es)")


def input_files(recipe: Recipe) -> list[tuple[str, str, str]]:
    """(path, recipe field, kind) of every local input the recipe names (hub names excluded);
    kind is `corpus` (a file or a folder), `file` or `checkpoint` (a folder with config.json)."""
    found = []
    if recipe.data.source == "files":
        for role, specs in recipe.data.corpora.items():
            found += [(s, f"data.corpora.{role}", "corpus") for s in specs if not s.startswith("hf:")]
    for role, specs in recipe.evaluate.heldout_files.items():
        found += [(s, f"evaluate.heldout_files.{role}", "corpus") for s in specs if not s.startswith("hf:")]
    for i, task in enumerate(recipe.data.instructions):
        found += [(p, f"data.instructions[{i}].{k}", "file")
                  for k, p in (("train", task.train), ("valid", task.valid), ("test", task.test)) if p]
    if not is_named_size(recipe.model.base):
        found.append((recipe.model.base, "model.base", "checkpoint"))
    return found
