"""User stop strings: the rule against a whole-text model, and the engine, server and remote
backend against the same request without them (greedy, so every step before the stop is the same)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arbitrage_fast import SamplingParams
from arbitrage_fast.stop_strings import check_stop_strings, find_stop, tokens_through_stop
from helpers.length_prm import LengthPRM, build_policy_folders, policy_engine


def cut_step_by_step(steps: list[str], stops: tuple[str, ...]) -> tuple[str, int | None]:
    out = ""
    for j, text in enumerate(steps):
        hit = find_stop(out, text, stops)
        if hit is not None:
            return out + text[:hit[0]], j
        out += text
    return out, None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text("ab\n", max_size=8), min_size=1, max_size=6),
       st.lists(st.text("ab\n", min_size=1, max_size=4), min_size=1, max_size=3))
def test_step_by_step_cutting_matches_the_whole_text_rule(steps, stops):
    """The answer ends at the first step whose text completes a stop string, before the
    earliest stop string in the text so far, or at that step's start if it began earlier."""
    stops = tuple(stops)
    got, at = cut_step_by_step(steps, stops)
    full = "".join(steps)
    ends = [full.find(s) + len(s) for s in stops if s in full]
    if not ends:
        assert at is None and got == full
        return
    end = min(ends)  # where the first completed stop string ends
    start = [len("".join(steps[:j])) for j in range(len(steps) + 1)]
    j = next(j for j in range(len(steps)) if start[j + 1] >= end)
    assert at == j
    so_far = full[:start[j + 1]]
    first = min(so_far.find(s) for s in stops if s in so_far)
    assert got == so_far[:max(first, start[j])]


def test_find_stop_and_the_tokens_that_complete_it():
    assert find_stop("", "x = 5. Answer: 5", ("Answer:", "=")) == (2, "=")
    assert find_stop("Step 1.\n\n", "Q: next", ("\n\nQ:",)) == (0, "\n\nQ:")  # begun in the step before
    assert find_stop("abc", "def", ("zz",)) is None and find_stop("abc", "def", ()) is None
    pieces = ["Th", "e ans", "wer", " is"]
    decode = lambda ids: "".join(pieces[i] for i in ids)  # noqa: E731
    assert tokens_through_stop([0, 1, 2, 3], decode, "", ("answer",)) == 3  # "wer" completes it
    assert check_stop_strings("x") == ("x",)
    with pytest.raises(ValueError, match="non-empty"):
        SamplingParams(stop=["ok", ""])
    with pytest.raises(ValueError, match="at most 16"):
        SamplingParams(stop=[str(i) for i in range(17)])


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return policy_engine(build_policy_folders(tmp_path_factory.mktemp("stops"), router_seed=2), prm=LengthPRM())


SP = dict(max_new_tokens=40, max_step_tokens=6, ignore_eos=True)


@pytest.mark.parametrize("policy, threshold", [("rsd", 0.6), ("target_only", None), ("draft_only", None),
                                               ("oracle", 0.05)])
def test_the_answer_ends_before_the_stop_string_and_is_otherwise_unchanged(engine, policy, threshold):
    free = engine.generate(list(range(5, 25)), policy=policy, threshold=threshold, sampling=SamplingParams(**SP))
    assert len(free.steps) >= 3
    whole = "".join(s.text for s in free.steps)
    third = free.steps[2]
    stop = third.text[1:4]  # three characters inside the third step
    out = engine.generate(list(range(5, 25)), policy=policy, threshold=threshold,
                          sampling=SamplingParams(stop=["never written", stop], **SP))
    assert out.finish_reason == "stop" and out.stop_reason == stop
    expected, at = cut_step_by_step([s.text for s in free.steps], (stop,))
    assert out.text == expected and len(out.steps) == at + 1
    assert len(expected) < len(whole)
    assert out.steps[-1].ended_by == "stop" and out.steps[-1].matched_stop == stop
    assert [s.text for s in out.steps[:-1]] == [s.text for s in free.steps[:len(out.steps) - 1]]
    # The ids run through the token that completes the stop string, no further.
    assert out.token_ids == free.token_ids[:len(out.token_ids)]
    decoded = engine.tokenizer.decode(out.token_ids)
    assert stop in decoded and stop not in engine.tokenizer.decode(out.token_ids[:-1])
    assert engine.kv_stats()["used_pages"] == 0


def test_stop_strings_in_a_batch_apply_to_their_own_request(engine):
    prompts = [list(range(5, 25)), list(range(7, 30))]
    free = engine.generate_batch(prompts, policy="rsd", threshold=0.6, sampling=SamplingParams(**SP))
    stop = free[0].steps[1].text[:3]
    samplings = [SamplingParams(stop=[stop], **SP), SamplingParams(**SP)]
    out = engine.generate_batch(prompts, policy="rsd", threshold=0.6, sampling=samplings)
    alone = engine.generate(prompts[0], policy="rsd", threshold=0.6, sampling=samplings[0])
    assert out[0].text == alone.text and out[0].finish_reason == "stop"
    assert out[1].text == free[1].text and out[1].finish_reason == free[1].finish_reason
    assert engine.kv_stats()["used_pages"] == 0
