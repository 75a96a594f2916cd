"""Many workers, one study: how each worker knows what is left, waits for the others, and
writes the run's outputs once. Storages and heartbeats are in `optimize.storage`.

Several workers (processes, machines) run the same command on one storage. Each trial records
its worker (host:pid); a worker starts trials while the study holds fewer than n_trials finished
or running ones; when workers race for the last slot, the trial numbered later is surplus and
not run; a worker that has nothing to start waits for the others' running trials, because a dead
worker's trial is failed (stale heartbeat, a dead local pid, or no worker long after its start:
`fail_orphaned_trials`) and retried by a live one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

import optuna
import yaml
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import fail_stale_trials
from optuna.trial import TrialState
from tqdm.auto import tqdm

from core.errors import OutputError
from core.files import pid_alive
from optimize.storage import RETRY, is_sqlite

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# How long a trial may run without its worker recorded when heartbeats are off (heartbeat_s 0).
UNSTARTED_GRACE_S = 60


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class ProgressBar:
    """Finished trials of the study (every worker's) toward the target, with the best so far."""

    def __init__(self, total: int, done: int):
        self.bar = tqdm(total=total, initial=done, desc="trials", unit="trial")

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial):
        self.bar.n = n_finished(study)
        complete = searched_trials(study, (TrialState.COMPLETE,))
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
                    "(each failed trial's fail_reason is in trials.csv and the study)",
                    file=sys.stderr,
                )
                self.tripped = True
                study.stop()


# User attribute of a trial the verified pick added (its restore, optimize.verify), not sampled by
# the search: the trial budget, the search's rankings and the outputs' stamp leave it out.
RESTORED = "restored_from"


def searched_trials(study: optuna.Study, states=None) -> list[optuna.trial.FrozenTrial]:
    """The study's trials in `states` (None: all) that the search itself ran (restored points left out)."""
    return [t for t in study.get_trials(deepcopy=False, states=states) if RESTORED not in t.user_attrs]


def n_finished(study: optuna.Study) -> int:
    return len(searched_trials(study, FINISHED))


def slots_left(study: optuna.Study, n_trials: int) -> int:
    """Trials this worker may still start: the target minus the trials finished or running in any
    worker (the next ask takes a trial waiting to be retried first). A retry left waiting once the
    study holds its n_trials (a rerun with a lower --n-trials after a kill) is not run."""
    return n_trials - len(searched_trials(study, FINISHED + (TrialState.RUNNING,)))


def is_surplus(study: optuna.Study, trial: optuna.Trial, n_trials: int) -> bool:
    """True when workers raced at the end of the study and `trial` would exceed the target: the
    trials numbered before it, finished, running or waiting, already make n_trials. Numbers are
    given out atomically by the storage, so exactly one of two racing trials is surplus."""
    live = FINISHED + (TrialState.RUNNING, TrialState.WAITING)
    return len([t for t in searched_trials(study, live) if t.number < trial.number]) >= n_trials


def other_workers(study: optuna.Study) -> set[str]:
    """Live workers (host:pid) other than this one that are running a trial of the study."""
    out = set()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        w = t.user_attrs.get("worker")
        if w and not local_and_dead(w):
            out.add(w)
    return out


def local_and_dead(worker: str) -> bool:
    """True when `worker` (host:pid) ran on this host and its process is gone. This process
    counts as gone: it asks between trials, so none of its trials is running."""
    host, _, pid = worker.rpartition(":")
    return host == socket.gethostname() and (worker == worker_id() or not pid_alive(int(pid)))


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


def orphan_reason(trial: optuna.trial.FrozenTrial, heartbeat_s: int) -> str | None:
    """Why a running trial will never finish, or None. Optuna's heartbeats find a worker that died
    mid-trial, but not one killed between creating its trial and its first heartbeat (the trial
    has no heartbeat, so it is never stale), nor anything when heartbeats are off."""
    worker = trial.user_attrs.get("worker")
    if worker:
        return f"its worker {worker} on this host has died" if local_and_dead(worker) else None
    # The trial function records its worker first thing, as the first heartbeat is written.
    grace = 2 * heartbeat_s or UNSTARTED_GRACE_S
    if trial.datetime_start and datetime.now() - trial.datetime_start > timedelta(seconds=grace):
        return f"its worker died before starting it (no heartbeat {grace} s after its start)"
    return None


def fail_orphaned_trials(study: optuna.Study, heartbeat_s: int) -> None:
    """Fail every running trial no worker will finish (`orphan_reason`) and queue it for a retry
    with the same parameters, as Optuna does with a stale one (`optimize.storage.RETRY`)."""
    storage = study._storage
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not (reason := orphan_reason(t, heartbeat_s)):
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
            if not storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:  # another worker failed it first, and retries it
            continue
        RETRY(study, storage.get_trial(t._trial_id))
        print(f"[alignmerge] trial {t.number}: {reason}; retried with its parameters", file=sys.stderr)


