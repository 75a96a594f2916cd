"""`python -m optimize.search --config configs/X.yaml`: the safety-aware merge search.

Every trial merges a candidate in memory and scores it on the alignment and domain *search*
sets (`optimize.objective`: L_align + alpha * L_domain, or both losses; docs/method.md §4). The
study lives in the run folder (SQLite) unless --storage names another Optuna storage; running
the same command again resumes it, and many workers may share one study (`optimize.workers`).

One trial: `space.suggest` -> `merger.apply` (in place) -> `scorer.losses` -> objective value.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import optuna
from optuna.storages import fail_stale_trials
from optuna.trial import TrialState
from safetensors import SafetensorError

from core.cli import ArgumentParser, redact, run_cli
from core.config import parse_sets
from core.errors import ConfigError, OutputError, UserError
from core.files import check_replaceable
from optimize.config import Config, load_config
from optimize.context import Context, check_inputs, prepare
from optimize.export import mergekit_base_before_loading
from optimize.gradient import descend
from optimize.objective import make_trial, refusal_bounds
from optimize.registry import SAMPLER_NAMES
from optimize.report import load_best, write_outputs
from optimize.storage import claim_and_open, is_sqlite
from optimize.study import default_storage, make_pruner, open_study, study_signature
from optimize.tracking import Tracker
from optimize.workers import (
    n_finished,
    optimize_until_done,
    other_workers,
    outputs_lock,
    outputs_stamp,
    warn_sqlite_workers,
    written_run,
    written_stamp,
)


def run(
    cfg: Config, storage: str | None = None, ctx: Context | None = None, reraise_interrupt: bool = False
) -> Path:
    """The whole search; returns the path of the report. `ctx` reuses loaded models (a caller
    running several searches on the same base and sources). Ctrl-C ends the search and writes
    the outputs of the finished trials; `reraise_interrupt` then raises it again (a sweep stops)."""
    started = time.perf_counter()
    rows = check_inputs(cfg, memory=ctx is None)  # before any model loads
    url = storage or cfg.storage or default_storage(cfg)
    # a folder of the user's is refused, never written into; an unreachable server fails here
    if cfg.output.save_model and cfg.run_dir.is_dir():  # merged/ is rewritten at the end: stop now
        check_replaceable(cfg.run_dir / "merged", "merged model folder", kind="model")
    store = claim_and_open(cfg.run_dir, url, cfg.heartbeat_s)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if ctx is not None:
        return searched(cfg, ctx, store, url, started, reraise_interrupt)
    mergekit_base_before_loading(cfg)
    ctx = prepare(cfg, rows)
    try:
        return searched(cfg, ctx, store, url, started, reraise_interrupt)
    finally:
        ctx.generation.close()  # the vLLM engine of the verified pick, if one started


def no_trial_completed(cfg: Config, study: optuna.Study, interrupted: bool) -> UserError:
    """Why a search ends without a single finished trial, in the user's terms."""
    if interrupted:
        return UserError(
            "interrupted before any trial finished: nothing to write; run the same command again"
        )
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    reasons = [t.user_attrs["fail_reason"] for t in failed if "fail_reason" in t.user_attrs]
    if reasons:
        return UserError(
            f"no trial completed: {len(failed)} failed, the first because of: {reasons[0]} (every "
            f"trial of study {study.study_name!r} is listed by optuna-dashboard or study.trials_dataframe())"
        )
    if cfg.search.timeout_s is not None:
        return ConfigError(f"no trial completed within search.timeout_s ({cfg.search.timeout_s} s): raise it")
    return UserError(f"no trial completed in study {study.study_name!r} ({len(failed)} failed)")


def check_outputs_belong(cfg: Config, study: optuna.Study) -> None:
    """A study without trials must not replace the outputs of another one (a study.db emptied by a
    full disk, or another --study-name in the same folder): they would be lost at the end."""
    earlier = written_run(cfg.run_dir)
    ran = [t for t in study.trials if t.state != TrialState.WAITING]  # (trial 0 is enqueued when new)
    if ran or earlier.get("outputs_stamp") is None:
        return
    raise OutputError(
        f"{cfg.run_dir} holds the outputs of study {earlier.get('study_name')!r} (run.yaml, merged/), "
        f"but study {study.study_name!r} in its storage has no trials: its outputs would replace them. "
        "Choose another --out, or move those outputs away to start over"
    )


