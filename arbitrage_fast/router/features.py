"""The router's input features for one draft step, accumulated while the step is decoded.

For a step s_1..s_n, h_j is the draft's final normed hidden state at the position that
*predicted* s_j, so every feature is available in the same forward that samples the token:
no extra model pass is ever needed to score a step.

    features = [h_last (H), h_mean (H), mean log p(s_j), mean entropy_j, log1p(n),
                min log p(s_j), max entropy_j]

The extremes are there because a wrong step is usually wrong in one token (a slipped digit,
a wrong operator): a mean over the step dilutes that token's uncertainty, a running min/max
keeps it, at the cost of one more running value each.
"""
from __future__ import annotations

import torch

NUM_SCALAR_FEATURES = 5


def feature_dim(hidden_size: int) -> int:
    return 2 * hidden_size + NUM_SCALAR_FEATURES


def hidden_size_of(dim: int) -> int:
    """The draft's hidden size behind features of `dim` values (feature_dim's inverse)."""
    hidden, odd = divmod(dim - NUM_SCALAR_FEATURES, 2)
    if odd or hidden < 1:
        raise ValueError(f"{dim} values are not router features (2 * hidden + {NUM_SCALAR_FEATURES})")
    return hidden


class StepFeatureAccumulator:
    def __init__(self, hidden_size: int, device) -> None:
        self.h_sum = torch.zeros(hidden_size, dtype=torch.float32, device=device)
        self.h_last = torch.zeros(hidden_size, dtype=torch.float32, device=device)
        self.logp_sum = torch.zeros((), dtype=torch.float32, device=device)
        self.entropy_sum = torch.zeros((), dtype=torch.float32, device=device)
        # log p <= 0 and entropy >= 0, so 0 is the identity of both running extremes.
        self.logp_min = torch.zeros((), dtype=torch.float32, device=device)
        self.entropy_max = torch.zeros((), dtype=torch.float32, device=device)
        self.n = 0

    def add(self, hidden: torch.Tensor, logprob: torch.Tensor, entropy: torch.Tensor) -> None:
        """hidden [H], logprob/entropy scalars: one sampled token (stays on device)."""
        h = hidden.float().reshape(-1)
        self.h_sum += h
        self.h_last = h
        self.logp_sum += logprob.reshape(())
        self.entropy_sum += entropy.reshape(())
        self.logp_min = torch.minimum(self.logp_min, logprob.reshape(()).float())
        self.entropy_max = torch.maximum(self.entropy_max, entropy.reshape(()).float())
        self.n += 1

    def features(self) -> torch.Tensor:
        if self.n == 0:
            raise ValueError("no tokens accumulated for this step")
        n = torch.tensor(self.n, device=self.h_sum.device)
        return assemble_features(self.h_last, self.h_sum, self.logp_sum, self.entropy_sum, self.logp_min,
                                 self.entropy_max, n)


def assemble_features(h_last: torch.Tensor, h_sum: torch.Tensor, logp_sum: torch.Tensor, entropy_sum: torch.Tensor,
                      logp_min: torch.Tensor, entropy_max: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """The feature layout above from a step's running values: [..., H] hidden rows, [...] scalar
    statistics and step lengths n -> [..., F]. One definition serves the per-token accumulator
    and the chunked decoder, which scores every candidate end of a chunk at once."""
    nf = n.to(torch.float32)
    scalars = torch.stack([logp_sum / nf, entropy_sum / nf, torch.log1p(n.double()).float(), logp_min, entropy_max],
                          dim=-1)
    return torch.cat([h_last, h_sum / nf[..., None], scalars], dim=-1)
