"""Router training data: advantage labels made exactly as the paper defines them.

Along a trajectory, at every step both models write a step from the same context; the PRM
scores both; advantage = PRM(target) - PRM(draft), label = advantage > 0 (or > a margin, which
keeps only the steps the target clearly improves as positives). The trajectory
continues with the better step (the oracle's choice), so contexts look like those a good
router will see. The engine's `oracle` policy does precisely this work, so labels come from
the same code paths the router later steers.
"""
from __future__ import annotations

import time
from contextlib import closing
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from arbitrage_fast.config import SamplingParams

_TENSORS = ("features", "advantage", "draft_prm", "target_prm", "problem")


@dataclass
class RouterDataset:
    features: torch.Tensor  # [N, D] router input features of each draft step
    advantage: torch.Tensor  # [N] PRM(target step) - PRM(draft step)
    draft_prm: torch.Tensor  # [N]
    target_prm: torch.Tensor  # [N]
    problem: torch.Tensor  # [N] index of the problem the step belongs to (for grouped splits)
    margin: float = 0.0  # a step is positive when its advantage exceeds this

    @property
    def labels(self) -> torch.Tensor:
        return (self.advantage > self.margin).float()

    def with_margin(self, margin: float) -> "RouterDataset":
        """The same steps, labelled positive where advantage > margin."""
        if not margin >= 0:
            raise ValueError(f"the label margin must be >= 0, got {margin}")
        return replace(self, margin=float(margin))

    def __len__(self) -> int:
        return self.advantage.numel()

    def subset(self, mask: torch.Tensor) -> "RouterDataset":
        return replace(self, **{k: getattr(self, k)[mask] for k in _TENSORS})

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        from safetensors.torch import save_file

        save_file({k: getattr(self, k).detach().clone().contiguous() for k in _TENSORS}, str(path), metadata)

    @classmethod
    def concat(cls, parts: list["RouterDataset"], sizes: list[int] | None = None) -> "RouterDataset":
        """Several parts' labels as one dataset, each part's problems numbered on after those of
        the parts before it; sizes[i] is part i's number of problems (default: one each, a
        part's steps all problem 0, so part i becomes problem i even where it has no steps)."""
        if not parts:
            raise ValueError("no problems to join")
        sizes = sizes or [1] * len(parts)
        offsets = [sum(sizes[:i]) for i in range(len(parts))]
        joined = {k: torch.cat([getattr(p, k) for p in parts]) for k in _TENSORS}
        joined["problem"] = torch.cat([p.problem + o for p, o in zip(parts, offsets)])
        margins = {p.margin for p in parts}
        if len(margins) > 1:
            raise ValueError(f"cannot join labels of different margins: {sorted(margins)}")
        return cls(**joined, margin=margins.pop())

    @classmethod
    def load(cls, path: str | Path) -> "RouterDataset":
        return cls.load_with_metadata(path)[0]

    @classmethod
    def load_with_metadata(cls, path: str | Path) -> tuple["RouterDataset", dict[str, str]]:
        """The dataset and the file's metadata, from one read of the file."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return cls(**{k: f.get_tensor(k) for k in _TENSORS}), f.metadata() or {}


@dataclass
class LabelRun:
    data: RouterDataset
    seconds: list[float]  # what labelling each problem took, when it was labelled
    labelled_now: int  # problems labelled in this run (the rest came from the cache)

    @property
    def n_problems(self) -> int:
        return len(self.seconds)

    @classmethod
    def join(cls, runs: list["LabelRun"]) -> "LabelRun":
        """Several runs' labels as one, problems numbered on after the previous run's."""
        if len(runs) == 1:
            return runs[0]
        data = RouterDataset.concat([r.data for r in runs], sizes=[r.n_problems for r in runs])
        return cls(data, [s for r in runs for s in r.seconds], sum(r.labelled_now for r in runs))


def _labels_of(engine, res) -> RouterDataset:
    """One problem's labelled steps (problem index 0) from its oracle run."""
    from .features import feature_dim

    if not res.steps:
        empty = torch.zeros(0)
        return RouterDataset(torch.zeros(0, feature_dim(engine.draft_model.spec.hidden_size)), empty, empty, empty,
                             torch.zeros(0, dtype=torch.long))
    d = torch.tensor([s.draft_prm for s in res.steps])
    t = torch.tensor([s.target_prm for s in res.steps])
    return RouterDataset(features=torch.stack([s.features.float().cpu() for s in res.steps]), advantage=t - d,
                         draft_prm=d, target_prm=t, problem=torch.zeros(len(res.steps), dtype=torch.long))


def label_problems(engine, prompts: list[str], sampling: SamplingParams | None = None, progress: bool = True,
                   chat: bool = False, ids: list[str] | None = None, cache=None, batch: int = 1) -> LabelRun:
    """Labels of every prompt, read from `cache` (a `LabelCache`, keyed by `ids`) where it holds
    them and written to it as each new problem is done. Problems the cache lacks are labelled
    with `batch` in the engine at a time, the next started as soon as one ends (each problem's
    oracle trajectory is the same as alone). A problem's seconds are the wall time since the
    previous problem ended (alone: its own time), so they add up to the run's time."""
    if cache is not None and (ids is None or len(ids) != len(prompts)):
        raise ValueError("a label cache needs one id per prompt")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    sampling = sampling or SamplingParams(max_new_tokens=256)
    parts: list[RouterDataset | None] = [None] * len(prompts)
    seconds: list[float] = [0.0] * len(prompts)
    todo = []
    for i in range(len(prompts)):
        cached = cache.get(ids[i]) if cache is not None else None
        if cached is None:
            todo.append(i)
        else:
            parts[i], seconds[i] = cached
    if todo:  # (with every problem cached there may be no engine at all)
        requests = ((i, {"prompt": prompts[i], "policy": "oracle", "threshold": 0.0, "sampling": sampling,
                         "chat": chat, "record_features": True}) for i in todo)
        last = time.perf_counter()
        with tqdm(total=len(todo), desc="router labels", disable=not progress) as bar, \
                closing(engine.completions(requests, batch)) as ended:
            for i, res, _ in ended:
                now = time.perf_counter()
                parts[i], seconds[i], last = _labels_of(engine, res), now - last, now
                if cache is not None:
                    cache.put(ids[i], parts[i], seconds[i])
                bar.update(1)
    data = RouterDataset.concat(parts)
    if not len(data):
        raise ValueError("no steps were generated; cannot build router labels")
    return LabelRun(data, seconds, len(todo))


def generate_labels(engine, prompts: list[str], sampling: SamplingParams | None = None,
                    progress: bool = True, chat: bool = False) -> RouterDataset:
    return label_problems(engine, prompts, sampling, progress, chat).data
