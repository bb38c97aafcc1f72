"""The CUDA sources compile and the CUDA build configures, even on machines without a GPU
or a CUDA build of torch.

The extension built here links the CPU torch, so its CUDA half is never compiled by the
regular build; these checks keep it from rotting: every csrc/*.cu through nvcc for Hopper,
the torch glue that is compiled only with CUDA through the host compiler's syntax check, and
CMakeLists.txt configured for CUDA against a stand-in for a CUDA torch (below).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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


# --------------------------------------------------------------------------- the CMake build
#
# The installed torch is usually a CPU wheel, whose TorchConfig.cmake never reads CUDA. A CUDA
# wheel's differs in what it adds: it includes torch's own public/cuda.cmake (shipped in every
# wheel) and appends ${CUDA_NVRTC_LIB} to TORCH_LIBRARIES. The stand-in below does just that
# with the installed torch's files, so our CMakeLists is configured for CUDA the way it is on
# a GPU machine: nvcc found and checked, the arch list turned into -gencode flags, the target
# generated. CUDA_NVRTC_LIB is NOTFOUND as in pip's nvidia-cuda-nvrtc layout (libnvrtc.so.13,
# no libnvrtc.so), which is what stopped the build that linked ${TORCH_LIBRARIES}.

FAKE_CUDA_TORCH = """\
set(_torch_cmake "{torch_cmake}")
get_filename_component(TORCH_INSTALL_PREFIX "${{_torch_cmake}}/../.." ABSOLUTE)
include("${{_torch_cmake}}/Caffe2/public/utils.cmake")
list(APPEND CMAKE_MODULE_PATH "${{_torch_cmake}}/Caffe2")
include("${{_torch_cmake}}/Caffe2/public/cuda.cmake")
add_library(torch SHARED IMPORTED)
set_target_properties(torch PROPERTIES
  IMPORTED_LOCATION "${{TORCH_INSTALL_PREFIX}}/lib/libtorch.so"
  INTERFACE_INCLUDE_DIRECTORIES "${{TORCH_INSTALL_PREFIX}}/include"
  INTERFACE_LINK_LIBRARIES torch::cudart)
set(TORCH_LIBRARIES torch ${{CUDA_NVRTC_LIB}})
set(Torch_FOUND TRUE)
"""


def _configure(tmp_path, source: Path, env_arch: str | None, nvidia_smi: str | None):
    """Configure `source` for CUDA against the stand-in CUDA torch; returns (rc, log, build dir)."""
    nvcc = _nvcc()
    cuda_include = _cuda_include(nvcc) if nvcc else None
    cmake = shutil.which("cmake")
    if cuda_include is None or cmake is None or shutil.which("ninja") is None:
        pytest.skip("needs the CUDA toolkit, cmake and ninja")
    cuda_home = cuda_include.parent
    nvcc = str(cuda_home / "bin" / "nvcc")  # the toolkit's own, not a wrapper on PATH
    torch = pytest.importorskip("torch")
    pybind11 = pytest.importorskip("pybind11")
    torch_dir = tmp_path / "fake_cuda_torch"
    torch_dir.mkdir()
    (torch_dir / "TorchConfig.cmake").write_text(FAKE_CUDA_TORCH.format(torch_cmake=torch.utils.cmake_prefix_path))
    # nvidia-smi decides the default arch list: a stand-in pins what this machine's GPU says.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho '{nvidia_smi}'\n" if nvidia_smi else "#!/bin/sh\nexit 9\n")
    smi.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "TORCH_CUDA_ARCH_LIST"}
    env["PATH"] = f"{bin_dir}:{Path(nvcc).parent}:{env.get('PATH', '')}"
    env["CUDA_HOME"] = str(cuda_home)
    if env_arch is not None:
        env["TORCH_CUDA_ARCH_LIST"] = env_arch
    build = tmp_path / "build"
    cmd = [cmake, "-S", str(source), "-B", str(build), "-G", "Ninja", "-DARBITRAGE_FAST_CUDA=ON",
           f"-DTorch_DIR={torch_dir}", f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DPython_EXECUTABLE={sys.executable}",
           f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", "-DCUDA_NVRTC_LIB=CUDA_nvrtc_LIBRARY-NOTFOUND"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    return result.returncode, result.stdout + result.stderr, build


@pytest.mark.slow
@pytest.mark.parametrize("env_arch, nvidia_smi, chosen, archs", [
    ("9.0a", None, "9.0a (TORCH_CUDA_ARCH_LIST from the environment)", ["90a"]),
    (None, "9.0", "9.0a (the visible GPU", ["90a"]),
    (None, None, "8.0;9.0a (no GPU visible", ["80", "90a"]),
], ids=["env", "gpu", "default"])
def test_cuda_build_configures_with_pinned_archs_and_no_nvrtc(tmp_path, env_arch, nvidia_smi, chosen, archs):
    rc, log, build = _configure(tmp_path, ROOT, env_arch, nvidia_smi)
    assert rc == 0, log[-4000:]
    assert "NOTFOUND" not in log, log[-4000:]
    assert f"arbitrage-fast: CUDA architectures {chosen}" in log, log
    ninja = (build / "build.ninja").read_text()
    assert "kv_ops.cu" in ninja and "NOTFOUND" not in ninja
    flags = (build / "CMakeCache.txt").read_text() + ninja
    for arch in archs:
        assert f"arch=compute_{arch},code=sm_{arch}" in flags


@pytest.mark.slow
def test_linking_torch_libraries_fails_where_nvrtc_is_missing(tmp_path):
    """The stand-in reproduces the failure the torch target avoids, so the test above can fail."""
    project = tmp_path / "old_link"
    project.mkdir()
    (project / "main.cpp").write_text("int main() { return 0; }\n")
    (project / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.26)\nproject(old_link LANGUAGES CXX CUDA)\n"
        "find_package(Torch REQUIRED)\nadd_executable(m main.cpp)\n"
        "target_link_libraries(m PRIVATE ${TORCH_LIBRARIES})\n")
    rc, log, _ = _configure(tmp_path, project, "9.0a", None)
    assert rc != 0 and "NOTFOUND" in log, log[-4000:]
