"""The objective of a search, written once (docs/method.md §4), and the trial that evaluates it.

  weighted   L = L_align + alpha * L_domain + beta * L_help
             (Hammoud et al., arXiv 2406.14563: alpha = 0.3, beta = 0; L_help: this project)
  score      `domain` (the EvoMM baseline) or `alignment`: that loss alone
  pareto     (L_align, L_domain), or (L_align, L_domain, L_help) when beta > 0

L_align, L_domain and L_help are the mean response-token cross-entropies of the candidate on the
alignment, domain and helpfulness *search* splits (`eval.loss.Scorer`, docs/method.md §3). Every
trial also records each set's refusal-opening mass (`refusal_mass_<set>`): on the helpfulness
set it is the cheap over-refusal signal, read from the same forward pass. With `search.constrain`
the masses are Optuna constraints (docs/method.md §4.2).
"""

from __future__ import annotations

import math
import time

import optuna

from core.errors import ConfigError
from eval.loss import means
from optimize.merge import PLAIN
from optimize.workers import is_surplus, worker_id


def loss_weights(search) -> dict[str, float]:
    """The single objective as a weighted sum of the set losses (what the gradient descends)."""
    if search.score != "both":
        return {search.score: 1.0}
    return {"alignment": 1.0, "domain": search.alpha} | ({"helpfulness": search.beta} if search.beta else {})


def check_minibatches(search, sets: dict[str, list]) -> None:
    """Every minibatch needs one example of each weighted set: checked on the rows before any model
    loads, and on the examples the scorer kept."""
    if search.sampler != "gradient":
        return
    sizes = {name: len(sets.get(name, ())) for name, w in loss_weights(search).items() if w}
    smallest = min(sizes, key=sizes.get)
    if search.gradient.minibatches > sizes[smallest]:
        raise ConfigError(
            f"search.gradient.minibatches is {search.gradient.minibatches}, but the {smallest} search set "
            f"has {sizes[smallest]} examples and every minibatch needs one of each set; set it to at most "
            f"{sizes[smallest]} (or 1: whole-split steps)"
        )


def weighted_loss(search, losses: dict[str, float]):
    """L_align + alpha * L_domain + beta * L_help (numbers or arrays)."""
    value = losses["alignment"] + search.alpha * losses["domain"]
    return value + search.beta * losses["helpfulness"] if search.beta else value


def objective_value(search, losses: dict[str, float]):
    """The value Optuna minimizes for `losses` under the search settings (`optimize.config.Search`)."""
    if search.objective == "pareto":
        pair = losses["alignment"], losses["domain"]
        return (*pair, losses["helpfulness"]) if search.beta else pair
    if search.score == "domain":
        return losses["domain"]
    if search.score == "alignment":
        return losses["alignment"]
    return weighted_loss(search, losses)


def describe(search) -> str:
    """The objective in words, for reports and study signatures."""
    if search.objective == "pareto":
        return f"pareto (L_align, L_domain{', L_help' if search.beta else ''})"
    if search.score != "both":
        return f"L_{'align' if search.score == 'alignment' else 'domain'}"
    return describe_weighted(search)


def describe_weighted(search) -> str:
    return f"L_align + {search.alpha} L_domain" + (f" + {search.beta} L_help" if search.beta else "")


def prunes(search) -> bool:
    """Whether trials are pruned: never for several objectives (Optuna cannot), nor under
    `search.constrain` (a pruned trial has no refusal masses, and Optuna's samplers count a trial
    without constraint values as feasible: TPE would sample toward the pruned, worst trials)."""
    return search.objective == "weighted" and search.pruner != "none" and not search.constrain.enabled


