"""`finteam <stage>`: one subcommand per stage, and `finteam run` for the whole pipeline.

    finteam run                           the tiny recipe end to end, then the results table
    finteam run --recipe smoke --seeds 3  another recipe, three seeds (mean and spread)
    finteam data | tokenizer | pretrain | assemble | mix | instruct | evaluate   one stage
    finteam generate --model runs/tiny/seed0/instruct/team/model --prompt "..."
    finteam check --recipe llama3-8b      read and check a recipe, print it, do nothing else
    finteam compare runs/a runs/b:label   the teams of finished runs, paired on the same items

Every command takes --recipe NAME_OR_PATH, --set section.field=value (repeatable) and --force
(rerun finished stages). Under `torchrun --nproc_per_node N finteam ...` training stages shard
with FSDP2 across the N processes. Commands that write take the run folder's lock first, so a
second run into the same folder is turned away with the name of the one that holds it.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
from pathlib import Path

from .config import ROLES, RecipeError, check_world, load_recipe

STAGES = ("data", "tokenizer", "pretrain", "assemble", "mix", "instruct", "evaluate")


def count(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1; got {text!r}")
    return value


def temperature(text: str) -> float:
    """An argparse type: a finite float >= 0 (0 is greedy decoding)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number >= 0 (0: greedy); got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="finteam", description="FinTeamExperts: role experts -> MoE -> instruction tuning -> evaluation")
    sub = ap.add_subparsers(dest="command", metavar="command")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--recipe", default="tiny", help="recipe name (tiny, smoke, llama3-8b) or YAML path (default: tiny)")
    common.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field, e.g. pretrain.expert.steps=20")
    common.add_argument("--force", action="store_true", help="rerun stages that already finished")
    common.add_argument("--seeds", type=count, default=1, help="repeat the training stages with this many seeds")
    sub.add_parser("run", parents=[common], help="every stage, then the results table")
    sub.add_parser("check", parents=[common], help="check a recipe and print it")
    sub.add_parser("data", parents=[common], help="role corpora and instruction tasks")
    sub.add_parser("tokenizer", parents=[common], help="train the byte-level BPE (or take the base's)")
    p = sub.add_parser("pretrain", parents=[common], help="the base, the role experts and the dense baseline")
    p.add_argument("--only", nargs="+", choices=["base", *ROLES, "dense"], help="train only these")
    sub.add_parser("assemble", parents=[common], help="merge the experts into a Mixtral (and the uniform-merge baseline)")
    p = sub.add_parser("mix", parents=[common], help="train the team further on the mixed corpora (dense and merge get the same tokens)")
    p.add_argument("--only", nargs="+", choices=["team", "dense", "merge"], help="train only these")
    p = sub.add_parser("instruct", parents=[common], help="instruction-tune the team and the baselines")
    p.add_argument("--only", nargs="+", choices=["team", "dense", *ROLES, "merge"], help="tune only these")
    sub.add_parser("evaluate", parents=[common], help="score every tuned model, routing, throughput, results table")
    p = sub.add_parser("generate", parents=[common], help="answer prompts with a checkpoint")
    p.add_argument("--model", required=True, help="a checkpoint folder, or team|dense|merge|macro|micro|quant (the tuned model of seed 0)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--file", help="a text file with one prompt a line")
    p.add_argument("--max-new-tokens", type=count, default=48)
    p.add_argument("--temperature", type=temperature, default=0.0, help="0 (default): greedy; above 0: sampled")
    p = sub.add_parser("compare", help="the teams of finished runs, paired on the same test items and seeds")
    p.add_argument("runs", nargs="+", metavar="RUN[:LABEL]", help="run folders (out_dir); the first run's team is the reference")
    return ap


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    _leave_finished_distributed_run(code)
    return code


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["run", *argv]  # `finteam` alone runs the whole pipeline
    args = parser().parse_args(argv)
    command = args.command
    if command == "compare":
        return _compare(args.runs)
    try:
        recipe = load_recipe(args.recipe, args.set)
        if command in ("run", "instruct"):  # the stages that may split experts over processes
            check_world(recipe, int(os.environ.get("WORLD_SIZE", "1")))
        if command == "generate":
            return _generate(args, recipe)
    except RecipeError as err:
        print(f"finteam: {err}", file=sys.stderr)
        return 2
    if command == "check":
        import yaml

        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        return 0
    from .checkpoint import RunLock, RunLocked

    try:
        lock = RunLock(run_folder(recipe.run_dir), " ".join(["finteam", *argv]))
        with lock if _rank() == 0 else contextlib.nullcontext():  # torchrun's ranks are one run
            return _run(command, args, recipe)
    except (RecipeError, RunLocked) as err:
        print(f"finteam {command}: {err}", file=sys.stderr)
        return 2


def _compare(runs: list[str]) -> int:
    from .compare import compare

    try:
        print(compare(runs))
    except (FileNotFoundError, ValueError) as err:
        print(f"finteam {err}", file=sys.stderr)
        return 2
    return 0


