"""Where a study lives, and how several workers share it.

- `sqlite:///...` (the default, in the run folder): one worker at a time. SQLite is not meant for
  parallel writers (Optuna's own advice; users hit "database is locked"), so we warn when we see
  another worker on it.
- `postgresql://...` (or any SQLAlchemy URL): many workers on many machines.
- `journal:PATH`: Optuna's journal file, for a shared file system without a database server.

Every storage we open has heartbeats: a running trial writes one every `heartbeat_s` seconds, and a
trial silent for twice that long belongs to a dead worker. It is marked failed and retried once
with the same parameters (Optuna's RetryHeartbeatStaleTrialCallback), never counted as done.
Optuna has heartbeats only for its RDB storage; `JournalHeartbeatStorage` adds them to the journal.
"""

from __future__ import annotations

import os
import random
import re
import socket
import time
import warnings
from pathlib import Path

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

# Optuna calls its heartbeat API "experimental" and says so on every use; we use it on purpose.
warnings.filterwarnings(
    "ignore", r".*(heartbeat|stale_trial|RetryHeartbeat).*", optuna.exceptions.ExperimentalWarning
)

JOURNAL = "journal:"
HEARTBEAT_ATTR = "alignmerge:heartbeat"


class StorageError(RuntimeError):
    """A storage that cannot be opened; the message names the URL (password hidden) and the fix."""


def redact(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", url)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class JournalHeartbeatStorage(JournalStorage, BaseHeartbeat):
    """A journal file storage whose running trials write heartbeats (a trial system attribute with
    the wall-clock time), so a dead worker's trial is found as on an RDB storage. Workers on
    several machines must have clocks within the grace period of each other."""

    def __init__(self, backend, heartbeat_interval: int | None, retry):
        super().__init__(backend)
        self.heartbeat_interval, self.retry = heartbeat_interval, retry

    def record_heartbeat(self, trial_id: int) -> None:
        # keyed by trial id: a retried trial inherits its failed original's system attributes
        self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, [trial_id, time.time()])

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        limit = time.time() - 2 * self.heartbeat_interval
        stale = []
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            trial_id, beat = t.system_attrs.get(HEARTBEAT_ATTR, (None, None))
            if trial_id == t._trial_id and beat < limit:
                stale.append(t._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self):
        return self.retry


def open_storage(url: str, heartbeat_s: int) -> BaseStorage:
    """The Optuna storage for `url`, connected now: a server that cannot be reached fails here,
    before any model loads."""
    interval = heartbeat_s or None
    retry = RetryHeartbeatStaleTrialCallback(max_retry=1) if interval else None
    if url.startswith(JOURNAL):
        path = Path(url[len(JOURNAL) :].removeprefix("//"))
        if not path.parent.is_dir():
            raise StorageError(
                f"storage {url}: folder {path.parent} does not exist; create it or name another "
                "journal file (journal:/shared/folder/study.log)"
            )
        try:
            backend = JournalFileBackend(str(path))
        except OSError as err:
            raise StorageError(f"storage {url}: cannot open the journal file: {err}") from None
        return JournalHeartbeatStorage(backend, interval, retry)
    engine_kwargs = {}
    if url.startswith(("postgresql", "mysql")):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    try:
        for attempt in range(5):
            try:
                return RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=interval,
                    heartbeat_stale_trial_callback=retry,
                )
            except Exception as err:
                # Workers starting together on an empty database race to create Optuna's tables
                # (optuna#1092); the loser retries and finds them made.
                if attempt == 4 or not re.search(r"already exists|duplicate key|UNIQUE constraint", str(err)):
                    raise
                time.sleep(0.2 + random.random())
    except ImportError as err:
        raise StorageError(
            f"storage {redact(url)}: its database driver is not installed ({err.__cause__ or err}); "
            "for PostgreSQL: pip install 'alignmerge[postgres]' (psycopg 3)"
        ) from None
    except Exception as err:  # SQLAlchemy's errors: bad URL, refused connection, bad password...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StorageError(
            f"cannot open storage {redact(url)}: {first}. Check the URL, that the server runs and "
            "accepts this user, or use the default SQLite (no --storage) or journal:PATH"
        ) from None


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")
