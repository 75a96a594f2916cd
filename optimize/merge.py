"""In-memory merging: every candidate is written in place into one working model.

No disk writes, no reload, no model copy per trial: memory is theta_base (float32) + the task
vectors + the working model, whatever the number of trials.
"""

from __future__ import annotations

import torch

from optimize.methods import Candidate, MergeMethod
from optimize.sources import Base, TaskVector


class InMemoryMerger:
    def __init__(self, base: Base, task_vectors: list[TaskVector], method: MergeMethod):
        self.base, self.task_vectors, self.method = base, task_vectors, method
        self.params = [(n, p, base.groups.of_param[n]) for n, p in base.model.named_parameters()]
        # Parameters of another dtype (bf16 scoring) are merged in float32 in a scratch buffer.
        self._scratch: dict[tuple, torch.Tensor] = {}

    @property
    def model(self) -> torch.nn.Module:
        return self.base.model

    def _buffer(self, p: torch.Tensor) -> torch.Tensor:
        if p.dtype == torch.float32:
            return p.data
        key = (tuple(p.shape), p.device)
        if key not in self._scratch:
            self._scratch[key] = torch.empty(p.shape, dtype=torch.float32, device=p.device)
        return self._scratch[key]

    @torch.no_grad()
    def apply(self, candidate: Candidate) -> torch.nn.Module:
        for name, p, g in self.params:
            out = self._buffer(p)
            taus = [tv.get(name) for tv in self.task_vectors]
            self.method.merge(name, g, self.base.weights[name], taus, candidate, out)
            if out is not p.data:
                p.data.copy_(out)
        return self.base.model

    @torch.no_grad()
    def restore_base(self) -> None:
        for name, p, _ in self.params:
            p.data.copy_(self.base.weights[name])

    def merged_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p, _ in self.params}
