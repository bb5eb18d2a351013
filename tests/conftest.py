"""Test setup: seeds are fixed, and one of two sessions runs.

- The CPU suite (`pytest`): Triton kernels run in the interpreter on CPU tensors (the variable
  must be set before any kernel module is imported). Tests marked `cuda` are skipped: without a
  GPU they cannot run, and with one they must not run interpreted (the interpreter copies whole
  storages to the host on every launch, cannot be captured in a CUDA graph, and takes hours
  past 2**31 elements).
- The GPU suite (`FINTEAM_GPU_TESTS=1 pytest`): only the tests marked `cuda`, with Triton
  compiled for the GPU. Without a GPU they are skipped, never failed.
"""
import os

GPU_SESSION = os.environ.get("FINTEAM_GPU_TESTS", "0") == "1"
if GPU_SESSION:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("FINTEAM_GPU_TESTS=1 runs the compiled Triton kernels: unset TRITON_INTERPRET")
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

# torch is imported in the hooks only where it is installed: without it, like any missing test
# dependency, every module that needs it is skipped with one line (below), not an ImportError
# from this file.
INSTALL = "pip install torch==2.13.0 setuptools wheel && pip install --no-build-isolation '.[test]'"
HAVE_TORCH = importlib.util.find_spec("torch") is not None
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Plain `pytest` in a checkout that was never installed: the packages are imported from the
# checkout itself, here and in the scripts the tests start (PYTHONPATH), without the compiled
# library only an install builds (test_ext says so).
if importlib.util.find_spec("finteam_kernels") is None:
    sys.path.insert(0, ROOT)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)


def _ours(module: str) -> bool:
    """A module of this checkout (the packages, the tests' and the benchmarks' helpers): one that
    fails to import is a bug, and keeps its traceback."""
    return module in ("finteam", "finteam_kernels") or any(
        os.path.exists(os.path.join(ROOT, folder, f"{module}.py")) for folder in ("tests", "benchmarks"))


@pytest.fixture(scope="session", autouse=True)
def _temporary_files_in_pytests_folder(tmp_path_factory):
    """Every temporary file the tests make goes under pytest's own folder, which pytest cleans up:
    in this process (tempfile) and in the processes tests start (TMPDIR: torchrun's
    torchelastic_* folders, a README snippet's mkdtemp). torch.compile's cache stays where it
    always is, shared between runs."""
    folder = str(tmp_path_factory.mktemp("tmp"))
    with pytest.MonkeyPatch.context() as mp:
        if HAVE_TORCH and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
            try:
                from torch._inductor.runtime.cache_dir_utils import default_cache_dir
            except ImportError:  # another torch: its cache follows TMPDIR, only slower
                pass
            else:
                mp.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
        mp.setenv("TMPDIR", folder)
        mp.setattr(tempfile, "tempdir", folder)
        yield


@pytest.fixture(autouse=True)
def _seed():
    if HAVE_TORCH:
        import torch

        torch.manual_seed(0)


def pytest_configure(config):
    config.addinivalue_line("markers", "library_only: a GPU test of the CUDA library's own compiled ops")


def pytest_report_header(config):
    if not HAVE_TORCH:
        return f"torch is not installed: the tests that need it are skipped; the README's test command: {INSTALL}"
    import torch

    if GPU_SESSION:
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU: every test is skipped"
        return f"finteam GPU suite (compiled Triton kernels): {gpu}"
    return "finteam CPU suite (Triton interpreted; tests marked cuda run with FINTEAM_GPU_TESTS=1)"


def pytest_collection_modifyitems(config, items):
    if not HAVE_TORCH:
        return
    import torch

    if GPU_SESSION:
        off_gpu = pytest.mark.skip(reason="the GPU suite (FINTEAM_GPU_TESTS=1) runs only the tests marked cuda")
        no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "cuda" not in item.keywords:
                item.add_marker(off_gpu)
            elif not torch.cuda.is_available():
                item.add_marker(no_gpu)
        return
    reason = ("tests marked cuda run in the GPU suite: FINTEAM_GPU_TESTS=1 pytest" if torch.cuda.is_available()
              else "needs a CUDA GPU")
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# Set by .ci/run: there every test dependency must be installed, and a module that cannot import
# one fails to collect instead of being skipped.
REQUIRE_ALL = os.environ.get("FINTEAM_REQUIRE_TEST_DEPS", "0") == "1"
_missing = []  # (module's node id, what is missing): the skipped modules, for the summary


# The report is mended before any hook counts it as an error. (An old-style hook wrapper: the
# new-style `wrapper=True` needs pytest 8, and on an older one this file would not even load.)
@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _mend_missing_dependency(outcome.get_result())


def _mend_missing_dependency(report) -> None:
    """A test module that cannot import a package this environment lacks (the kernels installed
    alone, without the `test` extra, have no transformers or hypothesis) is skipped with one line
    naming what is missing and the install command, and the rest of the suite runs; the summary
    lists every such module. A missing module of this checkout is a bug and keeps its traceback;
    with FINTEAM_REQUIRE_TEST_DEPS=1 (CI) a missing dependency fails the collection."""
    text = str(report.longrepr) if report.failed else ""
    if not text.startswith("ImportError while importing test module"):
        return
    cause = [line[1:].strip() for line in text.splitlines() if line.startswith("E ")][-1:]
    missing = re.search(r"No module named '(\w+)", cause[0]) if cause else None
    if not cause or (missing and _ours(missing.group(1))):
        return
    line = f"{report.nodeid}: {cause[0]}. The README's test command installs every test dependency: {INSTALL}"
    if REQUIRE_ALL:
        report.longrepr = line
        return
    _missing.append((report.nodeid, cause[0]))
    report.outcome = "skipped"
    report.longrepr = (str(report.fspath), 0, line)


# The same for a test that imports a missing package itself, or runs a script that does.
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    error = call.excinfo.value if call.excinfo is not None else None
    if not isinstance(error, ModuleNotFoundError) or not error.name or _ours(error.name.split(".")[0]):
        return
    cause = f"ModuleNotFoundError: No module named '{error.name}'"
    if REQUIRE_ALL:
        report.longrepr = f"{item.nodeid}: {cause}. The README's test command installs every test dependency: {INSTALL}"
        return
    _missing.append((item.nodeid, cause))
    report.outcome = "skipped"
    report.longrepr = (str(item.path), 0, f"{cause}. The README's test command installs every test dependency")


def pytest_terminal_summary(terminalreporter):
    if _missing:
        terminalreporter.write_sep("=", f"{len(_missing)} test modules or tests skipped: a test dependency is missing",
                                   yellow=True)
        for nodeid, cause in _missing:
            terminalreporter.write_line(f"{nodeid}: {cause}")
        terminalreporter.write_line(f"The README's test command installs them: {INSTALL}")
