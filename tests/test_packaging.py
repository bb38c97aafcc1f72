"""Packaging: the extension imports from anywhere, and the kernels folder installs only as
`arbitrage_fast.triton_kernels`, never as a top-level `triton_kernels` (Triton and vLLM own it).

Imports run in fresh interpreters so this test session's sys.path cannot hide a problem.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS_INIT = ROOT / "triton_kernels" / "__init__.py"


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def imported_file(module: str, cwd: Path, prelude: str = "") -> str | None:
    """__file__ of `module` imported in a fresh interpreter, or None on ImportError."""
    code = (f"{prelude}\nimport importlib, json\n"
            f"try:\n    m = importlib.import_module({module!r})\nexcept ImportError:\n    m = None\n"
            f"print(json.dumps(getattr(m, '__file__', None)))")
    result = run_python(code, cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def is_our_kernels_package(path: str | None) -> bool:
    if path is None:
        return False
    p = Path(path).resolve()
    editable = p == KERNELS_INIT.resolve()
    installed = p.name == "__init__.py" and p.parent.name == "triton_kernels" and p.parent.parent.name == "arbitrage_fast"
    return editable or installed


def test_extension_imports_outside_the_repo(tmp_path):
    result = run_python("import arbitrage_fast._C as c; print(c.__file__); c.BlockPool(1, [1])", tmp_path)
    assert result.returncode == 0, result.stderr


def test_the_engine_and_server_import_without_the_gguf_package(tmp_path):
    """The GPU image has no `gguf`: only reading a GGUF file may need it, not importing the engine."""
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "__init__.py").write_text("raise ImportError('no gguf package here')\n")
    prelude = f"import sys\nsys.path.insert(0, {str(tmp_path)!r})\n"
    for module in ("arbitrage_fast.engine", "arbitrage_fast.cli", "arbitrage_fast.models.group_quant_linear"):
        result = run_python(prelude + f"import {module}", tmp_path)
        assert result.returncode == 0, f"{module}: {result.stderr[-2000:]}"
    result = run_python(prelude + "import arbitrage_fast.models.gguf_packed", tmp_path)
    assert "no gguf package here" in result.stderr  # the stub is really in the way


@pytest.mark.parametrize("where", ["outside", "repo_root"])
def test_kernels_import_under_the_package(where, tmp_path):
    cwd = tmp_path if where == "outside" else ROOT
    assert is_our_kernels_package(imported_file("arbitrage_fast.triton_kernels", cwd))


def test_kernels_import_from_a_source_checkout_without_install(tmp_path):
    # Drop the editable install's finder and put the checkout first, as PYTHONPATH=. would.
    prelude = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import arbitrage_fast\n"
        f"assert arbitrage_fast.__file__.startswith({str(ROOT)!r})\n"
    )
    assert is_our_kernels_package(imported_file("arbitrage_fast.triton_kernels", tmp_path, prelude))


def test_no_top_level_triton_kernels_from_this_project(tmp_path):
    path = imported_file("triton_kernels", tmp_path)
    assert path is None or not Path(path).resolve().is_relative_to(ROOT), path


def test_distribution_maps_kernels_under_the_package():
    code = (
        "import json, runpy, setuptools\n"
        "captured = {}\n"
        "setuptools.setup = lambda **kw: captured.update(kw)\n"
        "runpy.run_path('setup.py', run_name='__main__')\n"
        "print(json.dumps({'packages': captured['packages'], 'package_dir': captured['package_dir']}))"
    )
    result = run_python(code, ROOT)
    assert result.returncode == 0, result.stderr
    spec = json.loads(result.stdout.strip().splitlines()[-1])
    assert "arbitrage_fast.triton_kernels" in spec["packages"]
    assert spec["package_dir"]["arbitrage_fast.triton_kernels"] == "triton_kernels"
    assert not [p for p in spec["packages"] if p.split(".")[0] != "arbitrage_fast"]


def test_build_requirements_leave_torch_to_the_environment():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requires = " ".join(meta["build-system"]["requires"])
    assert "torch" not in requires and "pybind11" in requires and "cmake" in requires
    assert meta["project"]["name"] == "arbitrage-fast"
    assert meta["project"]["scripts"]["arbitrage-fast"] == "arbitrage_fast.cli:main"


@pytest.mark.slow
def test_wheel_layout(tmp_path):
    """A real (non-editable) wheel built from a copy of the sources: the kernels sit under the
    package, the extension is inside it, and nothing named triton_kernels is top-level."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "build", "*.egg-info", ".*")
    for name in ("arbitrage_fast", "triton_kernels", "csrc"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("setup.py", "pyproject.toml", "CMakeLists.txt"):
        shutil.copy2(ROOT / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(tmp_path), str(src)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    (wheel,) = tmp_path.glob("arbitrage_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "arbitrage_fast/triton_kernels/__init__.py" in names
    assert any(n.startswith("arbitrage_fast/_C.") and n.endswith(".so") for n in names)
    assert not [n for n in names if n.startswith("triton_kernels")]
