"""The README's promises: its Python snippets run, and CI runs its test command verbatim."""
import os
import re
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = Path(ROOT, "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_has_exactly_two_commands_at_the_top():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    commands = [line for line in first_block.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2, commands
    assert commands[0].endswith("finteam run") and commands[1].endswith("pytest -q"), commands


def test_ci_runs_the_readme_test_command():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    test_command = [line for line in first_block.splitlines() if line.endswith("pytest -q")][0]
    ci = Path(ROOT, ".ci", "run").read_text()
    assert test_command in ci.splitlines(), "`.ci/run` must run the README's test command as written"


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(SNIPPETS[index], f"README.md snippet {index}", "exec"), {"__name__": "readme"})


def layout_paths() -> list[str]:
    """The paths the README's layout block names: a path at the start of a line, or several
    separated by commas; an indented line is inside the last folder above it."""
    block = re.search(r"## What is here\n\n```\n(.*?)```", README, re.S).group(1)
    paths, folder = [], ""
    for line in block.splitlines():
        indented = line.startswith("  ")
        names = re.match(r"\s*((?:[\w./<>]+(?:, )?)+)", line).group(1).split(", ")
        for name in names:
            path = (folder if indented else "") + name.strip()
            paths.append(path)
            if not indented and name.endswith("/"):
                folder = name
    return paths


def test_readme_layout_matches_the_tree():
    named = layout_paths()
    missing = [p for p in named if "<" not in p and not os.path.exists(os.path.join(ROOT, p))]
    assert not missing, f"the README's layout names paths that do not exist: {missing}"
    for folder in ("finteam_kernels", "benchmarks"):
        modules = [f"{folder}/{f}" for f in os.listdir(os.path.join(ROOT, folder))
                   if f.endswith(".py") and not f.startswith("_") and not f.startswith("test_")]
        unnamed = [m for m in modules if m not in named]
        assert not unnamed, f"the README's layout does not name {unnamed}"