def searched(cfg: Config, ctx: Context, store, url: str, started: float, reraise_interrupt: bool) -> Path:
    """The trials, then the outputs (`run` after the inputs are checked and the models loaded)."""
    pruner = make_pruner(cfg, len(ctx.scorer.batches))
    study = open_study(cfg, store, url, ctx.space, pruner, study_signature(ctx))
    fail_stale_trials(study)
    check_outputs_belong(cfg, study)
    if is_sqlite(url) and other_workers(study):
        warn_sqlite_workers()
    ctx.refusal_bounds = refusal_bounds(ctx, study)
    if ctx.refusal_bounds:
        print(
            f"[alignmerge] search.constrain: a trial is feasible when its refusal mass is >= "
            f"{ctx.refusal_bounds['harmful_min']:.3f} on the harmful search prompts and <= "
            f"{ctx.refusal_bounds['benign_max']:.3f} on the benign ones",
            file=sys.stderr,
        )
    print(
        f"[alignmerge] {cfg.merge.method}, {ctx.space.n_params} parameters "
        f"({ctx.space.describe()}); study {study.study_name!r}: {n_finished(study)}/"
        f"{cfg.search.n_trials} trials done",
        file=sys.stderr,
    )
    interrupted = False
    tracker = Tracker(cfg, study) if cfg.tracking.backend == "trackio" else None
    callbacks = [tracker] if tracker else []
    try:
        if cfg.search.sampler == "gradient":
            descend(study, ctx, callbacks)
        else:
            optimize_until_done(study, make_trial(ctx), cfg, url, callbacks)
    except KeyboardInterrupt:
        interrupted = True
        print(
            "\n[alignmerge] interrupted: writing outputs for the finished trials; run the "
            "same command again to resume",
            file=sys.stderr,
        )
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if interrupted and reraise_interrupt:
            raise KeyboardInterrupt
        raise no_trial_completed(cfg, study, interrupted)
    ctx.timings["search_s"] = time.perf_counter() - started
    with outputs_lock(cfg.run_dir):
        stamp = outputs_stamp(cfg, study)
        if written_stamp(cfg.run_dir) == stamp:
            print(
                f"[alignmerge] outputs for these {n_finished(study)} trials are already written "
                f"(by another worker or an earlier run): {cfg.run_dir}",
                file=sys.stderr,
            )
            report = cfg.run_dir / "report.md"
        else:
            print(f"[alignmerge] writing outputs to {cfg.run_dir}", file=sys.stderr)
            try:
                report = write_outputs(ctx, study, redact(url), interrupted=interrupted, stamp=stamp)
            except (OSError, SafetensorError) as err:  # disk full, quota, permissions
                raise OutputError(
                    f"could not write the outputs in {cfg.run_dir}: {err}. Files already there are "
                    "intact (each is written under a temporary name, then renamed); the study keeps "
                    f"its {n_finished(study)} finished trials: free space and run the same command "
                    "again to write the outputs"
                ) from None
    if tracker:
        try:
            scores = load_best(cfg.run_dir).get("scores")
        except OutputError:  # another worker is rewriting the outputs right now
            scores = None
        tracker.finish(scores, step=len(study.trials))
    if interrupted and reraise_interrupt:
        raise KeyboardInterrupt
    return report


# ----------------------------------------------------------------------------- CLI
def build_parser() -> ArgumentParser:
    p = ArgumentParser(
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
    p.add_argument("--sampler", choices=SAMPLER_NAMES, help="Optuna sampler (default tpe)")
    p.add_argument(
        "--objective",
        choices=("weighted", "pareto"),
        help="weighted: L_align + alpha*L_domain + beta*L_help; pareto: the losses, Pareto front",
    )
    p.add_argument("--alpha", type=float, help="weight of the domain loss (paper: 0.3)")
    p.add_argument("--beta", type=float, help="weight of the helpfulness loss (0: the paper's objective)")
    p.add_argument(
        "--storage",
        help="Optuna storage URL (default: sqlite in the run folder); "
        "postgresql://... or a journal file lets many workers share one study",
    )
    p.add_argument("--study-name", help="study name in the storage (default: config name)")
    p.add_argument("--out", help="run folder (default: runs/<name>)")
    p.add_argument("--seed", type=int, help="sampler seed")
    p.add_set_flag("search.alpha=0.5")
    return p


FLAGS = {  # command-line flag (argparse dest) -> config key
    "n_trials": "search.n_trials",
    "sampler": "search.sampler",
    "objective": "search.objective",
    "alpha": "search.alpha",
    "beta": "search.beta",
    "seed": "search.seed",
    "storage": "storage",
    "study_name": "study_name",
    "out": "out",
}


def overrides(**flags) -> dict:
    """Config overrides from flag values (None: not given), e.g. `overrides(**vars(args))`."""
    return {key: flags[a] for a, key in FLAGS.items() if flags.get(a) is not None}


def main(argv: list[str] | None = None) -> int:
    def work() -> Path:
        args = build_parser().parse_args(argv)
        cfg = load_config(args.config, parse_sets(args.set) | overrides(**vars(args)))
        return run(cfg, reraise_interrupt=True)

    return run_cli(work, "the study keeps its finished trials: run the same command again to resume")


if __name__ == "__main__":
    sys.exit(main())
