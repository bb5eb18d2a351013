"""Recipes: one dataclass per stage, read from YAML with every field checked before any work.

A recipe is a YAML file whose sections mirror the dataclasses below (`data`, `tokenizer`,
`model`, `pretrain`, `assemble`, `instruct`, `evaluate`); a field left out keeps its default.
The named recipes live in `finteam/recipes/` (`tiny`, the default; `smoke`; `llama3-8b`), and
`finteam <stage> --recipe NAME_OR_PATH --set section.field=value` reads one and overrides fields.
Unknown fields, wrong types and missing input files are errors that name the recipe and the field.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

RECIPES_DIR = Path(__file__).parent / "recipes"
ROLES = ("macro", "micro", "quant")


class RecipeError(ValueError):
    """A recipe that cannot run: the message names the recipe, the field and the problem."""


@dataclass
class WorldConfig:
    economies: int = 4  # fictional economies, each with a central bank that follows a rule
    companies: int = 24  # fictional listed companies spread over the economies
    quarters: int = 24  # simulated quarters (each with earnings and a rate decision)
    days_per_quarter: int = 21  # trading days per quarter in the price simulation
    docs_per_role: int = 3000  # documents written per role corpus
    examples_per_task: int = 500  # instruction examples per task, before the split


@dataclass
class InstructionSource:
    name: str = ""  # task name as it appears in the results table
    train: str = ""  # conversation JSONL (FinBen `conversations` or OpenAI `messages` form)
    valid: str = ""  # optional; held out for early checks
    test: str = ""  # scored by `evaluate`
    metric: str = "classification"  # classification | entities | numeric | movement
    choices: list[str] = field(default_factory=list)  # label set; empty: the answers seen in train
    role: str = ""  # which role's knowledge the task leans on (for the routing table); may be empty


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic (the embedded world, offline) | files
    world: WorldConfig = field(default_factory=WorldConfig)
    # source=files: per role, a list of local .txt/.jsonl/.json/.parquet files or folders, or
    # `hf:NAME[:CONFIG][@SPLIT]` for a Hugging Face dataset read through `datasets`.
    corpora: dict[str, list[str]] = field(default_factory=dict)
    text_field: str = "text"  # the column that holds a document in JSONL/Parquet/HF sources
    instructions: list[InstructionSource] = field(default_factory=list)
    # Instruction files replace the synthetic world's tasks; true keeps both.
    keep_synthetic_tasks: bool = False
    router_prompts: int = 64  # documents per role fed through the base model for router init


@dataclass
class TokenizerConfig:
    kind: str = "bpe"  # bpe: train a byte-level BPE on the corpora | base: the base model's own
    vocab_size: int = 2048  # BPE vocabulary size (kind=bpe)


@dataclass
class ModelConfig:
    # A named size (see finteam/model.py: smoke, tiny, llama3-8b) initialised from scratch and
    # trained on the mixed corpora, or a path to a transformers Llama checkpoint to start from.
    base: str = "tiny"
    seq_len: int = 128  # tokens per packed training sequence
    gradient_checkpointing: bool = False  # recompute activations in backward (large models)


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps
    batch_size: int = 16  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    warmup: int = 10  # linear warm-up steps
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    save_every: int = 50  # checkpoint every N steps (and on Ctrl-C and at the end)
    log_every: int = 10  # a log line every N steps


@dataclass
class PretrainConfig:
    base: TrainConfig = field(default_factory=TrainConfig)  # the shared base (named sizes only)
    expert: TrainConfig = field(default_factory=TrainConfig)  # each role expert, from the base


@dataclass
class AssembleConfig:
    top_k: int = 2  # experts per token
    base_expert: bool = False  # also add the base model's FFN as one more expert
    shared: str = "average"  # attention/norms/embeddings: average (of the experts) | base
    router_init: str = "hidden"  # hidden | embed | random
    router_scale: float = 4.0  # norm of each router row for hidden/embed init (logit sharpness)
    router_aux_loss_coef: float = 0.02  # weight of transformers' load-balancing loss


@dataclass
class InstructConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    trainable: str = "all"  # all | router | router+attention
    max_len: int = 192  # longest prompt+answer kept (longer prompts are cut from the left)
    # How transformers runs the MoE experts: "finteam" (our kernels) or a transformers name
    # such as "eager". "finteam" needs finteam_kernels.hf.
    experts_implementation: str = "finteam"


@dataclass
class EvaluateConfig:
    max_examples: int = 200  # test examples scored per task
    batch_size: int = 32
    max_new_tokens: int = 24  # generation budget for entity and numeric answers
    numeric_tolerance: float = 0.01  # relative tolerance of a numeric exact match
    throughput: bool = True  # measure training/prefill/decode tokens/s, eager vs finteam experts
    throughput_batch: int = 8
    throughput_seq_len: int = 128
    baselines: list[str] = field(default_factory=lambda: ["dense", "experts", "merge"])


@dataclass
class DistributedConfig:
    # Under torchrun every stage that trains shards with FSDP2 (fully_shard) across processes.
    backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU
    # Instruction tuning of the team: each layer's experts split over groups of this many
    # processes (expert parallelism, see finteam/expert_parallel.py); 1: FSDP2 shards them like the rest.
    # Must divide the team's expert count and the number of processes.
    expert_parallel: int = 1


@dataclass
class Recipe:
    name: str = "tiny"
    seed: int = 0
    out_dir: str = "runs/{name}"  # where every stage writes; {name} is the recipe name
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU: measured faster) | fp32 | bf16
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    assemble: AssembleConfig = field(default_factory=AssembleConfig)
    instruct: InstructConfig = field(default_factory=InstructConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir.format(name=self.name))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "precision": ("auto", "fp32", "bf16"),
    "data.source": ("synthetic", "files"),
    "tokenizer.kind": ("bpe", "base"),
    "assemble.shared": ("average", "base"),
    "assemble.router_init": ("hidden", "embed", "random"),
    "instruct.trainable": ("all", "router", "router+attention"),
    "distributed.backend": ("auto", "nccl", "gloo"),
}
METRICS = ("classification", "entities", "numeric", "movement")


def recipe_path(name_or_path: str) -> Path:
    """A named recipe (`tiny`) or a YAML path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist")
        return path
    named = RECIPES_DIR / f"{name_or_path}.yaml"
    if not named.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
        raise RecipeError(f"unknown recipe {name_or_path!r}: expected one of {known} or a .yaml path")
    return named


