"""The C++ BlockPool against its pure-Python model.

A hypothesis state machine drives both pools with the same random operations (valid and
invalid ones) and, after every step, demands identical answers, identical exceptions and
identical state, and checks the pool's invariants directly on the C++ side: no page leaked,
none double-owned, reference counts equal to the table slots that point at each page.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from arbitrage_fast.kv.reference_pool import KVCacheExhausted, ReferenceBlockPool

_C = pytest.importorskip("arbitrage_fast._C", reason="native extension not built")

POOLS = [pytest.param(_C.BlockPool, id="native"), pytest.param(ReferenceBlockPool, id="reference")]
PICK = st.integers(0, 63)
STRAY = st.integers(0, 9)      # 9: aim at an arbitrary id / index instead of a live one
MIN_STEPS = 10_000


def check_invariants(pool) -> None:
    """Structural invariants, read only through the public API."""
    stats = pool.stats()
    total, free = stats["total_pages"], pool.free_list()
    assert len(free) == len(set(free)) == stats["free_pages"], "a page is twice on the free list"
    assert stats["free_pages"] + stats["used_pages"] == total
    slots: Counter[int] = Counter()
    owners: dict[int, set[int]] = {}
    for seq in pool.sequence_ids():
        for m, bs in enumerate(stats["block_sizes"]):
            table = pool.block_table(seq, m)
            assert len(table) == math.ceil(pool.num_tokens(seq, m) / bs)
            slots.update(table)
            for page in table:
                owners.setdefault(page, set()).add(m)
    for page in range(total):
        assert pool.refcount(page) == slots[page], f"page {page}: refcount != table slots"
        assert (page in free) == (slots[page] == 0), f"page {page} is both free and referenced, or neither"
    assert all(len(models) == 1 for models in owners.values()), "a page is shared across models"
    per_model = Counter(next(iter(models)) for models in owners.values())
    assert stats["pages_per_model"] == [per_model[m] for m in range(len(stats["block_sizes"]))]
    assert stats["num_sequences"] == len(pool.sequence_ids())


class PoolMachine(RuleBasedStateMachine):
    steps = 0

    @initialize(num_pages=st.integers(1, 24), block_sizes=st.lists(st.integers(1, 6), min_size=1, max_size=3))
    def setup(self, num_pages, block_sizes):
        self.native = _C.BlockPool(num_pages, block_sizes)
        self.model = ReferenceBlockPool(num_pages, block_sizes)
        self.both("add_sequence", 0)

    def both(self, method: str, *args):
        outcomes = []
        for pool in (self.native, self.model):
            try:
                outcomes.append(("ok", getattr(pool, method)(*args)))
            except (KeyError, IndexError, ValueError, RuntimeError) as exc:
                outcomes.append(("raised", type(exc)))
        assert outcomes[0] == outcomes[1], f"{method}{args}: native {outcomes[0]} != model {outcomes[1]}"
        PoolMachine.steps += 1
        return outcomes[1]

    # Most operations aim at live sequences and valid models, so the pools spend their time
    # allocating, sharing and exhausting pages; about one in ten aims anywhere, for the errors.
    def seq(self, pick: int, stray: int) -> int:
        if stray == 9:
            return pick % 8
        live = self.model.sequence_ids()
        if not live:
            self.both("add_sequence", pick % 8)
            return pick % 8
        return live[pick % len(live)]

    def model_index(self, pick: int, stray: int) -> int:
        return (-1, self.model.num_models)[pick % 2] if stray == 9 else pick % self.model.num_models

    def tokens(self, seq: int, model: int) -> int:
        try:
            return self.model.num_tokens(seq, model)
        except (KeyError, IndexError):
            return 0

    @rule(pick=PICK)
    def add_sequence(self, pick):
        self.both("add_sequence", pick % 8)

    @rule(pick=PICK, stray=STRAY)
    def free_sequence(self, pick, stray):
        self.both("free_sequence", self.seq(pick, stray))

    @rule(pick=PICK, stray=STRAY, m=PICK, grow=st.integers(-1, 12))
    def extend(self, pick, stray, m, grow):
        seq, model = self.seq(pick, stray), self.model_index(m, stray)
        self.both("extend", seq, model, self.tokens(seq, model) + grow)

    @rule(pick=PICK, stray=STRAY, m=PICK, grow=st.integers(-1, 12))
    def pages_needed(self, pick, stray, m, grow):
        seq, model = self.seq(pick, stray), self.model_index(m, stray)
        self.both("pages_needed", seq, model, self.tokens(seq, model) + grow)

    @rule(pick=PICK, stray=STRAY, m=PICK, drop=st.integers(-1, 12))
    def truncate(self, pick, stray, m, drop):
        seq, model = self.seq(pick, stray), self.model_index(m, stray)
        tokens = self.tokens(seq, model)
        self.both("truncate", seq, model, tokens + 1 if drop < 0 else max(tokens - drop, 0))

    @rule(pick=PICK, stray=STRAY, dst=PICK)
    def fork(self, pick, stray, dst):
        self.both("fork", self.seq(pick, stray), dst % 8)

    @rule(pick=PICK, stray=STRAY, dst=PICK, m=PICK, drop=st.integers(-1, 12))
    def share_prefix(self, pick, stray, dst, m, drop):
        src, model = self.seq(pick, stray), self.model_index(m, stray)
        tokens = self.tokens(src, model)
        self.both("share_prefix", src, self.seq(dst, stray), model, tokens + 1 if drop < 0 else max(tokens - drop, 0))

    @rule(n=st.integers(-1, 30))
    def can_allocate(self, n):
        self.both("can_allocate", n)

    @rule(page=st.integers(-1, 25))
    def refcount(self, page):
        self.both("refcount", page)

    @invariant()
    def same_state_and_sound(self):
        if not hasattr(self, "native"):
            return
        assert self.native.stats() == self.model.stats()
        assert self.native.free_list() == self.model.free_list()
        assert self.native.sequence_ids() == self.model.sequence_ids()
        for seq in self.model.sequence_ids():
            for m in range(self.model.num_models):
                assert self.native.block_table(seq, m) == self.model.block_table(seq, m)
                assert self.native.num_tokens(seq, m) == self.model.num_tokens(seq, m)
        check_invariants(self.native)


def test_native_matches_model_over_random_operations():
    PoolMachine.steps = 0
    run_state_machine_as_test(
        PoolMachine,
        settings=settings(max_examples=300, stateful_step_count=60, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow]),
    )
    assert PoolMachine.steps >= MIN_STEPS, f"only {PoolMachine.steps} operations ran"


# ---------------------------------------------------------------------- unit tests, both pools
@pytest.mark.parametrize("Pool", POOLS)
def test_fresh_pool_allocates_in_order_and_per_model_block_sizes(Pool):
    pool = Pool(10, [4, 2])
    pool.add_sequence(7)
    assert pool.extend(7, 0, 5) == []
    assert pool.block_table(7, 0) == [0, 1]
    pool.extend(7, 1, 5)
    assert pool.block_table(7, 1) == [2, 3, 4]
    assert pool.num_tokens(7, 0) == 5 and pool.num_tokens(7, 1) == 5
    assert pool.stats() == {"total_pages": 10, "free_pages": 5, "used_pages": 5, "pages_per_model": [2, 3],
                            "num_sequences": 1, "block_sizes": [4, 2]}
    check_invariants(pool)


@pytest.mark.parametrize("Pool", POOLS)
def test_fork_shares_pages_and_extend_copies_the_partial_page(Pool):
    pool = Pool(8, [4])
    pool.add_sequence(0)
    pool.extend(0, 0, 6)                        # pages [0, 1], page 1 half full
    pool.fork(0, 1)
    assert pool.block_table(1, 0) == [0, 1]
    assert pool.refcount(0) == pool.refcount(1) == 2
    assert pool.pages_needed(1, 0, 7) == 1      # the copy-on-write page
    assert pool.extend(1, 0, 7) == [(1, 2)]     # writer gets a private copy of page 1
    assert pool.block_table(1, 0) == [0, 2]
    assert pool.block_table(0, 0) == [0, 1]
    assert (pool.refcount(0), pool.refcount(1), pool.refcount(2)) == (2, 1, 1)
    assert pool.extend(0, 0, 7) == []           # page 1 is no longer shared
    check_invariants(pool)


@pytest.mark.parametrize("Pool", POOLS)
def test_no_copy_when_the_next_token_starts_a_new_page(Pool):
    pool = Pool(8, [4])
    pool.add_sequence(0)
    pool.extend(0, 0, 8)
    pool.fork(0, 1)
    assert pool.extend(1, 0, 9) == []
    assert pool.block_table(1, 0) == [0, 1, 2]
    check_invariants(pool)


@pytest.mark.parametrize("Pool", POOLS)
def test_exhaustion_is_all_or_nothing(Pool):
    pool = Pool(4, [2])
    pool.add_sequence(0)
    pool.extend(0, 0, 3)                        # pages [0, 1]
    pool.fork(0, 1)
    before = (pool.stats(), pool.free_list(), pool.block_table(1, 0), pool.num_tokens(1, 0))
    # 2 fresh pages + 1 copy-on-write page needed, 2 free
    with pytest.raises(KVCacheExhausted, match=r"needs 3 pages.*only 2 of 4 are free"):
        pool.extend(1, 0, 7)
    assert (pool.stats(), pool.free_list(), pool.block_table(1, 0), pool.num_tokens(1, 0)) == before
    assert not pool.can_allocate(3) and pool.can_allocate(2)
    with pytest.raises(KVCacheExhausted):
        pool.extend(1, 0, 2**62)                # no overflow in the page arithmetic
    pool.extend(1, 0, 6)                        # 1 fresh + 1 copy fits exactly
    assert pool.stats()["free_pages"] == 0
    check_invariants(pool)


def test_exhaustion_error_is_one_runtime_error_class():
    assert issubclass(_C.KVCacheExhausted, RuntimeError)
    assert KVCacheExhausted is _C.KVCacheExhausted
    from arbitrage_fast.kv import KVCacheExhausted as exported
    assert exported is _C.KVCacheExhausted


@pytest.mark.parametrize("Pool", POOLS)
def test_truncate_and_free_return_pages(Pool):
    pool = Pool(6, [3])
    pool.add_sequence(0)
    pool.extend(0, 0, 9)                        # pages [0, 1, 2]
    pool.truncate(0, 0, 4)                      # keeps ceil(4/3) = 2 pages
    assert pool.block_table(0, 0) == [0, 1] and pool.num_tokens(0, 0) == 4
    assert pool.stats()["free_pages"] == 4
    pool.extend(0, 0, 9)                        # the released page comes back first (LIFO)
    assert pool.block_table(0, 0) == [0, 1, 2]
    pool.truncate(0, 0, 0)
    assert pool.block_table(0, 0) == []
    pool.extend(0, 0, 1)
    pool.free_sequence(0)
    assert not pool.has_sequence(0) and pool.sequence_ids() == []
    assert pool.stats()["free_pages"] == 6
    check_invariants(pool)


@pytest.mark.parametrize("Pool", POOLS)
def test_shared_pages_survive_until_the_last_owner_frees(Pool):
    pool = Pool(4, [2])
    pool.add_sequence(0)
    pool.extend(0, 0, 4)
    pool.fork(0, 1)
    pool.free_sequence(0)
    assert pool.stats()["free_pages"] == 2 and pool.block_table(1, 0) == [0, 1]
    pool.free_sequence(1)
    assert pool.stats()["free_pages"] == 4
    check_invariants(pool)


@pytest.mark.parametrize("Pool", POOLS)
def test_share_prefix_takes_one_models_prefix_and_releases_the_old_pages(Pool):
    pool = Pool(12, [4, 2])
    for seq in (0, 1):
        pool.add_sequence(seq)
    pool.extend(0, 0, 10)                       # model 0: pages [0, 1, 2]
    pool.extend(0, 1, 3)                        # model 1: pages [3, 4]
    pool.extend(1, 0, 5)                        # seq 1's own model-0 pages [5, 6]
    pool.share_prefix(0, 1, 0, 6)               # 6 tokens: pages [0, 1], page 1 partly shared
    assert pool.block_table(1, 0) == [0, 1] and pool.num_tokens(1, 0) == 6
    assert pool.block_table(1, 1) == [] and pool.num_tokens(1, 1) == 0  # the other model untouched
    assert (pool.refcount(0), pool.refcount(1), pool.refcount(2)) == (2, 2, 1)
    assert pool.stats()["free_pages"] == 12 - 5  # seq 1's pages 5 and 6 went back
    assert pool.extend(1, 0, 7) == [(1, 5)]     # writing into the shared partial page copies it (LIFO: 5)
    assert pool.block_table(0, 0) == [0, 1, 2]
    pool.share_prefix(1, 0, 0, 4)               # a full page: nothing to copy on the next write
    assert pool.block_table(0, 0) == [0] and pool.extend(0, 0, 5) == []
    pool.free_sequence(1)
    pool.free_sequence(0)
    assert pool.stats()["free_pages"] == 12
    check_invariants(pool)


@pytest.mark.parametrize("Pool", POOLS)
def test_share_prefix_of_pages_dst_already_holds_keeps_them_alive(Pool):
    pool = Pool(4, [2])
    pool.add_sequence(0)
    pool.extend(0, 0, 4)
    pool.fork(0, 1)                             # both hold [0, 1]
    pool.share_prefix(0, 1, 0, 3)               # re-take what it holds: no page may pass refcount 0
    assert pool.block_table(1, 0) == [0, 1] and pool.free_list() == [3, 2]
    pool.free_sequence(0)
    pool.free_sequence(1)
    check_invariants(pool)


@pytest.mark.parametrize("Pool", POOLS)
def test_errors_are_typed_and_worded(Pool):
    with pytest.raises(ValueError, match="num_pages"):
        Pool(0, [4])
    with pytest.raises(ValueError, match=r"block_sizes\[1\]"):
        Pool(4, [4, 0])
    with pytest.raises(ValueError, match="at least one model"):
        Pool(4, [])
    pool = Pool(4, [2, 2])
    with pytest.raises(KeyError, match="unknown sequence 3"):
        pool.extend(3, 0, 1)
    pool.add_sequence(3)
    with pytest.raises(ValueError, match="already exists"):
        pool.add_sequence(3)
    with pytest.raises(IndexError, match="model index 2"):
        pool.num_tokens(3, 2)
    pool.extend(3, 0, 3)
    with pytest.raises(ValueError, match="use truncate"):
        pool.extend(3, 0, 2)
    with pytest.raises(ValueError, match=r"must be in \[0, 3\]"):
        pool.truncate(3, 0, 4)
    with pytest.raises(ValueError, match="already exists"):
        pool.fork(3, 3)
    with pytest.raises(KeyError):
        pool.fork(9, 10)
    with pytest.raises(ValueError, match="with itself"):
        pool.share_prefix(3, 3, 0, 1)
    pool.add_sequence(4)
    with pytest.raises(ValueError, match=r"share 4 tokens of sequence 3 model 0: must be in \[0, 3\]"):
        pool.share_prefix(3, 4, 0, 4)
    with pytest.raises(KeyError):
        pool.share_prefix(3, 9, 0, 1)
    with pytest.raises(IndexError, match="page 4"):
        pool.refcount(4)
    with pytest.raises(ValueError):
        pool.can_allocate(-1)
