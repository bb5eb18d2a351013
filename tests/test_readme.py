"""The README's promises: its Python snippets run, and CI runs its test command verbatim."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_has_exactly_two_commands_at_the_top():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    commands = [line for line in first_block.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2, commands
    assert commands[0].endswith("finteam run") and commands[1].endswith("pytest -q"), commands


def test_ci_runs_the_readme_test_command():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    test_command = [line for line in first_block.splitlines() if line.endswith("pytest -q")][0]
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert test_command in ci.splitlines(), "`.ci/run` must run the README's test command as written"


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(SNIPPETS[index], f"README.md snippet {index}", "exec"), {"__name__": "readme"})
