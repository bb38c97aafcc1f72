"""Router: metrics against scipy, the head's I/O and folding, training, and label generation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import mannwhitneyu, spearmanr

from arbitrage_fast.router.data import RouterDataset
from arbitrage_fast.router.features import StepFeatureAccumulator, feature_dim
from arbitrage_fast.router.head import RouterConfig, RouterHead, RouterLoadError
from arbitrage_fast.router.metrics import auroc, deferral_curve, spearman
from arbitrage_fast.router.train import (cross_validated_auroc, fit_logistic, problem_folds, split_by_problem,
                                         train_linear_router, train_router)


@pytest.mark.parametrize("seed", range(5))
def test_spearman_matches_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 5, 60).astype(float)  # heavy ties, like PRM advantages
    y = x + rng.normal(0, 2, 60)
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_pair_count_and_mann_whitney(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 50)
    labels[:2] = [0, 1]
    scores = np.round(rng.normal(labels * 0.7, 1.0), 1)  # rounded: ties count one half
    pos, neg = scores[labels == 1], scores[labels == 0]
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert auroc(labels, scores) == pytest.approx(brute)
    u = mannwhitneyu(pos, neg).statistic
    assert auroc(labels, scores) == pytest.approx(u / (len(pos) * len(neg)))


def test_metric_edge_cases():
    assert spearman([1, 1, 1], [1, 2, 3]) == 0.0
    with pytest.raises(ValueError, match="both"):
        auroc([1, 1], [0.1, 0.2])
    curve = deferral_curve([1.0, 0.0, -1.0, 2.0], [0.9, 0.1, 0.0, 0.8], rates=(0.5,))
    assert curve[0]["threshold"] == 0.1  # scores > 0.1 are the top half
    assert curve[0]["router_gain"] == pytest.approx(1.0) and curve[0]["oracle_gain"] == pytest.approx(1.0)
    assert "prm_gain" not in curve[0]  # RSD's columns only where the PRM's scores are given
    with pytest.raises(ValueError, match="draft_prm has 3 steps"):
        deferral_curve([1.0, 0.0, -1.0, 2.0], [0.9, 0.1, 0.0, 0.8], draft_prm=[0.1, 0.2, 0.3])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(-1, 1), st.floats(0, 1), st.floats(0, 1)), min_size=2, max_size=40),
       st.sampled_from([0.1, 0.3, 0.5]))
def test_prm_rule_escalates_the_lowest_draft_scores(rows, rate):
    """RSD's rule at a rate escalates the k = round(rate * n) steps the PRM scores lowest
    (draft_prm < prm_threshold, ties aside), and captures their share of the positive advantage."""
    adv, scores, prm = (np.array(c) for c in zip(*rows))
    (point,) = deferral_curve(adv, scores, rates=(rate,), draft_prm=prm)
    k = int(round(rate * len(adv)))
    lowest = np.argsort(prm, kind="stable")[:k]
    total = np.clip(adv, 0, None).sum()
    assert point["prm_gain"] == pytest.approx(adv[lowest].sum() / total if total > 0 else 0.0)
    if k < len(adv):
        assert (prm < point["prm_threshold"]).sum() <= k <= (prm <= point["prm_threshold"]).sum()
    else:
        assert point["prm_threshold"] is None


def test_head_roundtrip_and_dimension_check(tmp_path):
    head = RouterHead(RouterConfig(hidden_size=16, width=8))
    head.set_standardisation(torch.randn(40, feature_dim(16)) * 3 + 1)
    head.save(tmp_path / "r")
    loaded = RouterHead.load(tmp_path / "r", expected_hidden_size=16)
    x = torch.randn(5, feature_dim(16))
    assert torch.allclose(loaded(x), head(x))
    with pytest.raises(RouterLoadError, match="hidden size 16"):
        RouterHead.load(tmp_path / "r", expected_hidden_size=32)
    with pytest.raises(RouterLoadError, match="not a router head"):
        RouterHead.load(tmp_path)


def test_folded_head_through_fused_kernel_reference_equals_head():
    """The fused decode-time path (norm + running first layer + epilogue) scores a step exactly
    as the head scores the step's features."""
    from arbitrage_fast.triton_kernels.router_head import (fused_norm_router_reference, rms_norm_reference,
                                                           router_epilogue_reference)

    torch.manual_seed(0)
    H, F, n = 16, 8, 5
    head = RouterHead(RouterConfig(hidden_size=H, width=F))
    head.set_standardisation(torch.randn(30, feature_dim(H)) * 2 + 0.5)
    fold = head.folded()
    norm_w, eps = torch.rand(H) + 0.5, 1e-6
    residuals = torch.randn(n, 1, H)
    logps, ents = -torch.rand(n), torch.rand(n) * 3
    acc = StepFeatureAccumulator(H, "cpu")
    h_sum, count = torch.zeros(1, H), torch.zeros(1)
    out_h, out_pre = torch.empty(1, H), torch.empty(1, F)
    for j in range(n):
        fused_norm_router_reference(residuals[j], norm_w, eps, fold.w_last, fold.w_mean, h_sum, count, out_h, out_pre)
        assert torch.equal(out_h, rms_norm_reference(residuals[j], norm_w, eps))
        acc.add(out_h[0], logps[j], ents[j])
    score = router_epilogue_reference(out_pre, fold.w_scalar, fold.b1, fold.w2, fold.b2,
                                      logps.mean()[None], ents.mean()[None], torch.tensor([float(n)]),
                                      logps.min()[None], ents.max()[None])
    assert torch.allclose(score, head(acc.features())[None], atol=1e-5)


