"""In-memory merging: every candidate is written in place into one working model.

No disk writes, no reload, no model copy per trial: memory is theta_base and the task vectors (in
the store dtype, LoRA factored) + the working model, whatever the number of trials. Each tensor is
merged in float32 from its stored base and deltas (read as float32 inside the arithmetic; a LoRA
delta is multiplied out a row block at a time, or for its tensor only), and rounded once into the
working model.
The models a merge is judged against (the base, each source alone) are candidates of plain task
arithmetic on the same merger.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from optimize.deltas import Delta, TaskVector, stored
from optimize.methods import Candidate, MergeMethod, TaskArithmetic
from optimize.sources import Base

PLAIN = TaskArithmetic(normalize=False)  # theta_base + sum_t w_t tau_t: references, naive merges


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
    def apply(self, candidate: Candidate, method: MergeMethod | None = None) -> torch.nn.Module:
        """Write `candidate`, merged by `method` (default: the search's), into the working model."""
        method = method or self.method
        for name, p, g in self.params:
            out = p.data if method.rounds_once else self._buffer(p)
            taus = self._deltas(name) if method.reads_rows else self._taus(name)
            method.merge(name, g, self.base.weights[name], taus, candidate, out)
            if out is not p.data:
                p.data.copy_(out)
        return self.base.model

    @contextmanager
    def applied(self, candidate: Candidate, method: MergeMethod | None = None):
        """`with merger.applied(c) as model:` the working model holding `c` (until the next apply)."""
        yield self.apply(candidate, method)

    @torch.no_grad()
    def merged_delta(self, candidate: Candidate, method: MergeMethod | None = None) -> TaskVector:
        """tau_m = theta_m - theta_base in float32 straight from the merge formula (exact, even
        when the working model is bf16); tensors the merge leaves at the base are absent."""
        method, out = method or self.method, {}
        for name, _, g in self.params:
            base = self.base.weights[name].float()
            merged = torch.empty_like(base)
            method.merge(name, g, self.base.weights[name], self._taus(name), candidate, merged)
            if not torch.equal(merged, base):
                out[name] = merged - base
        return out

    @torch.no_grad()
    def gradient(self, candidate: Candidate, method: MergeMethod | None = None) -> np.ndarray:
        """dL/d(the method's grad_field) per source and group ([n_sources, n_groups] for weights,
        [n_groups] for t), from dL/dtheta held in the working model's `.grad` (after a backward
        pass through the model holding `candidate`); docs/method.md §5.5."""
        method = method or self.method
        field = getattr(candidate, method.grad_field)
        out = np.zeros(field.shape)
        for name, p, g in self.params:
            if p.grad is not None:
                taus = self._taus(name)
                out[..., g] += method.coefficient_grad(
                    name, g, self.base.weights[name], taus, candidate, p.grad
                )
        return out

    def changed(self, method: MergeMethod | None = None) -> list[torch.nn.Parameter]:
        """The working model's parameters that depend on the merge coefficients."""
        method = method or self.method
        return [p for name, p, _ in self.params if method.depends([name in tv for tv in self.task_vectors])]

    def _taus(self, name: str) -> list[torch.Tensor | None]:
        return [stored(tv[name]) if name in tv else None for tv in self.task_vectors]

    def _deltas(self, name: str) -> list[Delta | None]:
        return [tv.get(name) for tv in self.task_vectors]

    def uniform(self, weight: float) -> Candidate:
        """Every source at `weight` in every group (weight 0: the base)."""
        return Candidate(weight=np.full((len(self.task_vectors), self.base.groups.n), float(weight)))

    def references(self) -> list[tuple[int | None, Candidate]]:
        """The base (index None) and each source alone (theta_base + tau_i), to merge with PLAIN."""
        out = [(None, self.uniform(0))]
        for i in range(len(self.task_vectors)):
            alone = self.uniform(0)
            alone.weight[i] = 1
            out.append((i, alone))
        return out
