"""`python -m optimize.search --config configs/X.yaml`: the safety-aware merge search.

Every trial merges a candidate in memory and scores it on the alignment and domain *search*
sets; the objective is L_align + alpha * L_domain (`weighted`, papers.md Eq. 5) or both losses
(`pareto`). The study lives in the run folder (SQLite) unless --storage names another Optuna
storage; running the same command again resumes it.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import math
import os
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import torch
from optuna.storages import fail_stale_trials
from optuna.trial import TrialState
from safetensors import SafetensorError
from tqdm.auto import tqdm

from eval.data import DataError, load_pairs
from eval.loss import Scorer
from eval.models import (
    ModelLoadError,
    model_format,
    resolve_device,
    resolve_dtype,
    resolve_model_path,
)
from optimize.config import SAMPLERS, Config, ConfigError, load_config
from optimize.export import OutputError
from optimize.merge import InMemoryMerger
from optimize.methods import METHODS
from optimize.sources import Base, load_base, load_task_vectors
from optimize.space import SearchSpace
from optimize.storage import is_sqlite, open_storage, redact, worker_id

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


# ----------------------------------------------------------------------------- set-up
def check_inputs(cfg: Config) -> dict[str, list[dict]]:
    """Everything that can be checked without loading a model: paths, formats, data.
    Returns the raw alignment and domain rows."""
    check_models(cfg)
    return load_data(cfg)


def check_models(cfg: Config) -> None:
    """The base and every source exist and are readable models (headers only, no weights)."""
    for label, path in [("base", cfg.base)] + [(f"source {s.name!r}", s.path) for s in cfg.sources]:
        try:
            fmt = model_format(resolve_model_path(path), cfg.runtime.allow_pickle)
        except ModelLoadError as err:
            raise ModelLoadError(f"{label}: {err}") from None
        if label == "base" and fmt == "lora":
            raise ModelLoadError(f"base {path} is a LoRA adapter; the base must be a full model")


def load_data(cfg: Config) -> dict[str, list[dict]]:
    d = cfg.data
    folder = cfg.data_dir
    return {
        "alignment": load_pairs(
            d.alignment or folder, None if d.alignment else d.alignment_split, d.n_alignment
        ),
        "domain": load_pairs(d.domain or folder, None if d.domain else d.domain_split, d.n_domain),
    }


def load_test_data(cfg: Config) -> dict[str, list[dict]]:
    """The held-out test splits, when the run folder has them (they are never searched on)."""
    folder = cfg.data_dir
    out = {}
    for name in ("alignment", "domain"):
        try:
            out[name] = load_pairs(folder, f"{name}_test")
        except DataError:
            pass
    return out


@dataclass
class Context:
    """What a search needs in memory: built once, used by every trial."""

    cfg: Config
    base: Base
    merger: InMemoryMerger
    space: SearchSpace
    scorer: Scorer  # on the sets the objective uses
    rows: dict[str, list[dict]]
    timings: dict[str, float] = field(default_factory=dict)


def prepare(cfg: Config, rows: dict[str, list[dict]] | None = None) -> Context:
    rows = rows if rows is not None else check_inputs(cfg)
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    device, dtype = resolve_device(cfg.runtime.device), resolve_dtype(cfg.runtime.dtype)
    t0 = time.perf_counter()
    base = load_base(cfg.base, dtype, device, cfg.runtime.allow_pickle, cfg.runtime.trust_remote_code)
    t1 = time.perf_counter()
    tvs = load_task_vectors(cfg.sources, base, cfg.runtime.allow_pickle)
    t2 = time.perf_counter()
    s = cfg.search
    roles = tuple(src.role for src in cfg.sources)
    # The space decides the density grid, which the method caches masks for.
    space = SearchSpace(cfg, base.groups, METHODS[cfg.merge.method].searched)
    method = METHODS[cfg.merge.method](
        normalize=cfg.normalize,
        lambda_=cfg.merge.lambda_,
        seed=cfg.merge.seed,
        density_levels=space.density_levels,
        roles=roles,
    )
    used = {"both": ["alignment", "domain"], "domain": ["domain"], "alignment": ["alignment"]}[s.score]
    scorer = Scorer(
        base.tokenizer, {k: rows[k] for k in used}, cfg.data.max_length, cfg.data.batch_tokens, device
    )
    return Context(
        cfg,
        base,
        InMemoryMerger(base, tvs, method),
        space,
        scorer,
        rows,
        {"load_base_s": t1 - t0, "task_vectors_s": t2 - t1},
    )


# ----------------------------------------------------------------------------- study
def default_storage(cfg: Config) -> str:
    return f"sqlite:///{(cfg.run_dir / 'study.db').resolve()}"


def make_sampler(cfg: Config, space: SearchSpace, seed: int | None) -> optuna.samplers.BaseSampler:
    s = cfg.search
    if s.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if s.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if s.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, s.n_trials // 4)))
    if s.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, warn_independent_sampling=False)
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.sampler == "grid":
        grid = space.grid()
        size = math.prod(len(v) for v in grid.values())
        if size > 100_000:
            raise ConfigError(
                f"search.sampler grid over {len(grid)} parameters has {size} points; "
                "use parametrization: global, or fewer search.grid values"
            )
        return optuna.samplers.GridSampler(grid, seed=seed)
    raise ConfigError(f"search.sampler {s.sampler!r} is not one of {SAMPLERS}")


def make_pruner(cfg: Config, n_steps: int) -> optuna.pruners.BasePruner:
    if cfg.search.objective == "pareto" or cfg.search.pruner == "none":
        return optuna.pruners.NopPruner()  # Optuna cannot prune multi-objective trials
    if cfg.search.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=max(1, n_steps // 4))
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=n_steps)


def open_study(cfg: Config, storage, url: str, space: SearchSpace, pruner, signature: dict) -> optuna.Study:
    """Create the study, or join it when it exists (a resumed run, or another worker's study).
    A worker that joins gets a sampler seed of its own: with the configured one it would draw
    the same candidates as the worker that created the study (or as the run it resumes)."""
    directions = ["minimize", "minimize"] if cfg.search.objective == "pareto" else ["minimize"]
    name, seed = cfg.study_name or cfg.name, cfg.search.seed
    sampler = make_sampler(cfg, space, seed)  # a bad sampler setting fails before the study is made
    try:
        study = optuna.create_study(
            storage=storage, study_name=name, directions=directions, sampler=sampler, pruner=pruner
        )
        study.set_user_attr("signature", signature)
        if cfg.search.enqueue_initial and cfg.search.sampler != "grid":
            study.enqueue_trial(space.initial_params())
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(storage=storage, study_name=name, pruner=pruner)
        if seed is not None:
            mix = f"{seed}/{len(study.trials)}/{worker_id()}".encode()
            seed = int.from_bytes(hashlib.sha256(mix).digest()[:4], "little")
        study.sampler = make_sampler(cfg, space, seed)
    old = study.user_attrs.get("signature")
    if old is None:  # joined in the instant between its creation and its signature
        study.set_user_attr("signature", old := signature)
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
    print(f"[alignmerge] worker {worker_id()}, sampler seed {seed}", file=sys.stderr)
    return study


def study_signature(ctx: Context) -> dict:
    """What must not change when a study is resumed or joined: whatever makes two trials'
    values comparable (models, merge, objective, search space, the scored data)."""
    cfg, s, m = ctx.cfg, ctx.cfg.search, ctx.cfg.merge
    used = {k: v for k, v in ctx.rows.items() if k in ctx.scorer.examples}
    data = json.dumps([used, cfg.data.max_length], sort_keys=True, default=str).encode()
    return {
        "sources": [f"{src.name} ({src.role})" for src in cfg.sources],  # not paths: they may
        # differ between the machines of a multi-worker study
        "merge": f"{m.method} normalize={cfg.normalize} lambda={m.lambda_} seed={m.seed}",
        "objective": f"{s.objective} score={s.score} alpha={s.alpha if s.objective == 'weighted' else None}",
        "params": hashlib.sha256(
            json.dumps(sorted(n for names in ctx.space.params.values() for n in names)).encode()
        ).hexdigest()[:12]
        + f" ({ctx.space.n_params} parameters: {ctx.space.describe()})",
        "data": hashlib.sha256(data).hexdigest()[:12]
        + f" ({', '.join(f'{len(v)} {k}' for k, v in used.items())})",
    }


def objective_value(cfg: Config, losses: dict[str, float]):
    s = cfg.search
    if s.objective == "pareto":
        return losses["alignment"], losses["domain"]
    if s.score == "domain":
        return losses["domain"]
    if s.score == "alignment":
        return losses["alignment"]
    return losses["alignment"] + s.alpha * losses["domain"]


def make_objective(ctx: Context):
    cfg = ctx.cfg

    def objective(trial: optuna.Trial):
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
        prune = cfg.search.objective == "weighted" and cfg.search.pruner != "none"

        def on_batch(step, so_far):
            if not prune:
                return
            partial = {k: sum(v) / len(v) for k, v in so_far.items() if v}
            partial = {k: partial.get(k, 0.0) for k in ("alignment", "domain")}
            trial.report(objective_value(cfg, partial), step)
            if trial.should_prune():
                raise optuna.TrialPruned()

        losses = ctx.scorer.losses(model, on_batch=on_batch)
        t2 = time.perf_counter()
        for k, v in losses.items():
            trial.set_user_attr(f"{k}_loss", v)
        trial.set_user_attr("merge_s", round(t1 - t0, 4))
        trial.set_user_attr("score_s", round(t2 - t1, 4))
        value = objective_value(cfg, losses)
        values = value if isinstance(value, tuple) else (value,)
        if not all(math.isfinite(v) for v in values):
            trial.set_user_attr("fail_reason", f"non-finite loss {losses}")
            return float("nan")  # Optuna records the trial as failed and goes on
        return value

    return objective


class ProgressBar:
    """Finished trials of the study (every worker's) toward the target, with the best so far."""

    def __init__(self, total: int, done: int):
        self.bar = tqdm(total=total, initial=done, desc="trials", unit="trial")

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial):
        self.bar.n = n_finished(study)
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if len(study.directions) == 1 and complete:
            best = min(complete, key=lambda t: t.value)
            self.bar.set_postfix(best=f"{best.value:.4f}", trial=best.number)
        elif len(study.directions) > 1:
            self.bar.set_postfix(front=len(study.best_trials))
        self.bar.refresh()

    def close(self):
        self.bar.close()


class FailureGuard:
    """Stops a worker whose trials keep failing instead of retrying forever."""

    def __init__(self, limit: int):
        self.limit, self.failed, self.tripped = limit, 0, False

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial):
        if trial.state == TrialState.FAIL and not trial.user_attrs.get("surplus"):
            self.failed += 1
            if self.failed >= self.limit:
                print(
                    f"[alignmerge] {self.failed} trials failed in this worker; stopping "
                    "(see fail_reason in trials.csv)",
                    file=sys.stderr,
                )
                self.tripped = True
                study.stop()


