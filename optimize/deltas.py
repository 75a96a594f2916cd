"""What a source changes, as held in memory: a dense delta (a tensor in the store dtype) or a LoRA
delta kept factored (`LowRank`), and how the merge reads either a block of rows at a time
(docs/memory.md)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from core.errors import ModelLoadError


@dataclass(frozen=True)
class LowRank:
    """A LoRA delta kept factored: tau = scaling * B @ A (transposed for fan_in_fan_out layers),
    as peft's `lora.Linear.get_delta_weight` computes it. r * (in + out) numbers, not in * out."""

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scaling: float
    fan_in_fan_out: bool = False

    @property
    def nbytes(self) -> int:
        return self.A.nbytes + self.B.nbytes

    @property
    def shape(self) -> tuple[int, int]:
        out, in_ = self.B.shape[0], self.A.shape[1]
        return (in_, out) if self.fan_in_fan_out else (out, in_)

    @property
    def device(self) -> torch.device:
        return self.A.device

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the delta, in float32: a merge multiplies out a block at a time."""
        if self.fan_in_fan_out:  # (B @ A).T's rows are B @ A's columns
            return self.A[:, start:stop].float().T @ (self.B.float() * self.scaling).T
        return (self.B[start:stop].float() * self.scaling) @ self.A.float()  # scaled while r wide

    def dense(self) -> torch.Tensor:
        return self.rows(0, self.shape[0])


Delta = torch.Tensor | LowRank
TaskVector = dict[str, Delta]  # parameter name -> delta; absent names have delta 0


def dense(delta: Delta) -> torch.Tensor:
    """A stored delta as a float32 tensor."""
    return delta.dense() if isinstance(delta, LowRank) else delta.float()


def rows(delta: Delta, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a stored delta: a view of a dense one, a LoRA one multiplied out."""
    return delta.rows(start, stop) if isinstance(delta, LowRank) else delta[start:stop]


def stored(delta: Delta) -> torch.Tensor:
    """A stored delta as the tensor the merge methods take: dense ones as stored (the methods read
    them as float32), LoRA factors multiplied out (float32)."""
    return delta.dense() if isinstance(delta, LowRank) else delta


class DenseView(Mapping):
    """A task vector read as float32 tensors, one at a time on access (for analysis code)."""

    def __init__(self, tv: TaskVector):
        self.tv = tv

    def __getitem__(self, name: str) -> torch.Tensor:
        return dense(self.tv[name])

    def __iter__(self):
        return iter(self.tv)

    def __len__(self) -> int:
        return len(self.tv)


def stored_bytes(tv: TaskVector) -> int:
    return sum(d.nbytes for d in tv.values())


def check_finite(what: str, tensors: Mapping[str, Delta]) -> None:
    """Refuse weights holding NaN or inf (a diverged fine-tune, a corrupt copy): every merge and
    every loss would be NaN, and the search would fail trial after trial."""
    for n, d in tensors.items():
        parts = (d.A, d.B) if isinstance(d, LowRank) else (d,)
        if not all(torch.isfinite(t).all() for t in parts):
            raise ModelLoadError(
                f"{what}: {n} holds NaN or infinite values; the model is corrupt or its training "
                "diverged: use another checkpoint"
            )
