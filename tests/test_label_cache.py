"""Router labels kept per problem: a rerun labels nothing twice, and nothing made otherwise mixes in."""
from __future__ import annotations

import json
from dataclasses import fields

import pytest
import torch

from arbitrage_fast import Engine, EngineConfig, SamplingParams
from arbitrage_fast.router.data import RouterDataset, label_problems
from arbitrage_fast.router.label_cache import LabelCache
from helpers.length_prm import LengthPRM, build_policy_pair

SP = SamplingParams(max_new_tokens=24, max_step_tokens=6, ignore_eos=True)
PROMPTS = {"p-0": "We compute 12 + 30 = 42", "p/1": "Let x be the number", "p 2": "Add 7 and 5"}
RUN = {"draft": "d", "target": "t", "max_new_tokens": 24}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    draft, target = build_policy_pair(tmp_path_factory.mktemp("labels"))
    return Engine(EngineConfig(draft=str(draft), target=str(target), prm=LengthPRM(), kv_pages=64, min_block_size=4))


@pytest.fixture
def counted(engine, monkeypatch):
    """The engine, counting the problems it is asked to solve."""
    calls = []
    add = engine.add_request

    def counting(prompt, **kw):
        calls.append(prompt)
        return add(prompt, **kw)

    monkeypatch.setattr(engine, "add_request", counting)
    return engine, calls


def _label(engine, ids, cache):
    return label_problems(engine, [PROMPTS[i] for i in ids], SP, progress=False, ids=ids, cache=cache)


def _same(a: RouterDataset, b: RouterDataset) -> bool:
    pairs = ((getattr(a, f.name), getattr(b, f.name)) for f in fields(a))
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in pairs)


def test_a_rerun_reads_every_problem_from_the_cache(counted, tmp_path):
    engine, calls = counted
    first = _label(engine, ["p-0", "p/1"], LabelCache(tmp_path, RUN))
    assert first.labelled_now == 2 and len(calls) == 2
    assert all(s > 0 for s in first.seconds)
    again = _label(engine, ["p-0", "p/1"], LabelCache(tmp_path, RUN))
    assert again.labelled_now == 0 and len(calls) == 2
    assert _same(first.data, again.data) and again.seconds == first.seconds
    assert not list(tmp_path.glob("*.partial"))


def test_more_problems_label_only_the_new_ones_and_match_a_fresh_run(counted, tmp_path):
    engine, calls = counted
    _label(engine, ["p/1"], LabelCache(tmp_path, RUN))
    grown = _label(engine, ["p-0", "p/1", "p 2"], LabelCache(tmp_path, RUN))
    assert grown.labelled_now == 2 and calls == [PROMPTS["p/1"], PROMPTS["p-0"], PROMPTS["p 2"]]
    fresh = _label(engine, ["p-0", "p/1", "p 2"], None)
    assert _same(grown.data, fresh.data)  # problem numbers follow the requested order, not the cache's
    assert set(grown.data.problem.tolist()) == {0, 1, 2}
    assert torch.allclose(grown.data.advantage, grown.data.target_prm - grown.data.draft_prm)


def test_a_cache_made_with_other_settings_is_refused(tmp_path):
    LabelCache(tmp_path, RUN)
    with pytest.raises(ValueError, match=r"other settings \(differs in \['max_new_tokens'\]\)"):
        LabelCache(tmp_path, {**RUN, "max_new_tokens": 400})
    assert json.loads((tmp_path / "labels.json").read_text())["run"] == RUN


def test_a_file_holding_another_problem_is_refused(engine, tmp_path):
    cache = LabelCache(tmp_path, RUN)
    run = _label(engine, ["p-0"], cache)
    cache.path("p-0").rename(cache.path("p/1"))
    with pytest.raises(ValueError, match=r"holds labels of 'p-0', not 'p/1'"):
        cache.get("p/1")
    assert cache.get("p 2") is None
    assert cache.path("a/b") != cache.path("a_b")  # ids that read alike still get their own files
    assert run.data.features.shape[0] == len(run.data)


def test_a_cache_needs_an_id_per_prompt(engine, tmp_path):
    with pytest.raises(ValueError, match="one id per prompt"):
        label_problems(engine, list(PROMPTS.values()), SP, progress=False, ids=["p-0"], cache=LabelCache(tmp_path, RUN))


def test_batched_labelling_gives_batch_one_labels(engine, tmp_path):
    """Three problems labelled together: the same steps, PRM scores and advantages as one by
    one, and features equal to float rounding (a batched matmul may sum in another order)."""
    ids = list(PROMPTS)
    alone = label_problems(engine, [PROMPTS[i] for i in ids], SP, progress=False)
    cache = LabelCache(tmp_path, RUN)
    batched = label_problems(engine, [PROMPTS[i] for i in ids], SP, progress=False, ids=ids, cache=cache, batch=3)
    for name in ("advantage", "draft_prm", "target_prm", "problem"):
        assert torch.equal(getattr(alone.data, name), getattr(batched.data, name)), name
    assert torch.allclose(alone.data.features, batched.data.features, rtol=1e-5, atol=1e-5)
    # each problem's seconds run from the previous one's end: together, the run's time
    assert batched.labelled_now == 3 and len(batched.seconds) == 3 and all(s > 0 for s in batched.seconds)
    assert _same(batched.data, label_problems(engine, [PROMPTS[i] for i in ids], SP, progress=False, ids=ids,
                                              cache=LabelCache(tmp_path, RUN), batch=2).data)
    with pytest.raises(ValueError, match="batch must be >= 1"):
        label_problems(engine, [PROMPTS["p-0"]], SP, progress=False, batch=0)