def n_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def slots_left(study: optuna.Study, n_trials: int) -> int:
    """Trials this worker may still start: the target minus the trials finished or running in any
    worker. A trial waiting to be retried is always run (the next ask takes it)."""
    trials = study.get_trials(deepcopy=False, states=FINISHED + (TrialState.RUNNING, TrialState.WAITING))
    if any(t.state == TrialState.WAITING for t in trials):
        return max(1, n_trials - len(trials) + 1)
    return n_trials - len(trials)


def is_surplus(study: optuna.Study, trial: optuna.Trial, n_trials: int) -> bool:
    """True when workers raced at the end of the study and `trial` would exceed the target: the
    trials numbered before it, finished, running or waiting, already make n_trials. Numbers are
    given out atomically by the storage, so exactly one of two racing trials is surplus."""
    live = FINISHED + (TrialState.RUNNING, TrialState.WAITING)
    ahead = [t for t in study.get_trials(deepcopy=False, states=live) if t.number < trial.number]
    return len(ahead) >= n_trials


def other_workers(study: optuna.Study) -> set[str]:
    """Live workers (host:pid) other than this one that are running a trial of the study."""
    host, me = socket.gethostname(), worker_id()
    out = set()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        w = t.user_attrs.get("worker")
        if not w or w == me:
            continue
        w_host, _, pid = w.rpartition(":")
        if w_host != host or pid_alive(int(pid)):
            out.add(w)
    return out


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Quota:
    """Stops this worker once the study holds n_trials finished or running trials, so several
    workers together run exactly n_trials; warns once when workers share a SQLite file."""

    def __init__(self, n_trials: int, storage_url: str):
        self.n_trials, self.reached = n_trials, False
        self.sqlite, self.warned = is_sqlite(storage_url), False

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial):
        if slots_left(study, self.n_trials) <= 0:
            self.reached = True
            study.stop()
        if self.sqlite and not self.warned and other_workers(study):
            self.warned = True
            warn_sqlite_workers()


