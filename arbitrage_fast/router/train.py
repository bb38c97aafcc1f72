"""Train the router head: class-weighted logistic loss on advantage labels, full batch.

Steps are split by *problem* (never by step) so validation measures generalisation to new
problems, as deployment does, and the split is stratified so validation holds positive and
negative steps whenever the data has problems of both kinds. Training stops early when the
validation loss has not improved for `patience` epochs; the epoch kept is the one with the
lowest validation loss. Loss rather than AUROC picks it: AUROC is a step function of a few
dozen validation steps and often peaks (ties included) after the first update, which kept
untrained heads; the loss keeps falling while the head still fits.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import RouterDataset
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
    head = RouterHead(RouterConfig(hidden_size=hidden_size, width=width))
    if data.features.shape[1] != head.config.in_features:
        raise ValueError(f"features have {data.features.shape[1]} columns; a draft with hidden size "
                         f"{hidden_size} gives {head.config.in_features}")
    y = train.labels
    n_pos = float(y.sum())
    if n_pos == 0 or n_pos == len(y):
        raise ValueError(f"the training split holds only {'negative' if n_pos == 0 else 'positive'} steps "
                         f"({len(y)} of them): a router needs both kinds of label; label more problems")
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
        with torch.no_grad():
            s = head(val.features).numpy()
        report.val_auroc = auroc(val.labels.numpy(), s)
        report.val_spearman = spearman(val.advantage.numpy(), s)
        report.val_deferral = deferral_curve(val.advantage.numpy(), s, draft_prm=val.draft_prm.numpy())
    else:
        report.best_epoch = report.stopped_epoch
    return head.eval().requires_grad_(False), report
