"""Decode batches padded to a CUDA-graph bucket (runtime/batch_graphs.py), on the CPU.

The padded forward is the function a graph captures on the GPU; a runner built with
`padded=True` runs it eagerly here, so the padding and masking are checked without a GPU:
the real rows come out as the unpadded batch's, padded rows write no KV, and buckets are
chosen as documented. (tests/test_batching.py runs whole batched engines through it;
tests/test_batch_graphs_gpu.py checks the captured replays.)

Tolerance. Padding changes no row's arithmetic except through the GEMMs: a BLAS picks its
kernel by the number of rows (on this machine, fp32 products of fewer than 4 rows sum in
another order than those of 4 or more), so the real rows of a padded batch may differ from
the unpadded batch's by a few ulps per layer, never by a row mixed in. The eager varlen forward
also attends with SDPA on the CPU where the padded one uses the fp32 paged reference: the same
sum in another order. Hence rtol = atol = 1e-5 on values of order 1-20, with greedy argmaxes
equal; a padded row leaking into a real one, or a slot off by one, moves values by far more.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from arbitrage_fast import Engine, EngineConfig
from arbitrage_fast.roles import Role
from arbitrage_fast.runtime.batch_graphs import BUCKETS, DecodeBuckets, bucket_for, is_decode_batch
from arbitrage_fast.runtime.cuda_graph import ENV, GraphPool, cuda_graphs_enabled
from arbitrage_fast.runtime.work import ModelWork
from helpers.decode_batches import prefilled_decode_batch
from helpers.length_prm import build_policy_pair
from helpers.tiny_models import build_tiny_lm

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", params=["llama", "mistral-window"])
def engine(request, tmp_path_factory):
    """The batching tests' pair (GQA, two widths), and a sliding-window model whose device-form
    decode takes the masked-gather path instead of the paged one."""
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "llama":
        draft, target = build_policy_pair(root)
    else:
        draft = target = build_tiny_lm(root / "m", "mistral", hidden=32, layers=2, seed=4, sliding_window=6)
    return Engine(EngineConfig(draft=str(draft), target=str(target), kv_pages=256, min_block_size=4))


def _fill_unowned_pages(engine: Engine, seqs: list[int]) -> None:
    """Noise in every page no sequence owns, so that a stray write there shows."""
    owned = {p for seq in seqs for role in Role for p in engine.cache.block_table(seq, int(role))}
    free = [p for p in range(engine.cache.num_pages) if p not in owned]
    engine.cache.arena[free] = torch.randn(len(free), engine.cache.arena.shape[1],
                                           generator=torch.Generator().manual_seed(7))


def _slot_marker(engine: Engine, role: Role, works, starts) -> torch.Tensor:
    """True on every arena element of the real rows' KV slots (all layers, K and V)."""
    cache = engine.cache
    marker = torch.zeros(cache.arena.shape, dtype=torch.bool)
    view = cache.view(int(role))
    marked = torch.as_strided(marker, view.shape, view.stride())
    bs = cache.block_size(int(role))
    for work, start in zip(works, starts):
        slot = int(cache.slot_mapping(work.seq_id, int(role), start, start + 1))
        marked[slot // bs, :, :, slot % bs] = True
    return marker


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("rows", [1, 3, 5, 9])
def test_real_rows_of_a_padded_batch_equal_the_unpadded_batch_and_padding_writes_no_kv(engine, role, rows):
    runner, cache = engine.runners[role], engine.cache
    seqs, works, starts = prefilled_decode_batch(engine, role, rows, seed=rows)
    real = _slot_marker(engine, role, works, starts)
    _fill_unowned_pages(engine, seqs)
    cache.arena[real] = torch.randn(int(real.sum()))  # the slots the forward fills: nothing reads them first
    before, used = cache.arena.clone(), cache.stats()["used_pages"]

    padded = DecodeBuckets(runner, padded=True)
    hidden, logits = padded.run(works, starts)
    assert dict(padded.served) == {bucket_for(rows): 1}
    assert hidden.shape[0] == logits.shape[0] == rows and logits.dtype == torch.float32
    after = cache.arena.clone()
    changed = after != before
    assert not (changed & ~real).any(), "a padded row (or a real one) wrote outside the real rows' slots"
    assert changed[real].all(), "a real row's KV was not written"
    assert cache.stats()["used_pages"] == used

    cache.arena.copy_(before)  # the same function over exactly the real rows: no padding
    unpadded = DecodeBuckets(runner, padded=True, buckets=(rows,))
    torch.testing.assert_close(unpadded.run(works, starts), (hidden, logits), **TOL)
    torch.testing.assert_close(cache.arena, after, **TOL)

    cache.arena.copy_(before)  # the eager varlen forward, what a CPU runner runs
    assert not runner.buckets.padded
    eager = runner.run(works, starts)
    torch.testing.assert_close(torch.cat([o.hidden for o in eager]), hidden, **TOL)
    eager_logits = torch.cat([o.logits for o in eager])
    torch.testing.assert_close(eager_logits, logits, **TOL)
    assert torch.equal(eager_logits.argmax(-1), logits.argmax(-1))
    torch.testing.assert_close(cache.arena, after, **TOL)

    for seq in seqs:
        cache.free_sequence(seq)
    assert cache.stats()["used_pages"] == 0


def test_bucket_choice():
    assert BUCKETS == (1, 2, 4, 8, 16, 32)
    assert [bucket_for(n) for n in (1, 2, 3, 4, 5, 9, 16, 17, 32)] == [1, 2, 4, 4, 8, 16, 16, 32, 32]
    assert bucket_for(33) is None and bucket_for(1000) is None
    assert bucket_for(3, (2, 6)) == 6 and bucket_for(7, (2, 6)) is None
    with pytest.raises(ValueError, match="at least one row"):
        bucket_for(0)


@pytest.mark.parametrize("buckets", [(), (0, 1), (4, 2), (2, 2, 4)])
def test_bad_buckets_are_refused(buckets):
    with pytest.raises(ValueError, match="buckets must be increasing batch sizes"):
        DecodeBuckets(SimpleNamespace(device=torch.device("cpu")), padded=True, buckets=buckets)


def test_only_decode_batches_within_the_largest_bucket_are_padded(engine):
    runner = engine.runners[Role.DRAFT]
    buckets = DecodeBuckets(runner, padded=True)
    decode = [ModelWork(Role.DRAFT, i, [5]) for i in range(3)]
    assert is_decode_batch(decode) and is_decode_batch([ModelWork(Role.DRAFT, 0, [5], rows="all")])
    mixed = decode + [ModelWork(Role.DRAFT, 9, [5, 6])]
    assert not is_decode_batch(mixed) and not is_decode_batch([])
    assert buckets.run(mixed, [0] * 4) is None
    # Past the largest bucket nothing is read from the pool (these sequences do not exist).
    assert buckets.run([ModelWork(Role.DRAFT, i, [5]) for i in range(33)], [0] * 33) is None
    assert not buckets.served and buckets.captured == ()


def test_buckets_follow_the_device_and_the_environment(engine, monkeypatch):
    """Off on the CPU unless asked for; on CUDA on unless ARBITRAGE_FAST_CUDA_GRAPHS=0.
    Nothing here touches a GPU: the pool is created at the first capture."""
    assert not engine.draft.buckets.padded and not engine.target.buckets.padded
    assert engine.graph_buckets() == {"draft": [], "target": []}
    cuda = SimpleNamespace(device=torch.device("cuda"))
    monkeypatch.delenv(ENV, raising=False)
    assert cuda_graphs_enabled(cuda.device) and not cuda_graphs_enabled(torch.device("cpu"))
    on = DecodeBuckets(cuda)
    assert on.padded and on.capturing and on.captured == ()
    assert not DecodeBuckets(cuda, padded=False).padded
    monkeypatch.setenv(ENV, "0")
    assert not cuda_graphs_enabled(cuda.device)
    off = DecodeBuckets(cuda)
    assert not off.padded and not off.capturing
    forced = DecodeBuckets(cuda, padded=True)  # padded but eager: what the GPU tests compare against
    assert forced.padded and not forced.capturing


class _StandInGraph:
    """A CUDA graph's contract on the CPU: replay() reruns what was captured into the very
    tensors the capture returned (the static outputs every replay rewrites)."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.outputs = fn()

    def replay(self) -> None:
        for static, fresh in zip(self.outputs, self.fn()):
            static.copy_(fresh)


def test_the_replay_path_pads_before_capture_and_returns_copies(engine, monkeypatch):
    """The capture-and-replay branch of DecodeBuckets.run with a stand-in graph: the capture
    runs on padded rows only (no KV written), the replay on the filled inputs, and what a
    replay returned survives the next replay of the same bucket."""
    monkeypatch.setattr(GraphPool, "capture", lambda self, fn, what: (graph := _StandInGraph(fn), graph.outputs))
    runner, cache = engine.draft, engine.cache
    seqs, works, starts = prefilled_decode_batch(engine, Role.DRAFT, 3, seed=11)
    before = cache.arena.clone()
    replayed = DecodeBuckets(runner, padded=True)
    replayed.capturing = True  # as on CUDA
    hidden, logits = replayed.run(works, starts)
    assert replayed.captured == (4,)
    after = cache.arena.clone()
    cache.arena.copy_(before)
    eager = DecodeBuckets(runner, padded=True).run(works, starts)
    assert torch.equal(hidden, eager[0]) and torch.equal(logits, eager[1])
    assert torch.equal(cache.arena, after), "the capture wrote KV, or the replay wrote other slots"
    kept = logits.clone()
    replayed.run(works, [runner.reserve(seq, 1) for seq in seqs])  # next position, same bucket
    assert torch.equal(logits, kept) and dict(replayed.served) == {4: 2}
    for seq in seqs:
        cache.free_sequence(seq)
    assert cache.stats()["used_pages"] == 0


def test_a_failed_capture_falls_back_to_eager(engine, monkeypatch):
    monkeypatch.setattr(GraphPool, "capture", lambda self, fn, what: None)
    runner = engine.draft
    seqs, works, starts = prefilled_decode_batch(engine, Role.DRAFT, 2, seed=12)
    buckets = DecodeBuckets(runner, padded=True)
    buckets.capturing = True
    assert buckets.run(works, starts) is None
    assert not buckets.padded and not buckets.capturing and buckets.captured == ()
    for seq in seqs:
        engine.cache.free_sequence(seq)
