"""A test module that cannot import a package the environment lacks is skipped with one line naming
it and the README's install command, and the other modules still run; under
FINTEAM_REQUIRE_TEST_DEPS=1 (CI) it fails to collect with that line. A missing module of ours
keeps its traceback, always."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def collect(tmp_path, source: str, require_all: bool = False, without_torch: bool = False) -> subprocess.CompletedProcess:
    """Run a tree with this conftest, a module `source` and a module that passes, in a
    checkout-like tree with a helper module (benchmarks/harness.py) that is not on the path;
    `without_torch`: in an interpreter where torch cannot be imported."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "harness.py").write_text("")
    shutil.copy(HERE / "conftest.py", tmp_path / "tests" / "conftest.py")
    (tmp_path / "tests" / "test_needs.py").write_text(source)
    (tmp_path / "tests" / "test_fine.py").write_text("def test_runs():\n    pass\n")
    env = {**os.environ, "FINTEAM_REQUIRE_TEST_DEPS": "1" if require_all else "0"}
    # None in sys.modules: `import torch` raises ModuleNotFoundError, find_spec says absent.
    start = "import sys; sys.modules['torch'] = None; " if without_torch else "import sys; "
    run_pytest = start + "import pytest; sys.exit(pytest.main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", run_pytest, "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                           str(tmp_path / "tests")], capture_output=True, text=True, timeout=300, env=env)


MISSING = [
    ("import no_such_package_4711\n", "ModuleNotFoundError: No module named 'no_such_package_4711'"),
    ("raise ImportError('the finteam pipeline needs transformers')\n", "ImportError: the finteam pipeline needs transformers"),
]


@pytest.mark.parametrize("source, what", MISSING)
def test_a_missing_dependency_skips_its_module_and_the_rest_runs(tmp_path, source, what):
    run = collect(tmp_path, source)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "1 passed, 1 skipped" in out
    assert "1 test modules or tests skipped: a test dependency is missing" in out
    assert f"tests/test_needs.py: {what}" in out and "The README's test command installs them: pip install" in out
    assert "Traceback" not in out


@pytest.mark.parametrize("source, what", MISSING)
def test_ci_fails_on_a_missing_dependency_with_one_line(tmp_path, source, what):
    run = collect(tmp_path, source, require_all=True)
    out = run.stdout + run.stderr
    assert run.returncode != 0
    assert f"test_needs.py: {what}. The README's test command installs every test dependency: pip install" in out
    assert "Traceback" not in out


def test_without_torch_the_modules_that_need_it_are_skipped_and_the_rest_run(tmp_path):
    run = collect(tmp_path, "import torch\n", without_torch=True)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "1 passed, 1 skipped" in out
    # (with torch blocked the error reads "import of torch halted"; uninstalled, "No module named 'torch'")
    assert any(line.startswith("tests/test_needs.py: ModuleNotFoundError:") and "torch" in line
               for line in out.splitlines()), out
    assert "Traceback" not in out


IMPORTED_IN_A_TEST = "def test_needs():\n    import no_such_package_4711\n"


def test_a_test_that_imports_a_missing_dependency_is_skipped_with_one_line(tmp_path):
    run = collect(tmp_path, IMPORTED_IN_A_TEST)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "1 passed, 1 skipped" in out
    assert "tests/test_needs.py::test_needs: ModuleNotFoundError: No module named 'no_such_package_4711'" in out
    assert "Traceback" not in out


def test_ci_fails_a_test_that_imports_a_missing_dependency(tmp_path):
    run = collect(tmp_path, IMPORTED_IN_A_TEST, require_all=True)
    out = run.stdout + run.stderr
    assert run.returncode != 0 and "1 failed, 1 passed" in out, out
    assert "No module named 'no_such_package_4711'. The README's test command installs every test dependency" in out


@pytest.mark.parametrize("module", ["finteam_kernels.no_such_module", "harness.no_such_module"])
def test_a_missing_module_of_ours_keeps_its_traceback(tmp_path, module):
    if module.startswith("finteam_kernels"):
        import torch  # noqa: F401  (importing finteam_kernels imports it: without it, a missing dependency)
    run = collect(tmp_path, f"import {module}\n")
    out = run.stdout + run.stderr
    assert run.returncode != 0
    assert "Traceback" in out and "The README's test command" not in out


def test_the_whole_suite_collects_with_warnings_as_errors():
    """Importing every test module leaves nothing behind that a stricter run (`-W error`, as some
    CI configurations use) turns into an error: an unclosed file read at import time, for one,
    raised a ResourceWarning that crashed pytest after collection."""
    import numpy  # noqa: F401  (without it, importing torch warns, and -W error makes that an error)

    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-W", "error", "-p",
                          "no:cacheprovider", str(HERE)], capture_output=True, text=True, timeout=600,
                         cwd=HERE.parent)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    assert "tests collected" in out and "error" not in out.splitlines()[-1], out[-3000:]
