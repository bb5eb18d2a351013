"""The package's layout as its architecture: no import circles, and the kernels stand alone.

- Among the modules of finteam_kernels and finteam, imports (at the top of a module or inside a
  function alike: a circle hidden in a function is still a circle) form no cycle.
- finteam_kernels imports and runs a FinTeamMoE layer, forward and backward, with the pipeline's
  packages (and transformers) unimportable, as in an install of the kernels alone.
- The CPU path never initialises CUDA.
- No kernel source adds floats with atomics (the results would depend on the order of arrival).
"""
import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("finteam_kernels", "finteam")
# What only the pipeline, the benchmarks or finteam_kernels.hf need (pyproject.toml's extras).
NOT_FOR_THE_KERNELS = ("transformers", "datasets", "tokenizers", "safetensors", "matplotlib", "yaml", "tqdm",
                       "pandas", "pytest")


def modules() -> dict[str, str]:
    """module name -> file, for every module of the packages."""
    found = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].replace(os.sep, ".")
                found[rel.removesuffix(".__init__")] = os.path.join(folder, name)
    return found


def imports_of(name: str, path: str, known: dict[str, str]) -> set[str]:
    """The package modules that module `name` imports, wherever in the file."""
    is_package = path.endswith("__init__.py")
    here = name if is_package else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(Path(path).read_text(), path)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = here.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            # `from pkg import module` imports the module; `from module import name` the module
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_among_the_modules():
    known = modules()
    graph = {}
    for name, path in known.items():
        # A package's __init__ gathers its modules' names (the public API): it imports its
        # children, and a child importing `from . import x` goes through it, so edges to a
        # package's own __init__ from inside it are not a circle of the code's design.
        graph[name] = {t for t in imports_of(name, path, known) if not name.startswith(t + ".")}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_kernels_run_without_the_pipelines_packages():
    import torch  # noqa: F401  (the kernels need it: without it, a missing dependency, not a failure)

    script = textwrap.dedent(f"""
        import sys
        BLOCKED = {NOT_FOR_THE_KERNELS!r}
        # None in sys.modules: `import name` raises ModuleNotFoundError, find_spec says absent.
        sys.modules.update(dict.fromkeys(BLOCKED))
        import torch
        import finteam_kernels as fk
        from finteam_kernels import FinTeamMoE, router_aux_loss, update_expert_bias

        torch.manual_seed(0)
        layer = FinTeamMoE(32, 64, 4, 2, backend="auto")
        x = torch.randn(2, 5, 32, requires_grad=True)
        y = layer(x)
        (y.square().mean() + router_aux_loss(layer)).backward()
        update_expert_bias(layer)
        assert y.shape == x.shape and x.grad is not None and torch.isfinite(x.grad).all()
        loaded = sorted(m for m, mod in sys.modules.items() if m.split(".")[0] in BLOCKED and mod is not None)
        assert not loaded, loaded
        try:
            import finteam_kernels.hf
        except ModuleNotFoundError as err:
            assert "transformers" in str(err), err
        else:
            raise AssertionError("finteam_kernels.hf imported without transformers")
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr


def test_the_cpu_path_never_touches_a_gpu_driver():
    # Importing the packages, and a CPU layer's training and inference steps (inside a
    # transformers model too), must never initialise CUDA: on a machine with a GPU that costs
    # seconds and memory on every device, and on one with a broken driver it fails. Every torch
    # call that reaches the driver goes through torch.cuda._lazy_init, which this child records,
    # so the test can fail on a CPU-only torch as well.
    import torch  # noqa: F401
    pytest.importorskip("transformers")

    script = textwrap.dedent("""
        import torch, torch.cuda
        calls = []
        torch.cuda._lazy_init = lambda *a, **k: calls.append("torch.cuda._lazy_init")
        import finteam, finteam_kernels, finteam_kernels.hf
        from finteam_kernels import FinTeamMoE
        from transformers import MixtralConfig, MixtralForCausalLM

        torch.manual_seed(0)
        layer = FinTeamMoE(32, 64, 3, 2)
        x = torch.randn(2, 5, 32, requires_grad=True)
        layer(x).square().mean().backward()
        with torch.no_grad():
            layer.eval()(x[:, :1])
        config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=3,
                               num_experts_per_tok=2, max_position_embeddings=32)
        model = finteam_kernels.hf.patch(MixtralForCausalLM(config))
        assert model.config._experts_implementation == "finteam"
        ids = torch.randint(0, 64, (2, 7))
        model(input_ids=ids, labels=ids).loss.backward()
        assert not calls, calls
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr


# Every atomic in the kernel sources, as (file, the line's code): the integer expert counts only.
ALLOWED_ATOMICS = {
    ("csrc/cuda/topk_gating.cu", "if (ok) atomicAdd(&bins[static_cast<int>(ids[i])], 1);"),
    ("csrc/cuda/topk_gating.cu", "if (bins[e] != 0) atomicAdd(&counts[e], bins[e]);"),
    ("finteam_kernels/ops/router_losses_kernels.py",
     'tl.atomic_add(counts_ptr + lanes, counts, mask=(lanes < E) & (counts > 0), sem="relaxed")'),
    ("finteam_kernels/ops/topk_gating_kernels.py",
     'tl.atomic_add(counts_ptr + lanes, counts, mask=(lanes < E) & (counts > 0), sem="relaxed")'),
}


def test_no_kernel_adds_floats_with_atomics():
    # Float sums by atomics differ from run to run (the order of arrival rounds differently);
    # the kernels reduce in a fixed order instead, and use atomics only for integer counts. A new
    # atomic must be added to ALLOWED_ATOMICS by someone who checked that it counts integers.
    import re

    found = set()
    for folder, suffixes in (("csrc", (".cu", ".cuh", ".cpp", ".h")), ("finteam_kernels", (".py",))):
        for path in sorted(Path(ROOT, folder).rglob("*")):
            if path.suffix not in suffixes:
                continue
            for line in path.read_text().splitlines():
                code = line.split("#" if path.suffix == ".py" else "//")[0].strip()  # comments may name them
                if re.search(r"\batomic(Add|Sub|Max|Min|Exch|CAS)\b|\btl\.atomic_\w+|std::atomic<(float|double)", code):
                    found.add((path.relative_to(ROOT).as_posix(), code))
    assert found == ALLOWED_ATOMICS, f"atomics not in the allowed list: {sorted(found - ALLOWED_ATOMICS)}; " \
                                     f"allowed but gone: {sorted(ALLOWED_ATOMICS - found)}"
