"""The two model roles of step-level speculation, as one type.

A role is also the model's index in the shared KV pool (per-model block tables), so it is an
IntEnum: pool calls take it as is, and `Step.source` carries its lower-case name on the wire.
"""
from __future__ import annotations

from enum import IntEnum


class Role(IntEnum):
    DRAFT = 0
    TARGET = 1

    @property
    def label(self) -> str:
        """"draft" or "target": the name results and the HTTP API use."""
        return self.name.lower()

    @property
    def other(self) -> "Role":
        return Role(1 - self)
