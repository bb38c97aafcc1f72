"""Train the router head: class-weighted logistic loss on advantage labels, full batch.

Steps are split by *problem* (never by step) so validation measures generalisation to new
problems, as deployment does, and the split is stratified so validation holds positive and
negative steps whenever the data has problems of both kinds. Training stops early when the
validation loss has not improved for `patience` epochs; the epoch kept is the one with the
lowest validation loss. Loss rather than AUROC picks it: AUROC is a step function of a few
dozen validation steps and often peaks (ties included) after the first update, which kept
untrained heads; the loss keeps falling while the head still fits.

`train_linear_router` fits the other head kind: a logistic score over the same features, with
a ridge penalty on the hidden-state weights chosen by cross-validation over whole training
problems (the step statistics, five values, get only a small fixed penalty). The draft's
hidden states are 2H values against a few thousand labelled steps: an MLP over them fits the
training problems' own quirks, while most of what ranks a step sits in its log-probs and
entropies. The fitted score is stored as an MLP of width 2 (`RouterHead.linear`), so the
decode path is the same for both kinds.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import RouterDataset
from .features import NUM_SCALAR_FEATURES, feature_dim
from .head import RouterConfig, RouterHead
from .metrics import auroc, deferral_curve, spearman


@dataclass
class TrainReport:
    losses: list[float] = field(default_factory=list)  # training loss per epoch
    val_losses: list[float] = field(default_factory=list)  # per epoch, when validation is possible
    val_aurocs: list[float] = field(default_factory=list)
    best_epoch: int = -1
    stopped_epoch: int = -1  # the last epoch run (early stopping may end before `epochs`)
    val_auroc: float | None = None
    val_spearman: float | None = None
    n_train: int = 0
    n_val: int = 0
    positive_rate: float = 0.0
    val_positives: int = 0
    # per escalation rate, the score threshold reaching it on the validation problems (never on
    # test problems), and the PRM threshold with which RSD escalates as many of those steps: what
    # a deployment without a calibration run can start from
    val_deferral: list[dict] = field(default_factory=list)
    kind: str = "mlp"  # "mlp" or "linear"
    penalty: float | None = None  # linear: the hidden-state ridge penalty the cross-validation chose
    cv_auroc: dict[str, float] = field(default_factory=dict)  # linear: pooled CV AUROC per penalty

    def curves(self) -> dict:
        """The learning curves, JSON-ready."""
        return {"train_loss": self.losses, "val_loss": self.val_losses, "val_auroc": self.val_aurocs}


def split_by_problem(data: RouterDataset, val_fraction: float, seed: int) -> tuple[RouterDataset, RouterDataset]:
    """Whole problems to validation, drawn within strata of (has a positive step, has a
    negative step), at least one problem from each stratum that can spare one, so a rare class
    still reaches validation (and training keeps some of it)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    problems = data.problem.unique()
    if len(problems) < 2:
        return data, data.subset(torch.zeros(len(data), dtype=torch.bool))
    labels = data.labels
    g = torch.Generator().manual_seed(seed)
    strata: dict[tuple[bool, bool], list[int]] = {}
    for p in problems[torch.randperm(len(problems), generator=g)].tolist():
        y = labels[data.problem == p]
        strata.setdefault((bool(y.max() > 0), bool(y.min() == 0)), []).append(p)
    val_ids = []
    for members in strata.values():
        n = int(round(val_fraction * len(members)))
        if len(members) > 1:
            n = min(max(n, 1), len(members) - 1)
        val_ids.extend(members[:n])
    if not val_ids:  # every stratum holds a single problem: give validation one of them
        val_ids = [problems[0].item()]
    is_val = torch.isin(data.problem, torch.tensor(val_ids, dtype=data.problem.dtype))
    return data.subset(~is_val), data.subset(is_val)


