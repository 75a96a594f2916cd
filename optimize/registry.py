"""The facts of every merge method and every sampler, declared once (torch-free, so a config is
checked without loading torch). The merge arithmetic is in `optimize.methods`, the equations in
docs/method.md §2; samplers are Optuna's, built here by name (docs/method.md §5)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import optuna

from core.errors import ConfigError


@dataclass(frozen=True)
class MethodFacts:
    name: str
    searched: tuple[str, ...]  # the Candidate fields a search fills: weight, density, t
    normalize: bool  # mergekit's default for `normalize`
    n_sources: int | None = None  # exactly this many sources, when the method needs it
    roles: tuple[str, ...] | None = None  # exactly these source roles (sorted), when needed
    # The field whose gradient the method gives (linear in it once masks and signs are fixed;
    # docs/method.md §5.5); None: no gradient (slerp).
    grad_field: str | None = "weight"


MERGE_METHODS: dict[str, MethodFacts] = {
    f.name: f
    for f in (
        MethodFacts("linear", ("weight",), normalize=True),
        MethodFacts("task_arithmetic", ("weight",), normalize=False),
        MethodFacts("ties", ("weight", "density"), normalize=True),
        MethodFacts("dare_ties", ("weight", "density"), normalize=False),
        MethodFacts("dare_linear", ("weight", "density"), normalize=False),
        MethodFacts("slerp", ("t",), normalize=False, n_sources=2, grad_field=None),
        MethodFacts("mergealign", ("t",), normalize=False, roles=("alignment", "domain"), grad_field="t"),
    )
}
METHOD_NAMES = tuple(MERGE_METHODS)


def check_sources(method: str, roles: list[str]) -> str | None:
    """Why `method` cannot merge sources with these roles (None: it can)."""
    facts = MERGE_METHODS[method]
    if facts.n_sources is not None and len(roles) != facts.n_sources:
        return f"merge.method {method} needs exactly {facts.n_sources} sources, got {len(roles)}"
    if facts.roles is not None and tuple(sorted(roles)) != facts.roles:
        wanted = " and ".join(f"one with role: {r}" for r in facts.roles)
        return (
            f"merge.method {method} needs exactly {len(facts.roles)} sources, {wanted} "
            f"(got roles {sorted(roles)})"
        )
    return None


# A sampler factory gets the search settings (`optimize.config.Search`), a function giving the
# grid of the search space (only the grid sampler calls it) and the seed.
SamplerFactory = Callable[[object, Callable[[], dict], int | None], optuna.samplers.BaseSampler]


def _grid(search, grid: Callable[[], dict], seed):
    points = grid()
    size = math.prod(len(v) for v in points.values())
    if size > 100_000:
        raise ConfigError(
            f"search.sampler grid over {len(points)} parameters has {size} points; "
            "use parametrization: global, or fewer search.grid values"
        )
    return optuna.samplers.GridSampler(points, seed=seed)


SAMPLERS: dict[str, SamplerFactory] = {
    "tpe": lambda s, grid, seed: optuna.samplers.TPESampler(seed=seed, multivariate=True),
    "cmaes": lambda s, grid, seed: optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False),
    "nsga2": lambda s, grid, seed: optuna.samplers.NSGAIISampler(
        seed=seed, population_size=max(4, min(50, s.n_trials // 4))
    ),
    "gp": lambda s, grid, seed: optuna.samplers.GPSampler(seed=seed, warn_independent_sampling=False),
    "random": lambda s, grid, seed: optuna.samplers.RandomSampler(seed=seed),
    "grid": _grid,
    # Projected Adam with exact gradients (`optimize.gradient`): its steps are enqueued trials, so
    # Optuna's own sampler only draws what a step does not fix (nothing, in practice).
    "gradient": lambda s, grid, seed: optuna.samplers.RandomSampler(seed=seed),
}
SAMPLER_NAMES = tuple(SAMPLERS)
SINGLE_OBJECTIVE_SAMPLERS = ("cmaes", "gradient")
