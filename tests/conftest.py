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

import pytest  # noqa: E402

# torch is imported in the hooks, after pytest_configure has checked that it is there: a bare
# interpreter gets the install command, not an ImportError from this file.
INSTALL = "pip install torch==2.13.0 setuptools wheel && pip install --no-build-isolation '.[test]'"
NOT_INSTALLED = f"the tests need torch and this package installed, as the README's test command does: {INSTALL}"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ours(module: str) -> bool:
    """A module of this checkout (the packages, the tests' and the benchmarks' helpers): one that
    fails to import is a bug, and keeps its traceback."""
    return module in ("finteam", "finteam_kernels") or any(
        os.path.exists(os.path.join(ROOT, folder, f"{module}.py")) for folder in ("tests", "benchmarks"))


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)


def pytest_configure(config):
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("finteam_kernels") is None:
        pytest.exit(NOT_INSTALLED, returncode=4)
    config.addinivalue_line("markers", "library_only: a GPU test of the CUDA library's own compiled ops")


def pytest_report_header(config):
    import torch

    if GPU_SESSION:
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU: every test is skipped"
        return f"finteam GPU suite (compiled Triton kernels): {gpu}"
    return "finteam CPU suite (Triton interpreted; tests marked cuda run with FINTEAM_GPU_TESTS=1)"


def pytest_collection_modifyitems(config, items):
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


def pytest_collectreport(report):
    """A test module that cannot import what it needs (the kernels installed alone, without the
    `test` extra, have no transformers or hypothesis) fails to collect with one line naming what
    is missing and the install command, not an import traceback."""
    text = str(report.longrepr) if report.failed else ""
    if not text.startswith("ImportError while importing test module"):
        return
    cause = [line[1:].strip() for line in text.splitlines() if line.startswith("E ")][-1:]
    missing = re.search(r"No module named '(\w+)", cause[0]) if cause else None
    if not cause or (missing and _ours(missing.group(1))):
        return
    report.longrepr = f"{report.nodeid}: {cause[0]}. The README's test command installs every test dependency: {INSTALL}"