def train_router(data: RouterDataset, hidden_size: int, width: int = 64, epochs: int = 300, lr: float = 3e-3,
                 weight_decay: float = 1e-2, val_fraction: float = 0.2, seed: int = 0, patience: int = 40,
                 progress: bool = True) -> tuple[RouterHead, TrainReport]:
    if len(data) < 4:
        raise ValueError(f"need at least 4 labelled steps to train a router, got {len(data)}")
    if patience < 1:
        raise ValueError(f"patience must be >= 1 epoch, got {patience}")
    torch.manual_seed(seed)
    train, val = split_by_problem(data, val_fraction, seed)
    n_pos = _check_trainable(data, train, hidden_size)
    head = RouterHead(RouterConfig(hidden_size=hidden_size, width=width))
    y = train.labels
    head.set_standardisation(train.features)
    # Each class weighs the same in the loss (positives by neg/pos), whichever is rarer.
    pos_weight = torch.tensor((len(y) - n_pos) / n_pos)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    report = TrainReport(n_train=len(train), n_val=len(val), positive_rate=n_pos / len(y),
                         val_positives=int(val.labels.sum()))
    best_state, best = copy.deepcopy(head.state_dict()), float("inf")
    can_validate = len(val) > 0 and 0 < report.val_positives < len(val)
    for epoch in tqdm(range(epochs), desc="router", disable=not progress):
        head.train()
        loss = F.binary_cross_entropy_with_logits(head.logits(train.features), y, pos_weight=pos_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        report.losses.append(float(loss.detach()))
        report.stopped_epoch = epoch
        if not can_validate:
            continue
        head.eval()
        with torch.no_grad():
            logits = head.logits(val.features)
            val_loss = float(F.binary_cross_entropy_with_logits(logits, val.labels, pos_weight=pos_weight))
        report.val_losses.append(val_loss)
        report.val_aurocs.append(auroc(val.labels.numpy(), logits.numpy()))
        if val_loss < best:
            best, best_state, report.best_epoch = val_loss, copy.deepcopy(head.state_dict()), epoch
        elif epoch - report.best_epoch >= patience:
            break
    if can_validate:
        head.load_state_dict(best_state)
        _validate(head, val, report)
    else:
        report.best_epoch = report.stopped_epoch
    return head.eval().requires_grad_(False), report


def _validate(head: RouterHead, val: RouterDataset, report: TrainReport) -> None:
    """The kept head's figures on the validation problems."""
    with torch.no_grad():
        s = head(val.features).numpy()
    report.val_auroc = auroc(val.labels.numpy(), s)
    report.val_spearman = spearman(val.advantage.numpy(), s)
    report.val_deferral = deferral_curve(val.advantage.numpy(), s, draft_prm=val.draft_prm.numpy())


def _check_trainable(data: RouterDataset, train: RouterDataset, hidden_size: int) -> float:
    """The training split's count of positive steps, once the data is known to fit a head."""
    if data.features.shape[1] != feature_dim(hidden_size):
        raise ValueError(f"features have {data.features.shape[1]} columns; a draft with hidden size "
                         f"{hidden_size} gives {feature_dim(hidden_size)}")
    y = train.labels
    n_pos = float(y.sum())
    if n_pos == 0 or n_pos == len(y):
        raise ValueError(f"the training split holds only {'negative' if n_pos == 0 else 'positive'} steps "
                         f"({len(y)} of them): a router needs both kinds of label; label more problems")
    return n_pos


# Ridge penalties on the hidden-state weights (in standardised units, per unit of the
# class-weighted mean loss) that the cross-validation chooses from, a factor of about 3 apart.
PENALTIES = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
# The step statistics' penalty: just enough to keep a separable training set's fit finite.
SCALAR_PENALTY = 1e-4


def fit_logistic(features: torch.Tensor, labels: torch.Tensor, penalty: float,
                 scalar_penalty: float = SCALAR_PENALTY) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(mean, std, weight, bias) of the class-weighted logistic score over standardised
    features, ridge-penalised: `penalty` on the hidden-state columns, `scalar_penalty` on the
    last NUM_SCALAR_FEATURES (the step statistics). Full-batch L-BFGS: the loss is convex, so
    the fit is the same whatever the start."""
    x = features.float()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-4)
    x = (x - mean) / std
    y = labels.float()
    n_pos = float(y.sum())
    pos_weight = torch.tensor((len(y) - n_pos) / n_pos)
    pen = torch.full((x.shape[1],), float(penalty))
    pen[-NUM_SCALAR_FEATURES:] = scalar_penalty
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, tolerance_grad=1e-6, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, y, pos_weight=pos_weight) + (pen * w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return mean, std, w.detach(), float(b.detach())


def problem_folds(data: RouterDataset, folds: int, seed: int) -> list[torch.Tensor]:
    """Whole problems dealt into `folds` groups at random (fewer when there are fewer problems)."""
    problems = data.problem.unique()
    problems = problems[torch.randperm(len(problems), generator=torch.Generator().manual_seed(seed))]
    k = min(folds, len(problems))
    return [problems[i::k] for i in range(k)]


def cross_validated_auroc(data: RouterDataset, penalty: float, folds: list[torch.Tensor]) -> float | None:
    """AUROC of every step scored by the fit on the other folds' problems, pooled (steps of a
    fold whose complement holds one class only stay out); None when the pooled steps are all
    of one class."""
    scores = torch.full((len(data),), float("nan"))
    for fold in folds:
        held = torch.isin(data.problem, fold)
        fit_on = data.subset(~held)
        if not 0 < float(fit_on.labels.sum()) < len(fit_on):
            continue
        mean, std, w, b = fit_logistic(fit_on.features, fit_on.labels, penalty)
        scores[held] = ((data.features[held].float() - mean) / std) @ w + b
    scored = ~scores.isnan()
    labels = data.labels[scored]
    if not 0 < float(labels.sum()) < len(labels):
        return None
    return auroc(labels.numpy(), scores[scored].numpy())


def train_linear_router(data: RouterDataset, hidden_size: int, penalties: tuple[float, ...] = PENALTIES,
                        folds: int = 5, val_fraction: float = 0.2, seed: int = 0) -> tuple[RouterHead, TrainReport]:
    """The linear head: the hidden-state penalty with the best pooled AUROC over `folds`
    cross-validation folds of the training problems (ties: the larger penalty), refitted on all
    of them; the validation problems (split as for the MLP) give the report's figures and
    deferral curve, and take no part in the choice."""
    if len(data) < 4:
        raise ValueError(f"need at least 4 labelled steps to train a router, got {len(data)}")
    if not penalties or any(p < 0 for p in penalties):
        raise ValueError(f"penalties must be a non-empty list of values >= 0, got {penalties}")
    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {folds}")
    train, val = split_by_problem(data, val_fraction, seed)
    n_pos = _check_trainable(data, train, hidden_size)
    report = TrainReport(n_train=len(train), n_val=len(val), positive_rate=n_pos / len(train),
                         val_positives=int(val.labels.sum()), kind="linear")
    groups = problem_folds(train, folds, seed)
    for p in sorted(penalties):
        score = cross_validated_auroc(train, p, groups) if len(groups) >= 2 else None
        if score is not None:
            report.cv_auroc[repr(p)] = score
    # With no fold to score on (too few problems), the middle of the grid.
    report.penalty = (max(sorted(penalties, reverse=True), key=lambda p: report.cv_auroc.get(repr(p), -1.0))
                      if report.cv_auroc else sorted(penalties)[len(penalties) // 2])
    mean, std, w, b = fit_logistic(train.features, train.labels, report.penalty)
    head = RouterHead.linear(hidden_size, mean, std, w, b)
    if len(val) > 0 and 0 < report.val_positives < len(val):
        _validate(head, val, report)
    return head, report