def warn_sqlite_workers():
    print(
        "[alignmerge] warning: several workers share this SQLite study. SQLite is not meant for "
        'parallel writers ("database is locked"); use --storage postgresql://... or '
        "--storage journal:PATH for many workers (README: Many workers, one study)",
        file=sys.stderr,
    )


def optimize_until_done(study: optuna.Study, ctx: Context, storage_url: str) -> None:
    """Run trials until the study (all workers together) holds n_trials finished ones. A worker
    with nothing left to start waits while other workers' trials run: if one of them dies, its
    trial goes stale (no heartbeat), is marked failed and comes back as a waiting retry, which
    this worker then runs."""
    cfg, n = ctx.cfg, ctx.cfg.search.n_trials
    deadline = time.monotonic() + cfg.search.timeout_s if cfg.search.timeout_s else None
    quota, guard = Quota(n, storage_url), FailureGuard(max(5, n))
    bar = ProgressBar(n, n_finished(study))
    said_waiting = False
    try:
        while deadline is None or time.monotonic() < deadline:
            fail_stale_trials(study)
            if slots_left(study, n) > 0:
                quota.reached = False
                study.optimize(
                    make_objective(ctx),
                    n_trials=None,
                    timeout=deadline - time.monotonic() if deadline else None,
                    callbacks=[quota, guard, bar],
                )
                if not quota.reached:  # timeout, failure guard, or the sampler ran out (grid)
                    return
                continue
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if not running or not cfg.heartbeat_s:
                return
            if not said_waiting:
                said_waiting = True
                print(
                    f"[alignmerge] waiting for {len(running)} trial(s) running in other workers "
                    f"(a worker silent for {2 * cfg.heartbeat_s} s is taken as dead and its trial "
                    "retried here)",
                    file=sys.stderr,
                )
            time.sleep(max(1.0, cfg.heartbeat_s / 2))
    finally:
        bar.close()


