"""The search space: which numbers a trial picks, and how they become per-group coefficients.

Per source (and per searched field: weight, density; or t for slerp / mergealign):
  global       one value for every group
  layerwise    one value per group (embeddings, each block, final norm, lm_head)
  blocks:K     the transformer blocks cut into K contiguous runs, one value each; embeddings,
               final norm and lm_head keep their own value
  gradient:K   K control points spread evenly over depth, linearly interpolated to every group
               (like a mergekit gradient list)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import optuna

from core.errors import ConfigError
from optimize.config import Config
from optimize.methods import Candidate
from optimize.sources import Groups


@dataclass(frozen=True)
class Axis:
    field: str  # weight | density | t
    source: str | None  # None for t
    parametrization: str
    low: float
    high: float
    step: float | None = None

    @property
    def prefix(self) -> str:
        return self.field if self.source is None else f"{self.field}[{self.source}]"


def _blocks(groups: Groups, k: int) -> list[list[int]]:
    layers = groups.layer_groups()
    if k > len(layers):
        raise ConfigError(f"blocks:{k} asks for more blocks than the model has layers ({len(layers)})")
    return [list(map(int, b)) for b in np.array_split(layers, k)]


def axis_params(axis: Axis, groups: Groups) -> list[str]:
    """The Optuna parameter names of one axis, in depth order."""
    kind, _, k = axis.parametrization.partition(":")
    if kind == "global":
        return [axis.prefix]
    if kind == "layerwise":
        return [f"{axis.prefix}.{g}" for g in groups.names]
    if kind == "blocks":
        others = [g for i, g in enumerate(groups.names) if i not in groups.layer_groups()]
        return [f"{axis.prefix}.block{j}" for j in range(len(_blocks(groups, int(k))))] + [
            f"{axis.prefix}.{g}" for g in others
        ]
    if int(k) > groups.n:
        raise ConfigError(
            f"gradient:{k} asks for more control points than the model has groups ({groups.n}); "
            "use layerwise, or fewer points"
        )
    return [f"{axis.prefix}.cp{j}" for j in range(int(k))]


def expand(axis: Axis, values: list[float], groups: Groups) -> np.ndarray:
    """Per-group profile of one axis from its parameter values (in `axis_params` order)."""
    kind, _, k = axis.parametrization.partition(":")
    n = groups.n
    if kind == "global":
        return np.full(n, values[0])
    if kind == "layerwise":
        return np.asarray(values, dtype=float)
    if kind == "blocks":
        blocks = _blocks(groups, int(k))
        out = np.empty(n)
        for b, v in zip(blocks, values):
            out[b] = v
        others = [i for i in range(n) if i not in groups.layer_groups()]
        out[others] = values[len(blocks) :]
        return out
    depth = np.linspace(0, 1, n) if n > 1 else np.zeros(1)
    return np.interp(depth, np.linspace(0, 1, int(k)), values)


class SearchSpace:
    def __init__(self, cfg: Config, groups: Groups, searched: tuple[str, ...]):
        s = cfg.search
        self.groups, self.search = groups, s
        self.sources = [src.name for src in cfg.sources]
        self.aligned = [src.name for src in cfg.sources if src.role == "alignment"]
        if s.sampler == "grid":  # densities are the grid's own values
            self.density_levels = tuple(sorted(v for v in s.grid if 0 < v <= 1)) or (1.0,)
            step = None
        else:
            self.density_levels = _grid(s.density.low, s.density.high, s.density_step)
            step = s.density_step
        axes = []
        if "t" in searched:
            axes.append(Axis("t", None, s.parametrization, s.weight.low, s.weight.high))
        for src in cfg.sources:
            p = cfg.parametrization_of(src)
            if "weight" in searched:
                axes.append(Axis("weight", src.name, p, s.weight.low, s.weight.high))
            if "density" in searched:
                axes.append(
                    Axis("density", src.name, p, self.density_levels[0], self.density_levels[-1], step)
                )
        self.axes = axes
        self.params = {a: axis_params(a, groups) for a in axes}
        # 1/N by default (mergekit-evolve), inside the searched bounds
        init = (
            s.init_weight
            if s.init_weight is not None
            else min(max(1 / len(self.sources), s.weight.low), s.weight.high)
        )
        self.initial = {"weight": init, "density": self.density_levels[-1], "t": 0.5}
        self.full_weight = min(1.0, s.weight.high)  # an alignment source's weight at its anchor
        # the t of the alignment vector alone: mergealign's t scales tau_domain; slerp's moves from
        # its first source to its second
        slerp_toward_second = cfg.merge.method == "slerp" and self.sources[0] not in self.aligned
        self.aligned_t = s.weight.high if slerp_toward_second else s.weight.low

    @property
    def n_params(self) -> int:
        return sum(len(v) for v in self.params.values())

    def suggest(self, trial: optuna.Trial | optuna.trial.FixedTrial) -> Candidate:
        fields: dict[str, list[np.ndarray]] = {}
        for axis, names in self.params.items():
            values = [trial.suggest_float(n, axis.low, axis.high, step=axis.step) for n in names]
            fields.setdefault(axis.field, []).append(expand(axis, values, self.groups))
        return Candidate(
            weight=np.stack(fields["weight"]) if "weight" in fields else None,
            density=np.stack(fields["density"]) if "density" in fields else None,
            t=fields["t"][0] if "t" in fields else None,
        )

    def decode(self, params: dict[str, float]) -> Candidate:
        return self.suggest(optuna.trial.FixedTrial(params))

    def param_gradient(self, field: str, grad: np.ndarray) -> dict[str, float]:
        """The gradient of a loss w.r.t. the Optuna parameters of `field`'s axes, from its gradient
        per group (`InMemoryMerger.gradient`): every parametrization is linear in its values, so
        it is the transposed expansion (J^T g, J[group, param] = d profile / d value)."""
        out = {}
        for axis, names in self.params.items():
            if axis.field != field:
                continue
            per_group = grad if axis.source is None else grad[self.sources.index(axis.source)]
            jacobian = np.stack([expand(axis, list(e), self.groups) for e in np.eye(len(names))], axis=1)
            out.update(zip(names, (jacobian.T @ per_group).tolist()))
        return out

    def field_bounds(self, field: str) -> dict[str, tuple[float, float]]:
        """The Optuna parameters of `field`'s axes and their bounds."""
        return {n: (a.low, a.high) for a, names in self.params.items() if a.field == field for n in names}

    def initial_params(self) -> dict[str, float]:
        return {n: self.initial[a.field] for a, names in self.params.items() for n in names}

    def anchor_params(self) -> dict[str, float]:
        """The initial point with every alignment source at weight 1 (or its bound): the second
        start of a constrained search, near its feasible region by construction (the bound is the
        alignment source's own refusal mass; docs/method.md §4.2)."""
        return {
            n: self.full_weight if a.field == "weight" and a.source in self.aligned else self.initial[a.field]
            for a, names in self.params.items()
            for n in names
        }

    def toward_alignment(self, params: dict[str, float], t: float) -> dict[str, float]:
        """The point a fraction `t` of the way from `params` to the alignment sources alone: their
        weights go to 1 (or the bound) and their densities to the top level, every other source's
        weight to its lower bound (its density stays), t (mergealign, slerp) to the alignment
        source's end. Densities snap to their levels (docs/method.md §4.3)."""
        out = {}
        for axis, names in self.params.items():
            aligned = axis.source in self.aligned
            for n in names:
                v = params[n]
                if axis.field == "weight":
                    end = self.full_weight if aligned else axis.low
                elif axis.field == "density":
                    end = axis.high if aligned else v
                else:
                    end = self.aligned_t
                x = v + t * (end - v)
                if axis.field == "density":
                    x = min(self.density_levels, key=lambda level: abs(level - x))
                out[n] = float(x)
        return out

    def grid(self) -> dict[str, list[float]]:
        values = self.search.grid
        out = {}
        for axis, names in self.params.items():
            allowed = [v for v in values if axis.low <= v <= axis.high]
            if not allowed:
                raise ConfigError(
                    f"search.grid {values} has no value inside the bounds of "
                    f"{axis.prefix} [{axis.low}, {axis.high}]"
                )
            for n in names:
                out[n] = allowed
        return out

    def describe(self) -> str:
        parts = [
            f"{a.prefix}: {a.parametrization} ({len(n)} params, [{a.low}, {a.high}])"
            for a, n in self.params.items()
        ]
        return "; ".join(parts)


def _grid(low: float, high: float, step: float) -> tuple[float, ...]:
    """Density values on the step grid inside [low, high] (at least one)."""
    first = np.ceil(low / step - 1e-9) * step
    levels = [round(x, 6) for x in np.arange(first, high + 1e-9, step) if x > 0]
    return tuple(levels) or (round(high, 6),)