def warn_sqlite_workers():
    print(
        "[alignmerge] warning: several workers share this SQLite study. SQLite is not meant for "
        'parallel writers ("database is locked"); use --storage postgresql://... or '
        "--storage journal:PATH for many workers (README: Many workers, one study)",
        file=sys.stderr,
    )


class _NoInterruptTraceback(logging.Filter):
    """Optuna logs a trial cut by Ctrl-C with the whole traceback; the user pressed the key."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
            record.exc_info = record.exc_text = None
        return True


logging.getLogger("optuna.study._optimize").addFilter(_NoInterruptTraceback())


def optimize_until_done(study: optuna.Study, trial_fn, cfg, storage_url: str, callbacks=()) -> None:
    """Run `trial_fn` until the study (all workers together) holds n_trials finished trials. A
    worker with nothing left to start waits while other workers' trials run: if one of them dies,
    its trial goes stale (no heartbeat) or is found orphaned (`fail_orphaned_trials`), is marked
    failed and comes back as a waiting retry, which this worker then runs."""
    n = cfg.search.n_trials
    deadline = time.monotonic() + cfg.search.timeout_s if cfg.search.timeout_s else None
    quota, guard = Quota(n, storage_url), FailureGuard(max(5, n))
    bar = ProgressBar(n, n_finished(study))
    said_waiting = False
    try:
        while deadline is None or time.monotonic() < deadline:
            fail_stale_trials(study)
            fail_orphaned_trials(study, cfg.heartbeat_s)
            if slots_left(study, n) > 0:
                quota.reached = False
                study.optimize(
                    trial_fn,
                    n_trials=None,
                    timeout=deadline - time.monotonic() if deadline else None,
                    callbacks=[quota, guard, bar, *callbacks],
                )
                if not quota.reached:  # timeout, failure guard, or the sampler ran out (grid)
                    return
                continue
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if not cfg.heartbeat_s:  # only a trial not started yet can still be found dead
                running = [t for t in running if "worker" not in t.user_attrs]
            if not running:
                return
            if not said_waiting:
                said_waiting = True
                silent = 2 * cfg.heartbeat_s or UNSTARTED_GRACE_S
                print(
                    f"[alignmerge] waiting for {len(running)} trial(s) running in other workers "
                    f"(a worker silent for {silent} s is taken as dead and its trial retried here)",
                    file=sys.stderr,
                )
            time.sleep(max(1.0, cfg.heartbeat_s / 2))
    finally:
        bar.close()


@contextmanager
def outputs_lock(run_dir: Path, patience_s: float | None = None):
    """One worker at a time writes a run folder's outputs (released if the worker dies: an 8B
    model's outputs can take an hour). A worker that waits says for whom, once a minute, and gives
    up after `patience_s` (None: never; Ctrl-C stops it, and the study keeps its trials)."""
    with open(run_dir / ".outputs.lock", "a+") as f:
        start = said = time.monotonic()
        while not _try_lock(f):
            if patience_s is not None and time.monotonic() - start > patience_s:
                raise OutputError(
                    f"{run_dir}: another worker ({_holder(f)}) has held the outputs lock for "
                    f"{patience_s:.0f} s; the study keeps its trials: run the same command again "
                    "once that process has finished (or stop it)"
                )
            if said == start or time.monotonic() - said > 60:
                said = time.monotonic()
                print(
                    f"[alignmerge] waiting for {_holder(f)}, which is writing the outputs of {run_dir}",
                    file=sys.stderr,
                )
            time.sleep(1)
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            f.flush()
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _try_lock(f) -> bool:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _holder(f) -> str:
    f.seek(0)
    return f.read().strip() or "another process"


def outputs_stamp(cfg, study: optuna.Study) -> str:
    """Identifies what the outputs are made of: the config and the finished trials."""
    finished = [(t.number, t.values) for t in searched_trials(study, FINISHED)]  # not the outputs' own
    doc = {"config": cfg.model_dump(mode="json"), "study": study.study_name, "trials": finished}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def written_stamp(run_dir: Path) -> str | None:
    """The stamp of the last complete write of a run folder's outputs (run.yaml, written last)."""
    return written_run(run_dir).get("outputs_stamp")


def written_run(run_dir: Path) -> dict:
    """The run.yaml of a run folder's written outputs ({} when there are none, or it is unreadable)."""
    if not (run_dir / "report.md").is_file() or not (run_dir / "run.yaml").is_file():
        return {}
    try:
        doc = yaml.safe_load((run_dir / "run.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):  # ValueError: not UTF-8 text
        return {}
    return doc if isinstance(doc, dict) else {}
