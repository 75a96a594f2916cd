"""The Optuna study of a search: sampler and pruner from the config, the signature that keeps a
resumed or shared study comparable, the names of its values (shown by optuna-dashboard), and the
pick of the chosen trial."""

from __future__ import annotations

import hashlib
import json
import sys
import warnings

import numpy as np
import optuna

from core.cli import redact
from core.errors import ConfigError
from optimize.context import model_fingerprints
from optimize.objective import describe, describe_weighted, prunes, violation, weighted_loss
from optimize.registry import SAMPLERS
from optimize.storage import sqlite_url
from optimize.workers import searched_trials, worker_id


def default_storage(cfg) -> str:
    return sqlite_url(cfg.run_dir / "study.db")


def metric_names(search) -> list[str]:
    """The name of each value a trial returns, as optuna-dashboard and Optuna's plots show it."""
    if search.objective == "pareto":
        return ["L_align", "L_domain"] + (["L_help"] if search.beta else [])
    return [describe(search)]


def trials_frame(study: optuna.Study):
    """study.trials_dataframe() with the value columns it has when values are not named (`value`,
    or `values_0`, `values_1`): trials.csv keeps one header whatever the objective."""
    names = study.metric_names or []
    if len(names) == 1:
        renames = {f"value_{names[0]}": "value"}
    else:
        renames = {f"values_{name}": f"values_{i}" for i, name in enumerate(names)}
    return study.trials_dataframe().rename(columns=renames)


def make_sampler(cfg, space, seed: int | None) -> optuna.samplers.BaseSampler:
    return SAMPLERS[cfg.search.sampler](cfg.search, space.grid, seed)


def make_pruner(cfg, n_steps: int) -> optuna.pruners.BasePruner:
    if not prunes(cfg.search):
        return optuna.pruners.NopPruner()
    if cfg.search.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=max(1, n_steps // 4))
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=n_steps)


def open_study(cfg, storage, url: str, space, pruner, signature: dict) -> optuna.Study:
    """Create the study, or join it when it exists (a resumed run, or another worker's study).
    A worker that joins gets a sampler seed of its own: with the configured one it would draw
    the same candidates as the worker that created the study (or as the run it resumes)."""
    directions = ["minimize"] * len(metric_names(cfg.search))
    name, seed = cfg.study_name or cfg.name, cfg.search.seed
    sampler = make_sampler(cfg, space, seed)  # a bad sampler setting fails before the study is made
    try:
        study = optuna.create_study(
            storage=storage, study_name=name, directions=directions, sampler=sampler, pruner=pruner
        )
        study.set_user_attr("signature", signature)
        if cfg.search.enqueue_initial and cfg.search.sampler not in ("grid", "gradient"):  # gradient: its own
            study.enqueue_trial(space.initial_params())
            if cfg.search.constrain.enabled and space.aligned:
                study.enqueue_trial(space.anchor_params())
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(storage=storage, study_name=name, pruner=pruner)
        if seed is not None:
            mix = f"{seed}/{len(study.trials)}/{worker_id()}".encode()
            seed = int.from_bytes(hashlib.sha256(mix).digest()[:4], "little")
        study.sampler = make_sampler(cfg, space, seed)
    old = study.user_attrs.get("signature")
    if old is None:  # joined in the instant between its creation and its signature
        study.set_user_attr("signature", old := signature)
    if isinstance(old, dict):  # a study made before a key existed is not compared on it
        signature = {k: v for k, v in signature.items() if k in old or k not in LATER_KEYS}
    if old != signature or [d.name.lower() for d in study.directions] != directions:
        differ = [k for k in signature if not isinstance(old, dict) or old.get(k) != signature[k]]
        lines = [
            f"  {k}: study has {old.get(k) if isinstance(old, dict) else old}, config asks {signature[k]}"
            for k in differ
        ]
        raise ConfigError(
            f"study {name!r} in {redact(url)} was made with other settings, so its trials are not "
            "comparable with this config's:\n" + "\n".join(lines) + "\nUse another --study-name or "
            "--out, or delete the old study"
        )
    if study.metric_names is None:  # also names the values of a study made before they were named
        with warnings.catch_warnings():  # Optuna calls set_metric_names experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(metric_names(cfg.search))
    print(f"[alignmerge] worker {worker_id()}, sampler seed {seed}", file=sys.stderr)
    return study


