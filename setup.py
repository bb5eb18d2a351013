"""Build script: the Python packages, plus the compiled ops in csrc/.

    pip install --no-build-isolation .      (torch installed first: the ops are built against it)

Libraries (loaded with torch.ops.load_library, not Python modules):
  finteam_kernels/_C_cpu*.so   always: csrc/ops.cpp (every schema) + csrc/cpu/*.cpp
  finteam_kernels/_C_cuda*.so  when torch is a CUDA build and nvcc is found, or FINTEAM_FORCE_CUDA=1;
                               FINTEAM_SKIP_CUDA_BUILD=1 skips it. csrc/cuda/*.cu + *.cpp.

Environment: TORCH_CUDA_ARCH_LIST (default "8.0;9.0a"; no GPU is ever queried), MAX_JOBS
(parallel compile jobs), NVCC_THREADS (nvcc --threads), CUDA_HOME (the toolkit folder).

The CPU library is compiled for the x86-64 baseline; its hot loops carry clones for AVX2 and
AVX-512 chosen when it loads, and its bf16 kernels check for AVX512-BF16 at run time, so one
build runs on any x86-64 CPU. A build that fails (no compiler, say) does not fail the install:
the package then runs on its Triton and reference backends, `finteam_kernels/_build_info.json`
records why, and the first op that looks for the extension warns once with that reason.

Each library is also copied next to the sources (`finteam_kernels/` in this checkout), so the
package works whether it is imported from site-packages or from the checkout (`python -m pytest`
puts the checkout first on sys.path).
"""
import glob
import json
import os
import platform
import shutil
import sys
import traceback

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGE = "finteam_kernels"
INFO_FILE = "_build_info.json"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _cuda_reason(torch) -> str | None:
    """None when the CUDA library should be built, else why not."""
    if _flag("FINTEAM_SKIP_CUDA_BUILD"):
        return "skipped (FINTEAM_SKIP_CUDA_BUILD=1)"
    if not _sources("csrc/cuda/*.cu"):
        return "no CUDA sources in csrc/cuda"
    if _flag("FINTEAM_FORCE_CUDA"):
        return None
    if torch.version.cuda is None:
        return "torch is a CPU build (install the CUDA build of torch for the CUDA kernels)"
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        return "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    return None


def _extensions():
    """(extensions, cmdclass, notes): notes maps a library to why it is not built."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as err:
        reason = f"torch was not importable at build time ({err}); install torch first, then `pip install --no-build-isolation .`"
        return [], {}, {"cpu": reason, "cuda": reason}

    openmp = ["-fopenmp"] if platform.system() == "Linux" else []
    cxx = ["-O3", "-g0", "-fno-math-errno", "-Wno-unused-parameter", *openmp]
    exts = [
        cpp_extension.CppExtension(
            f"{PACKAGE}._C_cpu",
            ["csrc/ops.cpp", *_sources("csrc/cpu/*.cpp")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=openmp,
            optional=True,
        )
    ]
    notes = {}
    cuda_reason = _cuda_reason(torch)
    if cuda_reason is None:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-Xptxas=-v"]
        if os.environ.get("NVCC_THREADS"):
            nvcc.append(f"--threads={os.environ['NVCC_THREADS']}")
        exts.append(
            cpp_extension.CUDAExtension(
                f"{PACKAGE}._C_cuda",
                [*_sources("csrc/cuda/*.cu"), *_sources("csrc/cuda/*.cpp")],
                extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc},
                optional=True,
            )
        )
    else:
        notes["cuda"] = cuda_reason

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's builder, except that a library that fails to build is recorded, not fatal, and
        each built library is also copied into the checkout."""

        def build_extension(self, ext):
            kind = ext.name.rsplit("_C_", 1)[1]
            cxx = os.environ.get("CXX", "c++")
            if shutil.which(cxx.split()[0]) is None:
                notes[kind] = f"no C++ compiler found ({cxx!r} is not on PATH: install g++, or set CXX, and reinstall)"
            else:
                try:
                    super().build_extension(ext)
                except Exception as err:  # noqa: BLE001: any failure leaves the package usable without it
                    traceback.print_exc()
                    last_line = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
                    notes[kind] = (f"the {kind} extension failed to build ({last_line}; "
                                   "`pip install -v` shows the compiler's errors)")
            if kind in notes:
                print(f"WARNING: {notes[kind]}; the package will use its Triton/reference backends", file=sys.stderr)
                return
            built = self.get_ext_fullpath(ext.name)
            if not self.inplace and os.path.isdir(os.path.join(ROOT, PACKAGE)):
                shutil.copy2(built, os.path.join(ROOT, PACKAGE, os.path.basename(built)))

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as err:  # noqa: BLE001: e.g. no compiler at all, found before any library builds
                for ext in self.extensions:
                    kind = ext.name.rsplit("_C_", 1)[1]
                    notes.setdefault(kind, f"the {kind} extension could not be built: {err}")
                print(f"WARNING: {err}; the package will use its Triton/reference backends", file=sys.stderr)

        def run(self):
            super().run()
            for folder in {os.path.join(self.build_lib, PACKAGE), os.path.join(ROOT, PACKAGE)}:
                if os.path.isdir(folder):
                    with open(os.path.join(folder, INFO_FILE), "w") as f:
                        json.dump({"torch": torch.__version__, "not_built": notes}, f, indent=1)

    return exts, {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}, notes


ext_modules, cmdclass, _ = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)  # package data: pyproject.toml
