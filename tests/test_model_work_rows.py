"""A work item may ask for only its last n rows: a score over a step fed after a long catch-up
reads the step's rows alone, and logits over the vocabulary need not be computed for the rest.
The rows returned must be exactly those a forward over every row returns for the same tokens,
whether the work runs whole or is split over iterations by the token budget."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arbitrage_fast.roles import Role
from arbitrage_fast.runtime.work import ModelWork
from helpers.length_prm import build_policy_folders, policy_engine

TOKENS = [5, 9, 2, 7, 11, 3, 8, 4, 6, 10, 12, 1]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return policy_engine(build_policy_folders(tmp_path_factory.mktemp("rows"), router_seed=3))


@given(n=st.integers(1, 12), start=st.integers(0, 12), length=st.integers(1, 12))
@settings(max_examples=200, deadline=None)
def test_rows_in_counts_the_wanted_rows_of_a_chunk(n, start, length):
    work = ModelWork(Role.TARGET, 0, TOKENS, rows=n)
    end = min(len(TOKENS), start + length)
    wanted = set(range(len(TOKENS) - n, len(TOKENS)))
    assert work.rows_in(start, end) == len(wanted & set(range(start, end)))
    assert work.wanted == n


def test_last_and_all_are_row_counts_too():
    assert ModelWork(Role.DRAFT, 0, TOKENS).wanted == 1
    assert ModelWork(Role.DRAFT, 0, TOKENS, rows="all").wanted == len(TOKENS)


@pytest.mark.parametrize("rows", [0, 13, -1, "some", True, 2.0])
def test_a_row_count_outside_the_fed_tokens_is_refused(rows):
    with pytest.raises(ValueError, match="rows"):
        ModelWork(Role.TARGET, 0, TOKENS, rows=rows)


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("n", [1, 3, len(TOKENS)])
def test_the_last_n_rows_are_those_of_every_row(engine, role, n):
    runner, cache = engine.runners[role], engine.cache
    for seq in (900, 901):
        cache.add_sequence(seq)
    try:
        every = runner.forward_one(900, TOKENS, rows="all")
        tail = runner.forward_one(901, TOKENS, rows=n)
    finally:
        for seq in (900, 901):
            cache.free_sequence(seq)
    assert tail.logits.shape[0] == n and tail.hidden.shape[0] == n
    torch.testing.assert_close(tail.logits, every.logits[-n:], rtol=0, atol=1e-5)
    torch.testing.assert_close(tail.hidden, every.hidden[-n:], rtol=0, atol=1e-5)
    assert tail.logits.argmax(-1).tolist() == every.logits[-n:].argmax(-1).tolist()
    assert engine.kv_stats()["used_pages"] == 0


def test_an_eager_forward_moves_its_inputs_to_the_device_in_one_copy(engine, monkeypatch):
    """Tokens, positions, slots, lengths, query starts, block tables and picked rows of a mixed
    forward (a prefill chunk beside decode rows of other sequences) travel as one tensor: every
    `.to(device)` the forward makes is counted (casts by dtype alone are not transfers)."""
    runner, cache = engine.runners[Role.TARGET], engine.cache
    transfers = []
    real_to = torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        if "device" in kwargs or any(isinstance(a, (torch.device, str)) for a in args):
            transfers.append(tuple(self.shape))
        return real_to(self, *args, **kwargs)

    seqs = (910, 911, 912)
    for seq in seqs:
        cache.add_sequence(seq)
    try:
        for seq in seqs[1:]:
            runner.forward_one(seq, TOKENS[:5])
        works = [ModelWork(Role.TARGET, 910, TOKENS, rows=2), ModelWork(Role.TARGET, 911, [4]),
                 ModelWork(Role.TARGET, 912, [6])]
        starts = [runner.reserve(w.seq_id, len(w.tokens)) for w in works]
        monkeypatch.setattr(torch.Tensor, "to", counting_to)
        outs = runner.run(works, starts)
        monkeypatch.undo()
    finally:
        for seq in seqs:
            cache.free_sequence(seq)
    assert [o.logits.shape[0] for o in outs] == [2, 1, 1]  # the prefill's last two rows, one per decode row
    assert len(transfers) == 1, transfers
    assert engine.kv_stats()["used_pages"] == 0