def study_signature(ctx) -> dict:
    """What must not change when a study is resumed or joined: whatever makes two trials'
    values comparable (models, merge, objective, search space, the scored data)."""
    cfg, s, m = ctx.cfg, ctx.cfg.search, ctx.cfg.merge
    used = {k: v for k, v in ctx.rows.items() if k in ctx.scorer.examples}
    data = json.dumps([used, cfg.data.max_length], sort_keys=True, default=str).encode()
    return {
        "sources": [f"{src.name} ({src.role})" for src in cfg.sources],  # not paths: they may
        # differ between the machines of a multi-worker study; the weights' content may not
        "weights": hashlib.sha256(json.dumps(model_fingerprints(cfg), sort_keys=True).encode()).hexdigest()[
            :12
        ],
        "merge": f"{m.method} normalize={cfg.normalize} lambda={m.lambda_} seed={m.seed}",
        "objective": f"{s.objective} score={s.score} alpha={s.alpha if s.objective == 'weighted' else None}"
        + (f" beta={s.beta}" if s.beta else "")  # studies made before beta existed keep their signature
        + (f" constrain={s.constrain.harmful},{s.constrain.benign}" if s.constrain.enabled else ""),
        "params": hashlib.sha256(
            json.dumps(sorted(n for names in ctx.space.params.values() for n in names)).encode()
        ).hexdigest()[:12]
        + f" ({ctx.space.n_params} parameters: {ctx.space.describe()})",
        "data": hashlib.sha256(data).hexdigest()[:12]
        + f" ({', '.join(f'{len(v)} {k}' for k, v in used.items())})",
        # losses in bfloat16 and float32 differ by as much as trials do (dtype auto resolves per machine)
        "precision": "compute {}, store {}".format(
            *(
                str(d).removeprefix("torch.")
                for d in (ctx.base.model.dtype, next(iter(ctx.base.weights.values())).dtype)
            )
        ),
    }


LATER_KEYS = {"precision"}  # signature keys added later: not compared with a study that lacks them


COMPLETE = optuna.trial.TrialState.COMPLETE
LOSS_NAMES = ("alignment", "domain", "helpfulness")


def pareto_front(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """`study.best_trials` among the search's own trials: the restored points left out."""
    done = searched_trials(study, (COMPLETE,))
    if any(t.constraints for t in done):
        done = [t for t in done if violation(t) == 0]

    def dominated(t) -> bool:
        return any(all(a <= b for a, b in zip(o.values, t.values)) and o.values != t.values for o in done)

    return [t for t in done if not dominated(t)]


def ranked(study: optuna.Study, search) -> list[optuna.trial.FrozenTrial]:
    """Finished trials of the search (not the verified pick's restored points), best first. Single
    objective: the trials meeting their constraints (`search.constrain`) first, each group by
    value. Multi-objective: the Pareto front of those trials by the weighted loss; when none meets
    them, every trial by how far it misses."""
    done = [t for t in searched_trials(study, (COMPLETE,)) if all(map(np.isfinite, t.values))]
    if len(study.directions) == 1:
        return sorted(done, key=lambda t: (violation(t), t.value, t.number))
    front = pareto_front(study)
    if not front:
        return sorted(done, key=lambda t: (violation(t), t.number))
    return sorted(front, key=lambda t: weighted_loss(search, dict(zip(LOSS_NAMES, t.values))))


def choose(study: optuna.Study, cfg) -> tuple[optuna.trial.FrozenTrial, list, str]:
    """The chosen trial, the Pareto front (multi-objective) and the rule used, in words."""
    first = ranked(study, cfg.search)[0]
    if violation(first) > 0:
        return first, [], "no trial met search.constrain: the one closest to it"
    among = " among the trials meeting search.constrain" if cfg.search.constrain.enabled else ""
    if len(study.directions) == 1:
        return first, [], "lowest objective" + among
    front = pareto_front(study)
    values = np.array([t.values for t in front])  # (points, objectives): align, domain[, help]
    if cfg.search.pareto_rule == "weighted":
        losses = dict(zip(LOSS_NAMES, values.T))
        i = int(np.argmin(weighted_loss(cfg.search, losses)))
        rule = f"front point with the lowest {describe_weighted(cfg.search)}" + among
    else:
        low, high = values.min(0), values.max(0)
        scaled = (values - low) / np.where(high > low, high - low, 1)
        i = int(np.argmin(np.linalg.norm(scaled, axis=1)))
        rule = "knee: front point closest to the ideal point after scaling every loss to [0, 1]" + among
    return front[i], front, rule
