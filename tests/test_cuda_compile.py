"""The CUDA sources compile, even on machines without a GPU or a CUDA build of torch.

The extension built here links the CPU torch, so its CUDA half is never compiled by the
regular build; these checks keep it from rotting: every csrc/*.cu through nvcc for Hopper,
and the torch glue that is compiled only with CUDA through the host compiler's syntax check.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "csrc").glob("*.cu"))
GLUE_FILES = [ROOT / "csrc" / "kv_ops_cuda.cpp", ROOT / "csrc" / "bindings.cpp"]


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    return str(default) if default.is_file() else None


def _cuda_include(nvcc: str) -> Path | None:
    # nvcc may be a wrapper script on PATH, so also look where toolkits usually live.
    for home in (os.environ.get("CUDA_HOME"), Path(nvcc).resolve().parents[1], "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_runtime.h").is_file():
            return Path(home) / "include"
    return None


@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_cu_file_compiles_for_sm90a(source, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
    cmd = [nvcc, "-c", "-std=c++17", "-gencode", "arch=compute_90a,code=sm_90a",
           "-o", str(tmp_path / "kernel.o"), str(source)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("source", GLUE_FILES, ids=lambda p: p.name)
def test_cuda_glue_compiles_against_torch_headers(source, tmp_path):
    nvcc = _nvcc()
    cuda_include = _cuda_include(nvcc) if nvcc else None
    cxx = shutil.which("c++") or shutil.which("g++")
    if cuda_include is None or cxx is None:
        pytest.skip("needs the CUDA toolkit's headers and a host C++ compiler")
    torch = pytest.importorskip("torch")
    pybind11 = pytest.importorskip("pybind11")
    torch_include = Path(torch.__file__).parent / "include"
    # CPU wheels ship the c10/cuda headers but not the one CMake generates for CUDA builds.
    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cmd = [cxx, "-fsyntax-only", "-std=c++20", "-DARBITRAGE_FAST_WITH_CUDA",
           f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
           f"-I{torch_include}", f"-I{tmp_path}", f"-I{cuda_include}", str(source)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