@contextmanager
def outputs_lock(run_dir: Path):
    """One worker at a time writes a run folder's outputs (released if the worker dies)."""
    with open(run_dir / ".outputs.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def outputs_stamp(cfg: Config, study: optuna.Study) -> str:
    """Identifies what the outputs are made of: the config and the finished trials."""
    finished = [(t.number, t.values) for t in study.get_trials(deepcopy=False, states=FINISHED)]
    doc = {"config": cfg.model_dump(mode="json"), "study": study.study_name, "trials": finished}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def written_stamp(run_dir: Path) -> str | None:
    import yaml

    if not (run_dir / "report.md").is_file() or not (run_dir / "run.yaml").is_file():
        return None
    try:
        return (yaml.safe_load((run_dir / "run.yaml").read_text()) or {}).get("outputs_stamp")
    except yaml.YAMLError:
        return None


def run(cfg: Config, storage: str | None = None, ctx: Context | None = None) -> Path:
    """The whole search; returns the path of the report. `ctx` reuses loaded models (a caller
    running several searches on the same base and sources)."""
    from optimize.report import write_outputs

    started = time.perf_counter()
    rows = check_inputs(cfg)  # before any model loads
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    url = storage or cfg.storage or default_storage(cfg)
    store = open_storage(url, cfg.heartbeat_s)  # an unreachable server fails before models load
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ctx = ctx or prepare(cfg, rows)
    pruner = make_pruner(cfg, len(ctx.scorer.batches))
    study = open_study(cfg, store, url, ctx.space, pruner, study_signature(ctx))
    fail_stale_trials(study)
    if is_sqlite(url) and other_workers(study):
        warn_sqlite_workers()
    print(
        f"[alignmerge] {cfg.merge.method}, {ctx.space.n_params} parameters "
        f"({ctx.space.describe()}); study {study.study_name!r}: {n_finished(study)}/"
        f"{cfg.search.n_trials} trials done",
        file=sys.stderr,
    )
    interrupted = False
    try:
        optimize_until_done(study, ctx, url)
    except KeyboardInterrupt:
        interrupted = True
        print(
            "\n[alignmerge] interrupted: writing outputs for the finished trials; run the "
            "same command again to resume",
            file=sys.stderr,
        )
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise RuntimeError("no trial completed; see the failed trials' fail_reason in the study")
    ctx.timings["search_s"] = time.perf_counter() - started
    with outputs_lock(cfg.run_dir):
        stamp = outputs_stamp(cfg, study)
        if written_stamp(cfg.run_dir) == stamp:
            print(
                f"[alignmerge] outputs for these {n_finished(study)} trials are already written "
                f"(by another worker or an earlier run): {cfg.run_dir}",
                file=sys.stderr,
            )
            return cfg.run_dir / "report.md"
        print(f"[alignmerge] writing outputs to {cfg.run_dir}", file=sys.stderr)
        try:
            return write_outputs(ctx, study, redact(url), interrupted=interrupted, stamp=stamp)
        except (OSError, SafetensorError) as err:  # disk full, quota, permissions
            raise OutputError(
                f"could not write the outputs in {cfg.run_dir}: {err}. Files already there are "
                "intact (each is written under a temporary name, then renamed); the study keeps "
                f"its {n_finished(study)} finished trials: free space and run the same command "
                "again to write the outputs"
            ) from None


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m optimize.search",
        description="Search per-layer merge coefficients that keep alignment while adding "
        "domain expertise. Flags override the config file.",
    )
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument(
        "--n-trials",
        type=int,
        help="total finished trials wanted in the study (finished trials of an earlier run count toward it)",
    )
    p.add_argument("--sampler", choices=SAMPLERS, help="Optuna sampler (default tpe)")
    p.add_argument(
        "--objective",
        choices=("weighted", "pareto"),
        help="weighted: L_align + alpha*L_domain; pareto: both losses, Pareto front",
    )
    p.add_argument("--alpha", type=float, help="weight of the domain loss (paper: 0.3)")
    p.add_argument(
        "--storage",
        help="Optuna storage URL (default: sqlite in the run folder); "
        "postgresql://... or a journal file lets many workers share one study",
    )
    p.add_argument("--study-name", help="study name in the storage (default: config name)")
    p.add_argument("--out", help="run folder (default: runs/<name>)")
    p.add_argument("--seed", type=int, help="sampler seed")
    return p


def overrides(args: argparse.Namespace) -> dict:
    mapping = {
        "n_trials": "search.n_trials",
        "sampler": "search.sampler",
        "objective": "search.objective",
        "alpha": "search.alpha",
        "seed": "search.seed",
        "storage": "storage",
        "study_name": "study_name",
        "out": "out",
    }
    return {key: getattr(args, a) for a, key in mapping.items() if getattr(args, a) is not None}


def main(argv: list[str] | None = None) -> int:
    from optimize.cli import run_cli

    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(load_config(args.config, overrides(args))))


if __name__ == "__main__":
    sys.exit(main())