def load_recipe(name_or_path: str = "tiny", overrides: list[str] | None = None, check_inputs: bool = True) -> Recipe:
    """Read, override (`section.field=value`, the value parsed as YAML) and check a recipe;
    `check_inputs=False` skips the existence of the input files (to read a recipe meant for
    another machine)."""
    path = recipe_path(name_or_path)
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path}: expected a mapping at the top level; got {type(raw).__name__}")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise RecipeError(f"--set {item!r}: expected section.field=value")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--set {item!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(value)
    recipe = _build(Recipe, raw, where=str(path), prefix="")
    check(recipe, where=str(path), check_inputs=check_inputs)
    return recipe


def _build(cls, raw, where: str, prefix: str):
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {where}: {prefix.rstrip('.') or 'top level'} must be a mapping; got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
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


def check(recipe: Recipe, where: str, check_inputs: bool = True) -> None:
    """Every check that can be made without reading data, so a bad recipe fails before any work."""
    for key, allowed in CHOICES.items():
        value = recipe
        for part in key.split("."):
            value = getattr(value, part)
        if value not in allowed:
            raise RecipeError(f"recipe {where}: {key} must be one of {', '.join(allowed)}; got {value!r}")
    for section, cfg in (
        ("pretrain.base", recipe.pretrain.base),
        ("pretrain.expert", recipe.pretrain.expert),
        ("instruct.train", recipe.instruct.train),
    ):
        for name in ("steps", "batch_size", "grad_accum", "save_every", "log_every"):
            if getattr(cfg, name) < 1:
                raise RecipeError(f"recipe {where}: {section}.{name} must be >= 1; got {getattr(cfg, name)}")
        if cfg.lr <= 0:
            raise RecipeError(f"recipe {where}: {section}.lr must be > 0; got {cfg.lr}")
    experts = len(ROLES) + recipe.assemble.base_expert
    if not 1 <= recipe.assemble.top_k <= experts:
        raise RecipeError(f"recipe {where}: assemble.top_k must be in 1..{experts} (the experts); got {recipe.assemble.top_k}")
    unknown = set(recipe.evaluate.baselines) - {"dense", "experts", "merge"}
    if unknown:
        raise RecipeError(f"recipe {where}: evaluate.baselines may hold dense, experts, merge; got {sorted(unknown)}")
    ep = recipe.distributed.expert_parallel
    if ep < 1 or experts % ep:
        raise RecipeError(f"recipe {where}: distributed.expert_parallel must be >= 1 and divide the team's {experts} experts "
                          f"({len(ROLES)} roles{' + the base' * recipe.assemble.base_expert}); got {ep}")
    if ep > 1 and recipe.instruct.experts_implementation != "finteam":
        raise RecipeError(f"recipe {where}: distributed.expert_parallel > 1 runs the experts on finteam_kernels, so "
                          f"instruct.experts_implementation must be 'finteam'; got {recipe.instruct.experts_implementation!r}")
    if recipe.model.seq_len < 16:
        raise RecipeError(f"recipe {where}: model.seq_len must be >= 16; got {recipe.model.seq_len}")
    data = recipe.data
    if data.source == "files":
        missing_roles = [r for r in ROLES if not data.corpora.get(r)]
        if missing_roles:
            raise RecipeError(f"recipe {where}: data.corpora needs files for roles {', '.join(missing_roles)}")
        if not data.instructions and not data.keep_synthetic_tasks:
            raise RecipeError(f"recipe {where}: data.source is files but data.instructions is empty "
                              "(or set keep_synthetic_tasks to use the synthetic tasks)")
    for i, task in enumerate(data.instructions):
        if not task.name or not task.train or not task.test:
            raise RecipeError(f"recipe {where}: data.instructions[{i}] needs name, train and test")
        if task.metric not in METRICS:
            raise RecipeError(
                f"recipe {where}: data.instructions[{i}].metric must be one of {', '.join(METRICS)}; got {task.metric!r}"
            )
    for path, key in input_files(recipe) if check_inputs else []:
        if not Path(path).exists():
            raise RecipeError(f"recipe {where}: {key} names {path!r}, which does not exist")


def check_world(recipe: Recipe, world_size: int) -> None:
    """What needs the number of processes (known under torchrun, not when the recipe is read)."""
    ep = recipe.distributed.expert_parallel
    if world_size % ep:
        raise RecipeError(f"recipe {recipe.name}: distributed.expert_parallel must divide the number of processes "
                          f"(torchrun --nproc_per_node times nodes); expert_parallel is {ep}, got {world_size} process(es)")


def input_files(recipe: Recipe) -> list[tuple[str, str]]:
    """(path, recipe field) of every local input the recipe names (hub names excluded)."""
    found = []
    if recipe.data.source == "files":
        for role, specs in recipe.data.corpora.items():
            found += [(s, f"data.corpora.{role}") for s in specs if not s.startswith("hf:")]
    for i, task in enumerate(recipe.data.instructions):
        found += [(p, f"data.instructions[{i}].{k}") for k, p in (("train", task.train), ("valid", task.valid), ("test", task.test)) if p]
    base = recipe.model.base
    if "/" in base or base.startswith("."):
        found.append((base, "model.base"))
    return found
