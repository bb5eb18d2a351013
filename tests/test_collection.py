"""A test module that cannot import a package the environment lacks fails to collect with one
line naming it and the README's install command; a missing module of ours keeps its traceback."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def collect(tmp_path, source: str) -> str:
    """Collect one test module with this conftest, in a checkout-like tree with a helper module
    (benchmarks/harness.py) that is not on the path."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "harness.py").write_text("")
    shutil.copy(HERE / "conftest.py", tmp_path / "tests" / "conftest.py")
    (tmp_path / "tests" / "test_needs.py").write_text(source)
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "--rootdir", str(tmp_path), str(tmp_path / "tests")], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode != 0
    return run.stdout + run.stderr


@pytest.mark.parametrize("source, what", [
    ("import no_such_package_4711\n", "ModuleNotFoundError: No module named 'no_such_package_4711'"),
    ("raise ImportError('the finteam pipeline needs transformers')\n", "ImportError: the finteam pipeline needs transformers"),
])
def test_a_missing_dependency_is_one_line_with_the_install_command(tmp_path, source, what):
    out = collect(tmp_path, source)
    assert f"test_needs.py: {what}. The README's test command installs every test dependency: pip install" in out
    assert "Traceback" not in out


@pytest.mark.parametrize("module", ["finteam_kernels.no_such_module", "harness.no_such_module"])
def test_a_missing_module_of_ours_keeps_its_traceback(tmp_path, module):
    out = collect(tmp_path, f"import {module}\n")
    assert "Traceback" in out and "The README's test command" not in out