def _synthetic(n_problems=60, steps=6, hidden=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = n_problems * steps
    feats = torch.randn(n, feature_dim(hidden), generator=g)
    adv = (feats[:, 0] + 0.3 * torch.randn(n, generator=g) > 0.8).float() - 0.1 * (feats[:, 1] > 0).float()
    return RouterDataset(features=feats, advantage=adv, draft_prm=torch.zeros(n), target_prm=adv,
                         problem=torch.arange(n) // steps)


def test_training_loss_falls_and_learns_a_separable_signal():
    data = _synthetic()
    head, report = train_router(data, hidden_size=8, width=16, epochs=150, progress=False)
    assert report.losses[-1] < 0.7 * report.losses[0]
    assert report.val_auroc > 0.85
    assert 0 < report.positive_rate < 0.5


def test_split_is_by_problem():
    train, val = split_by_problem(_synthetic(), 0.25, seed=1)
    assert not set(train.problem.tolist()) & set(val.problem.tolist())
    assert len(train) + len(val) == 360


def _rare_positives(n_problems=40, steps=5, hidden=8, seed=0, positive_problems=3):
    """Separable data where only a few problems hold any positive step (one each)."""
    g = torch.Generator().manual_seed(seed)
    n = n_problems * steps
    feats = torch.randn(n, feature_dim(hidden), generator=g)
    positive = torch.zeros(n, dtype=torch.bool)
    positive[torch.arange(positive_problems) * 7 % n_problems * steps] = True
    feats[positive, 0] += 4.0  # separable: one feature tells the classes apart
    adv = torch.where(positive, 1.0, -0.5)
    return RouterDataset(features=feats, advantage=adv, draft_prm=torch.rand(n, generator=g), target_prm=adv,
                         problem=torch.arange(n) // steps)


@pytest.mark.parametrize("seed", range(6))
def test_split_is_stratified_so_both_sides_keep_the_rare_class(seed):
    data = _rare_positives(positive_problems=2)
    train, val = split_by_problem(data, 0.2, seed=seed)
    assert not set(train.problem.tolist()) & set(val.problem.tolist())
    assert val.labels.sum() == 1 and train.labels.sum() == 1  # one of the two positive problems each
    assert 0 < val.labels.sum() < len(val)


def _separable(seed, n_problems=60, steps=5, hidden=4, rate=0.1, shift=10.0):
    """Steps whose first feature alone tells the ~10% positives apart."""
    g = torch.Generator().manual_seed(seed)
    n = n_problems * steps
    feats = torch.randn(n, feature_dim(hidden), generator=g)
    positive = torch.rand(n, generator=g) < rate
    feats[positive, 0] += shift
    adv = torch.where(positive, 1.0, -0.5)
    return RouterDataset(features=feats, advantage=adv, draft_prm=torch.rand(n, generator=g), target_prm=adv,
                         problem=torch.arange(n) // steps)


@pytest.mark.parametrize("seed", range(3))
def test_training_fits_separable_data_and_keeps_a_trained_epoch(seed):
    """The fitted head separates the classes at the default threshold and the epoch kept is a
    trained one (selection by validation AUROC kept heads that escalated ~10% of negatives)."""
    data = _separable(seed)
    head, report = train_router(data, hidden_size=4, width=16, epochs=400, patience=30, progress=False)
    assert report.best_epoch > 0
    assert report.val_positives >= 1 and report.val_auroc == 1.0
    with torch.no_grad():
        scores = head(data.features)
    assert auroc(data.labels.numpy(), scores.numpy()) == 1.0
    assert ((scores > 0.5) == (data.labels > 0)).float().mean() >= 0.99
    n = report.stopped_epoch + 1
    assert len(report.losses) == len(report.val_losses) == len(report.val_aurocs) == n
    assert report.val_losses[report.best_epoch] == min(report.val_losses)
    assert report.val_losses[report.best_epoch] < 0.5 * report.val_losses[0]
    curves = report.curves()
    assert set(curves) == {"train_loss", "val_loss", "val_auroc"} and len(curves["val_auroc"]) == n


def test_early_stopping_ends_after_patience_without_improvement():
    data = _rare_positives()
    _, report = train_router(data, hidden_size=8, width=16, epochs=3000, lr=0.05, patience=5, progress=False)
    assert report.stopped_epoch < 2999
    assert report.stopped_epoch - report.best_epoch == 5
    assert min(report.val_losses[report.best_epoch + 1:]) >= report.val_losses[report.best_epoch]


def test_linear_head_is_the_logistic_score_exactly_and_survives_saving(tmp_path):
    """RouterHead.linear stores z = w . (x - mean) / std + b as a width-2 MLP; its logits are z
    (silu(z) - silu(-z) = z), also after a save and load, and its folded form scores alike."""
    g = torch.Generator().manual_seed(3)
    d = feature_dim(16)
    mean, std = torch.randn(d, generator=g), 0.5 + torch.rand(d, generator=g)
    w, b = torch.randn(d, generator=g), -0.7
    head = RouterHead.linear(16, mean, std, w, b)
    x = 4 * torch.randn(50, d, generator=g)  # scores far into both tails of the sigmoid
    z = ((x - mean) / std) @ w + b
    torch.testing.assert_close(head.logits(x), z, rtol=1e-5, atol=1e-4)
    assert head.config.width == 2
    head.save(tmp_path / "lin")
    loaded = RouterHead.load(tmp_path / "lin", expected_hidden_size=16)
    torch.testing.assert_close(loaded(x), torch.sigmoid(z), rtol=1e-5, atol=1e-6)


def _scalar_signal(n_problems=80, steps=6, hidden=16, seed=0):
    """The label follows one step statistic (min log-prob); the hidden-state columns are noise."""
    g = torch.Generator().manual_seed(seed)
    n = n_problems * steps
    feats = torch.randn(n, feature_dim(hidden), generator=g)
    adv = -feats[:, -2] + 0.5 * torch.randn(n, generator=g)
    return RouterDataset(features=feats, advantage=adv, draft_prm=torch.rand(n, generator=g), target_prm=adv,
                         problem=torch.arange(n) // steps)


def test_linear_training_chooses_its_penalty_by_cross_validation_and_ranks_held_out_steps():
    data = _scalar_signal()
    head, report = train_linear_router(data, hidden_size=16, penalties=(0.0, 1.0, 100.0))
    assert report.kind == "linear" and set(report.cv_auroc) == {"0.0", "1.0", "100.0"}
    assert report.penalty == max((0.0, 1.0, 100.0), key=lambda p: (report.cv_auroc[repr(p)], p))
    # Noise columns with no penalty fit the training problems' noise: the CV must see that.
    assert report.cv_auroc["100.0"] > report.cv_auroc["0.0"]
    assert report.val_auroc > 0.8 and len(report.val_deferral) == 5
    fresh = _scalar_signal(seed=1)
    with torch.no_grad():
        assert auroc(fresh.labels.numpy(), head(fresh.features).numpy()) > 0.8


def test_cross_validation_scores_each_step_by_a_fit_that_never_saw_its_problem():
    data = _scalar_signal(n_problems=20)
    folds = problem_folds(data, 4, seed=0)
    assert sorted(torch.cat(folds).tolist()) == list(range(20))
    manual = torch.empty(len(data))
    for fold in folds:
        held = torch.isin(data.problem, fold)
        mean, std, w, b = fit_logistic(data.features[~held], data.labels[~held], 1.0)
        manual[held] = ((data.features[held] - mean) / std) @ w + b
    assert cross_validated_auroc(data, 1.0, folds) == pytest.approx(auroc(data.labels.numpy(), manual.numpy()))


def test_linear_training_refuses_bad_settings():
    data = _scalar_signal(n_problems=10)
    with pytest.raises(ValueError, match="folds"):
        train_linear_router(data, hidden_size=16, folds=1)
    with pytest.raises(ValueError, match="penalties"):
        train_linear_router(data, hidden_size=16, penalties=())
    with pytest.raises(ValueError, match="hidden size 8"):
        train_linear_router(data, hidden_size=8)


def test_training_refuses_a_split_without_positives():
    data = _rare_positives()
    data = RouterDataset(data.features, torch.full_like(data.advantage, -1.0), data.draft_prm, data.target_prm,
                         data.problem)
    with pytest.raises(ValueError, match="only negative"):
        train_router(data, hidden_size=8, width=16, epochs=5, progress=False)


def test_dataset_save_load(tmp_path):
    data = _synthetic(n_problems=3)
    data.save(tmp_path / "d.safetensors")
    back = RouterDataset.load(tmp_path / "d.safetensors")
    assert torch.equal(back.features, data.features) and torch.equal(back.labels, data.labels)


def test_label_margin_moves_the_positive_line_and_travels_with_the_steps(tmp_path):
    data = _synthetic(n_problems=4)
    wide = data.with_margin(0.95)
    assert torch.equal(wide.labels, (data.advantage > 0.95).float())
    assert 0 < wide.labels.sum() < data.labels.sum()  # the 0.9 advantages are positive at 0, negative at 0.95
    keep = data.problem < 2
    assert torch.equal(wide.subset(keep).labels, (data.advantage[keep] > 0.95).float())
    assert RouterDataset.concat([wide.subset(keep), wide.subset(~keep)], sizes=[2, 2]).margin == 0.95
    with pytest.raises(ValueError, match="different margins"):
        RouterDataset.concat([wide.subset(keep), data.subset(~keep)], sizes=[2, 2])
    with pytest.raises(ValueError, match="margin must be >= 0"):
        data.with_margin(-0.1)
    # the margin is a training choice, not data: files hold the advantages and load at margin 0
    wide.save(tmp_path / "d.safetensors")
    back = RouterDataset.load(tmp_path / "d.safetensors")
    assert back.margin == 0.0 and torch.equal(back.advantage, data.advantage)


def test_accumulator_keeps_the_steps_extremes():
    acc = StepFeatureAccumulator(2, "cpu")
    for lp, ent in [(-0.1, 0.2), (-2.5, 1.7), (-0.3, 0.4)]:
        acc.add(torch.zeros(2), torch.tensor(lp), torch.tensor(ent))
    scalars = acc.features()[-5:]
    expected = [(-0.1 - 2.5 - 0.3) / 3, (0.2 + 1.7 + 0.4) / 3, math.log1p(3), -2.5, 1.7]
    assert scalars.tolist() == pytest.approx(expected, rel=1e-6)


def test_validation_thresholds_escalate_their_rate_and_reach_the_demo(tmp_path):
    """The head records, per escalation rate, the score threshold that escalates that share of
    its validation steps; a saved head hands it back, and the demo's Arbitrage row uses it when
    its preset names no threshold of its own."""
    from types import SimpleNamespace

    from arbitrage_fast.commands.demo import FALLBACK_THRESHOLDS, demo_thresholds
    from arbitrage_fast.commands.thresholds import PRESET_THRESHOLDS, ROUTER_ESCALATION_RATE
    from arbitrage_fast.router.train import split_by_problem

    data = _separable(0)
    head, report = train_router(data, hidden_size=4, width=16, epochs=200, patience=30, progress=False)
    _, val = split_by_problem(data, 0.2, 0)
    with torch.no_grad():
        scores = head(val.features)
    assert [p["rate"] for p in report.val_deferral] == [0.1, 0.2, 0.3, 0.4, 0.5]
    for point in report.val_deferral:
        if point["threshold"] is not None:  # escalate when score > threshold
            escalated = float((scores > point["threshold"]).float().mean())
            assert abs(escalated - point["rate"]) <= 1.0 / len(val) + 1e-9
        if point["prm_threshold"] is not None:  # RSD: escalate when draft_prm < threshold
            escalated = float((val.draft_prm < point["prm_threshold"]).float().mean())
            assert abs(escalated - point["rate"]) <= 1.0 / len(val) + 1e-9
    folder = head.save(tmp_path / "head", extra={"training": {"val_deferral_curve": report.val_deferral}})
    expected = next(p["threshold"] for p in report.val_deferral if p["rate"] == ROUTER_ESCALATION_RATE)
    expected_rsd = next(p["prm_threshold"] for p in report.val_deferral if p["rate"] == ROUTER_ESCALATION_RATE)
    assert RouterHead.validation_threshold(folder, ROUTER_ESCALATION_RATE) == expected
    assert RouterHead.validation_threshold(folder, ROUTER_ESCALATION_RATE, "prm") == expected_rsd
    with pytest.raises(ValueError, match="rule must be"):
        RouterHead.validation_threshold(folder, ROUTER_ESCALATION_RATE, "rsd")
    assert RouterHead.validation_threshold(folder, 0.33) is None
    qwen = SimpleNamespace(name="qwen2.5-coder", router=str(folder))
    assert demo_thresholds(qwen) == {"arbitrage": expected, "rsd": expected_rsd}
    assert demo_thresholds(SimpleNamespace(name="qwen2.5-coder", router=None))["arbitrage"] == \
        FALLBACK_THRESHOLDS["arbitrage"]
    assert demo_thresholds(SimpleNamespace(name="testbed", router=str(folder)))["arbitrage"] == \
        PRESET_THRESHOLDS["testbed"]["arbitrage"]
    bare = head.save(tmp_path / "bare")  # a head trained before the curve was recorded
    assert RouterHead.validation_threshold(bare, ROUTER_ESCALATION_RATE) is None
    assert demo_thresholds(SimpleNamespace(name="other", router=str(bare))) == FALLBACK_THRESHOLDS
