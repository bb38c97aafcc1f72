"""Train the router head: class-balanced logistic loss on advantage labels, full batch.

Steps are split by *problem* (never by step) so validation measures generalisation to new
problems, as deployment does. The epoch kept is the one with the best validation AUROC.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import RouterDataset
from .head import RouterConfig, RouterHead
from .metrics import auroc, spearman


@dataclass
class TrainReport:
    losses: list[float] = field(default_factory=list)
    best_epoch: int = -1
    val_auroc: float | None = None
    val_spearman: float | None = None
    n_train: int = 0
    n_val: int = 0
    positive_rate: float = 0.0


def split_by_problem(data: RouterDataset, val_fraction: float, seed: int) -> tuple[RouterDataset, RouterDataset]:
    problems = data.problem.unique()
    g = torch.Generator().manual_seed(seed)
    perm = problems[torch.randperm(len(problems), generator=g)]
    n_val = max(1, int(round(val_fraction * len(problems)))) if len(problems) > 1 else 0
    val_ids = perm[:n_val]
    is_val = torch.isin(data.problem, val_ids)
    return data.subset(~is_val), data.subset(is_val)


def train_router(data: RouterDataset, hidden_size: int, width: int = 64, epochs: int = 300, lr: float = 3e-3,
                 weight_decay: float = 1e-2, val_fraction: float = 0.2, seed: int = 0,
                 progress: bool = True) -> tuple[RouterHead, TrainReport]:
    if len(data) < 4:
        raise ValueError(f"need at least 4 labelled steps to train a router, got {len(data)}")
    torch.manual_seed(seed)
    train, val = split_by_problem(data, val_fraction, seed)
    head = RouterHead(RouterConfig(hidden_size=hidden_size, width=width))
    if data.features.shape[1] != head.config.in_features:
        raise ValueError(f"features have {data.features.shape[1]} columns; a draft with hidden size "
                         f"{hidden_size} gives {head.config.in_features}")
    head.set_standardisation(train.features)
    y = train.labels
    n_pos = float(y.sum())
    # Escalations worth making are rare; weighting positives by neg/pos keeps them from being ignored.
    pos_weight = torch.tensor((len(y) - n_pos) / max(n_pos, 1.0))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    report = TrainReport(n_train=len(train), n_val=len(val), positive_rate=n_pos / len(y))
    best_state, best = copy.deepcopy(head.state_dict()), -1.0
    can_validate = len(val) > 0 and 0 < float(val.labels.sum()) < len(val)
    for epoch in tqdm(range(epochs), desc="router", disable=not progress):
        head.train()
        loss = F.binary_cross_entropy_with_logits(head.logits(train.features), y, pos_weight=pos_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        report.losses.append(float(loss.detach()))
        if can_validate:
            head.eval()
            with torch.no_grad():
                score = auroc(val.labels.numpy(), head(val.features).numpy())
            if score > best:
                best, best_state, report.best_epoch = score, copy.deepcopy(head.state_dict()), epoch
    if can_validate:
        head.load_state_dict(best_state)
        with torch.no_grad():
            s = head(val.features).numpy()
        report.val_auroc = auroc(val.labels.numpy(), s)
        report.val_spearman = spearman(val.advantage.numpy(), s)
    else:
        report.best_epoch = epochs - 1
    return head.eval().requires_grad_(False), report