def run_folder(run: Path) -> Path:
    """`run`, created, once it is known to be a writable folder (a RecipeError otherwise), so
    that a bad out_dir stops the run before any work. Each process probes with a file of its
    own: torchrun's ranks check the same folder at the same moment, and with one shared name
    a rank found its probe already unlinked by the other."""
    existing = next(p for p in [run, *run.parents] if p.exists() or p == Path(p.anchor))
    if existing.exists() and not existing.is_dir():
        raise RecipeError(f"out_dir {str(run)!r}: {existing} is a file, not a folder")
    try:
        run.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run, prefix=".finteam-write-test-"):
            pass
    except OSError as err:
        raise RecipeError(f"out_dir {str(run)!r} cannot be written ({err.strerror or err})") from None
    return run


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _run(command: str, args, recipe) -> int:
    from .checkpoint import CheckpointError
    from .train import Diverged, Interrupted

    _init_distributed(recipe)
    from . import pipeline

    finished = False
    try:
        if command == "run":
            pipeline.run_all(recipe, args.seeds, args.force)
        elif command in ("data", "tokenizer"):
            pipeline.run_data(recipe, args.force)
        else:
            for k in range(args.seeds):
                if command == "pretrain":
                    pipeline.run_pretrain(recipe, k, args.force, args.only)
                elif command == "assemble":
                    pipeline.run_assemble(recipe, k, args.force)
                elif command == "mix":
                    pipeline.run_mix(recipe, k, args.force, args.only)
                elif command == "instruct":
                    pipeline.run_instruct(recipe, k, args.force, args.only)
                elif command == "evaluate":
                    pipeline.run_evaluate(recipe, k, args.force)
            if command == "evaluate":
                print(pipeline.run_report(recipe, list(range(args.seeds))))
        finished = True
    except Interrupted as stop:
        print(f"\nfinteam: {stop.message}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"\nfinteam {command}: interrupted; finished stages are kept, rerun to go on", file=sys.stderr)
        return 130
    except (Diverged, CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"finteam {command}: {err}", file=sys.stderr)
        return 1
    finally:
        _end_distributed(finished)
    return 0


def _init_distributed(recipe) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch
    import torch.distributed as dist

    backend = recipe.distributed.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and recipe.device != "cpu" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)


def _end_distributed(finished: bool) -> None:
    # Left to the interpreter's exit, gloo's worker threads can outlive the objects they use and
    # abort the process. A finished run waits for every rank, then leaves without that exit
    # (_leave_finished_distributed_run). After an error the group is destroyed here, with no
    # barrier: the other ranks may never arrive (torchrun ends them when one rank fails).
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()  # and the group is left to _leave_finished_distributed_run
            return
        dist.destroy_process_group()


def _leave_finished_distributed_run(code: int) -> None:
    """A rank of a finished distributed run ends here, past its lock and its last output, without
    the interpreter's teardown: even after a barrier and destroy_process_group, one rank of a
    finished 2-process run aborted in teardown ("terminate called without an active exception",
    gloo's threads) about once in ten CI runs. Everything it wrote is saved and closed by now."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _generate(args, recipe) -> int:
    from .generate import answer
    from .pipeline import Paths

    path = Path(args.model)
    if not path.exists():
        path = Paths(recipe.run_dir).tuned(0, args.model) / "model"
    if not (path / "config.json").is_file():
        print(f"finteam generate: --model {args.model!r} is neither a checkpoint folder nor a tuned model of {recipe.run_dir}",
              file=sys.stderr)
        return 2
    for i, prompt in enumerate(args.prompt, 1):
        if not prompt.strip():
            print(f"finteam generate: --prompt number {i} is empty", file=sys.stderr)
            return 2
    prompts = list(args.prompt)
    if args.file:
        file = Path(args.file)
        problem = ("does not exist" if not file.exists() else "is a folder, not a text file" if file.is_dir() else None)
        if problem is None:
            try:
                lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
            except (OSError, UnicodeDecodeError) as err:
                lines, problem = [], f"cannot be read ({err})"
            prompts += lines
            if not lines and problem is None:
                problem = "holds no prompt (one a line; blank lines are skipped)"
        if problem:
            print(f"finteam generate: --file {args.file!r} {problem}", file=sys.stderr)
            return 2
    if not prompts:
        print("finteam generate: give --prompt or --file", file=sys.stderr)
        return 2
    experts = recipe.instruct.experts_implementation
    from .model import experts_available

    try:
        replies = answer(path, prompts, args.max_new_tokens, args.temperature,
                         experts if experts_available(experts) is None else "eager")
    except ValueError as err:  # a checkpoint that fails its checksums, a budget past the positions
        print(f"finteam generate: {err}", file=sys.stderr)
        return 1
    for prompt, reply in zip(prompts, replies):
        print(f"{prompt}\n>>> {reply}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
