"""Shared pytest setup: tests marked `gpu` run only where a CUDA device is present, and
Triton kernels run in the interpreter where there is none."""

import os

import pytest
import torch
from hypothesis import settings

# CI replays the same examples every run (a red build names a real bug, not a new draw);
# elsewhere every run explores new ones.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# Must be decided before any module imports triton: the interpreter flag is read at import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """Tiny shapes only lose to OpenMP hand-offs, which stall for long on a small, busy machine."""
    yield from _threads(1)


@pytest.fixture
def two_threads():
    """Kernels whose threading is under test (at::parallel_for splits) need more than one thread."""
    yield from _threads(2)


def _real_gguf(name: str):
    """A real GGUF joined from its PyPI part packages; skips the test without them."""
    from arbitrage_fast.models import gguf_assets

    try:
        return gguf_assets.assemble(name)
    except gguf_assets.MissingPartError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def qwen_draft_gguf():
    """The real Qwen2.5-Coder-0.5B-Instruct GGUF (the `qwen-coder-draft` extra)."""
    return _real_gguf("qwen2.5-coder-0.5b-instruct")


@pytest.fixture(scope="session")
def qwen_target_gguf():
    """The real Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF (the `qwen-coder` extra)."""
    return _real_gguf("qwen2.5-coder-1.5b-instruct-q4_k_m")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(config, items):
    # By marker, not keyword: keywords also hold node names, so a test merely named "gpu" would match.
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in gpu_items:
        item.add_marker(skip)
