"""Router training data: advantage labels made exactly as the paper defines them.

Along a trajectory, at every step both models write a step from the same context; the PRM
scores both; advantage = PRM(target) - PRM(draft), label = advantage > 0. The trajectory
continues with the better step (the oracle's choice), so contexts look like those a good
router will see. The engine's `oracle` policy does precisely this work, so labels come from
the same code paths the router later steers.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from arbitrage_fast.config import SamplingParams


@dataclass
class RouterDataset:
    features: torch.Tensor  # [N, D] router input features of each draft step
    advantage: torch.Tensor  # [N] PRM(target step) - PRM(draft step)
    draft_prm: torch.Tensor  # [N]
    target_prm: torch.Tensor  # [N]
    problem: torch.Tensor  # [N] index of the problem the step belongs to (for grouped splits)

    @property
    def labels(self) -> torch.Tensor:
        return (self.advantage > 0).float()

    def __len__(self) -> int:
        return self.advantage.numel()

    def subset(self, mask: torch.Tensor) -> "RouterDataset":
        return RouterDataset(*(t[mask] for t in (self.features, self.advantage, self.draft_prm,
                                                  self.target_prm, self.problem)))

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().clone().contiguous() for k, v in self.__dict__.items()}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> "RouterDataset":
        from safetensors.torch import load_file

        t = load_file(str(path))
        return cls(**{k: t[k] for k in ("features", "advantage", "draft_prm", "target_prm", "problem")})


def generate_labels(engine, prompts: list[str], sampling: SamplingParams | None = None,
                    progress: bool = True, chat: bool = False) -> RouterDataset:
    sampling = sampling or SamplingParams(max_new_tokens=256)
    feats, adv, dprm, tprm, prob = [], [], [], [], []
    for i, prompt in enumerate(tqdm(prompts, desc="router labels", disable=not progress)):
        res = engine.generate(prompt, policy="oracle", threshold=0.0, sampling=sampling, chat=chat,
                              record_features=True)
        for step in res.steps:
            feats.append(step.features.float().cpu())
            dprm.append(step.draft_prm)
            tprm.append(step.target_prm)
            prob.append(i)
    if not feats:
        raise ValueError("no steps were generated; cannot build router labels")
    d, t = torch.tensor(dprm), torch.tensor(tprm)
    return RouterDataset(features=torch.stack(feats), advantage=t - d, draft_prm=d, target_prm=t,
                         problem=torch.tensor(prob))