def refusal_bounds(ctx, study: optuna.Study) -> dict[str, float]:
    """search.constrain's bounds on a trial's mean refusal masses: on the harmful search prompts at
    least `harmful` x the alignment source's own mass, on the benign ones at most `benign`. The
    source's mass is measured once per study (one forward pass) and kept in it, so a resumed or
    joined study keeps its bounds. {} when search.constrain is off."""
    c = ctx.cfg.search.constrain
    if not c.enabled:
        return {}
    own = study.user_attrs.get("alignment_source_refusal_mass")
    if own is None:
        i = [s.role for s in ctx.cfg.sources].index("alignment")
        model = ctx.merger.apply(dict(ctx.merger.references())[i], PLAIN)
        own = means(ctx.scorer_for({"alignment": ctx.rows["alignment"]}).score(model)[1])["alignment"]
        study.set_user_attr("alignment_source_refusal_mass", own)
    return {"harmful_min": c.harmful * own, "benign_max": c.benign}


def constraint_values(bounds: dict[str, float], masses: dict[str, float]) -> dict[str, float]:
    """Optuna's convention: a constraint value <= 0 is met. {} without bounds."""
    if not bounds:
        return {}
    return {
        "harmful_refusal_mass": bounds["harmful_min"] - masses["alignment"],
        "benign_refusal_mass": masses["helpfulness"] - bounds["benign_max"],
    }


def scored_attrs(losses: dict[str, float], masses: dict[str, float]) -> dict[str, float]:
    """What a trial records of its scoring: each set's loss and refusal-opening mass."""
    return {f"{k}_loss": v for k, v in losses.items()} | {f"refusal_mass_{k}": v for k, v in masses.items()}


def violation(trial: optuna.trial.FrozenTrial) -> float:
    """How far a finished trial is from meeting its constraints (0: feasible, or none set)."""
    return sum(max(0.0, v) for v in trial.constraints.values())


def make_trial(ctx, score=None):
    """The function Optuna calls per trial: suggest a candidate, merge it in place, score it
    (pruned on the running batch losses when the objective is single), record the losses.
    `score(trial, model, candidate, on_batch)` -> (per-example losses, masses) replaces the
    plain scoring (the gradient search scores with a backward pass)."""
    cfg = ctx.cfg
    prune = prunes(cfg.search)
    sets = ("alignment", "domain", "helpfulness")

    def trial_fn(trial: optuna.Trial):
        trial.set_user_attr("worker", worker_id())
        if is_surplus(trial.study, trial, cfg.search.n_trials):
            trial.set_user_attr("surplus", True)
            trial.set_user_attr("fail_reason", "not run: other workers had taken the last slots")
            trial.study.stop()
            return float("nan")
        t0 = time.perf_counter()
        candidate = ctx.space.suggest(trial)
        model = ctx.merger.apply(candidate)
        t1 = time.perf_counter()

        def on_batch(step, so_far):
            if not prune:
                return
            partial = {k: sum(v) / len(v) for k, v in so_far.items() if v}
            partial = {k: partial.get(k, 0.0) for k in sets}
            trial.report(objective_value(cfg.search, partial), step)
            if trial.should_prune():
                raise optuna.TrialPruned()

        if score is None:
            per_example, mass = ctx.scorer.score(model, on_batch=on_batch)
        else:
            per_example, mass = score(trial, model, candidate, on_batch)
        losses, masses = means(per_example), means(mass)
        t2 = time.perf_counter()
        for k, v in scored_attrs(losses, masses).items():
            trial.set_user_attr(k, v)
        for k, v in constraint_values(ctx.refusal_bounds, masses).items():
            trial.set_constraint(k, v)
        trial.set_user_attr("merge_s", round(t1 - t0, 4))
        trial.set_user_attr("score_s", round(t2 - t1, 4))
        value = objective_value(cfg.search, losses)
        values = value if isinstance(value, tuple) else (value,)
        if not all(math.isfinite(v) for v in values):
            trial.set_user_attr("fail_reason", f"non-finite loss {losses}")
            return float("nan")  # Optuna records the trial as failed and goes on
        return value

    return trial_fn
