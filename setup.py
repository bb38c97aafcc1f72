"""Build driver: CMakeLists.txt describes the native extension; this file only runs CMake.

Build without isolation against the torch already installed, as torch extensions do:

    pip install --no-build-isolation -e .

The extension must link the same libtorch that will import it, which an isolated build
environment (a fresh torch download) cannot promise.
Environment:
    ARBITRAGE_FAST_CUDA=0|1   override the CUDA choice (default: the installed torch's build)
    MAX_JOBS=N                parallel compile jobs (default: 2; torch headers need ~1 GB each)
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension CMake builds. Its sources are listed only so that sdists carry them."""

    def __init__(self, name: str) -> None:
        csrc = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").iterdir() if p.is_file())
        super().__init__(
            name,
            sources=[p for p in csrc if p.endswith((".cpp", ".cu"))],
            depends=[p for p in csrc if p.endswith(".h")] + ["CMakeLists.txt"],
        )


def _want_cuda() -> bool:
    import torch

    override = os.environ.get("ARBITRAGE_FAST_CUDA")
    if override is None:
        return torch.version.cuda is not None
    if override.strip().lower() not in {"1", "on", "true", "yes"}:
        return False
    if torch.version.cuda is None:
        raise RuntimeError(
            f"ARBITRAGE_FAST_CUDA={override} but the installed torch {torch.__version__} is a CPU "
            "build, which cannot link CUDA code; install a CUDA torch or unset the variable")
    return True


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11
        import torch

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        # A fixed folder per interpreter keeps rebuilds incremental (editable installs
        # otherwise configure from scratch in a fresh temporary folder every time).
        build_dir = ROOT / "build" / f"cmake-{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = _want_cuda()
        configure = [
            "cmake",
            "-S", str(ROOT),
            "-B", str(build_dir),
            "-G", "Ninja",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DARBITRAGE_FAST_CUDA={'ON' if cuda else 'OFF'}",
            f"-DARBITRAGE_FAST_OUTPUT_DIR={out_dir}",
        ]
        jobs = os.environ.get("MAX_JOBS", "2")
        print(f"arbitrage-fast: building _C (CUDA {'on' if cuda else 'off'}) in {build_dir}")
        subprocess.run(configure, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)


def _packages() -> tuple[list[str], dict[str, str]]:
    """The package plus triton_kernels/ mapped under it (never as top-level triton_kernels:
    Triton and vLLM own that name)."""
    packages = find_packages(include=["arbitrage_fast", "arbitrage_fast.*"])
    package_dir = {}
    if (ROOT / "triton_kernels" / "__init__.py").is_file():
        for sub in ["", *find_packages(where="triton_kernels")]:
            name = "arbitrage_fast.triton_kernels" + (f".{sub}" if sub else "")
            packages.append(name)
            package_dir[name] = "/".join(["triton_kernels", *filter(None, sub.split("."))])
    return packages, package_dir


packages, package_dir = _packages()

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={
        "arbitrage_fast.testbed": ["checkpoints/**/*.safetensors", "checkpoints/**/*.json"],
        "arbitrage_fast.eval": ["data/*.jsonl"],
        "arbitrage_fast.router": ["heads/*/*.json", "heads/*/*.safetensors"],
    },
    ext_modules=[CMakeExtension("arbitrage_fast._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
