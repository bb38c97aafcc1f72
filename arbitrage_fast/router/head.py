"""The router: a tiny MLP predicting P(PRM(target step) > PRM(draft step)) from draft features
(a logistic score over them is one such MLP, of width 2: `RouterHead.linear`).

Feature standardisation is part of the head (not the data pipeline), so a saved head is
self-contained, and `folded()` merges it into the first layer: the fused decode kernel then
needs only two [F, H] matrices and never sees the statistics.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .features import NUM_SCALAR_FEATURES, feature_dim

CONFIG_NAME = "router_config.json"
WEIGHTS_NAME = "router.safetensors"


class RouterLoadError(ValueError):
    """A router head file is missing, malformed, or does not fit the draft model."""


@dataclass
class RouterConfig:
    hidden_size: int  # the draft's hidden size
    width: int = 64

    @property
    def in_features(self) -> int:
        return feature_dim(self.hidden_size)


@dataclass
class FoldedRouter:
    """First layer with standardisation folded in, split by feature group."""

    w_last: torch.Tensor  # [F, H]
    w_mean: torch.Tensor  # [F, H]
    w_scalar: torch.Tensor  # [F, NUM_SCALAR_FEATURES]
    b1: torch.Tensor  # [F]
    w2: torch.Tensor  # [F]
    b2: torch.Tensor  # []


class RouterHead(nn.Module):
    def __init__(self, config: RouterConfig) -> None:
        super().__init__()
        self.config = config
        d = config.in_features
        self.register_buffer("feature_mean", torch.zeros(d))
        self.register_buffer("feature_std", torch.ones(d))
        self.fc1 = nn.Linear(d, config.width)
        self.fc2 = nn.Linear(config.width, 1)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        x = (features.float() - self.feature_mean) / self.feature_std
        return self.fc2(F.silu(self.fc1(x))).squeeze(-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Probability that escalating this step improves it."""
        return torch.sigmoid(self.logits(features))

    @classmethod
    def linear(cls, hidden_size: int, mean: torch.Tensor, std: torch.Tensor, weight: torch.Tensor,
               bias: float) -> "RouterHead":
        """A logistic score z = weight . (x - mean) / std + bias as this MLP's shape, exactly:
        two hidden units u = z and u = -z, since silu(z) - silu(-z) = z sigmoid(z) + z sigmoid(-z)
        = z. So a linear router loads, folds and runs in the fused decode kernel like any head."""
        head = cls(RouterConfig(hidden_size=hidden_size, width=2))
        with torch.no_grad():
            head.feature_mean.copy_(mean)
            head.feature_std.copy_(std)
            head.fc1.weight.copy_(torch.stack([weight, -weight]))
            head.fc1.bias.copy_(torch.tensor([bias, -bias]))
            head.fc2.weight.copy_(torch.tensor([[1.0, -1.0]]))
            head.fc2.bias.zero_()
        return head.eval().requires_grad_(False)

    def set_standardisation(self, features: torch.Tensor) -> None:
        self.feature_mean.copy_(features.float().mean(0))
        self.feature_std.copy_(features.float().std(0).clamp_min(1e-4))

    def folded(self) -> FoldedRouter:
        w = self.fc1.weight / self.feature_std[None, :]
        b = self.fc1.bias - w @ self.feature_mean
        h = self.config.hidden_size
        assert w.shape[1] == 2 * h + NUM_SCALAR_FEATURES
        return FoldedRouter(
            w_last=w[:, :h].contiguous(), w_mean=w[:, h : 2 * h].contiguous(), w_scalar=w[:, 2 * h :].contiguous(),
            b1=b.contiguous(), w2=self.fc2.weight[0].contiguous(), b2=self.fc2.bias[0],
        )

    def save(self, directory: str | Path, extra: dict | None = None) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(directory / WEIGHTS_NAME))
        (directory / CONFIG_NAME).write_text(json.dumps({**asdict(self.config), **(extra or {})}, indent=2))
        return directory

    @staticmethod
    def digest(directory: str | Path) -> str:
        """SHA-256 of a saved head's weights: names the head whatever folder it sits in, and tells
        a retrained head in the same folder from the one before. The config's training notes are
        left out, as they change no score."""
        w_path = Path(directory) / WEIGHTS_NAME
        if not w_path.is_file():
            raise RouterLoadError(f"{directory} is not a router head folder (needs {WEIGHTS_NAME})")
        return hashlib.sha256(w_path.read_bytes()).hexdigest()

    @staticmethod
    def validation_threshold(directory: str | Path, rate: float, rule: str = "router") -> float | None:
        """The threshold that escalated `rate` of the validation steps when the head was trained
        (`train-router` records its deferral curve there): the router's score threshold, or with
        rule="prm" the draft-PRM threshold with which RSD escalates as many of those steps. None
        when the head records none."""
        key = {"router": "threshold", "prm": "prm_threshold"}.get(rule)
        if key is None:
            raise ValueError(f"rule must be 'router' or 'prm', got {rule!r}")
        cfg_path = Path(directory) / CONFIG_NAME
        if not cfg_path.is_file():
            raise RouterLoadError(f"{directory} is not a router head folder (needs {CONFIG_NAME})")
        curve = json.loads(cfg_path.read_text()).get("training", {}).get("val_deferral_curve") or []
        return next((p.get(key) for p in curve if abs(p["rate"] - rate) < 1e-9), None)

    @classmethod
    def load(cls, directory: str | Path, expected_hidden_size: int | None = None) -> "RouterHead":
        from safetensors.torch import load_file

        directory = Path(directory)
        cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not cfg_path.is_file() or not w_path.is_file():
            raise RouterLoadError(f"{directory} is not a router head folder (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        raw = json.loads(cfg_path.read_text())
        try:
            config = RouterConfig(hidden_size=int(raw["hidden_size"]), width=int(raw.get("width", 64)))
        except (KeyError, TypeError, ValueError) as e:
            raise RouterLoadError(f"{cfg_path} is malformed: {e}") from None
        if expected_hidden_size is not None and config.hidden_size != expected_hidden_size:
            raise RouterLoadError(
                f"router head {directory} was trained for a draft with hidden size {config.hidden_size}, "
                f"but the draft model has hidden size {expected_hidden_size}"
            )
        head = cls(config)
        state = load_file(str(w_path))
        expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if expected != got:
            raise RouterLoadError(f"{w_path}: tensors {got} do not match the config's shapes {expected}")
        head.load_state_dict(state)
        return head.eval().requires_grad_(False)
