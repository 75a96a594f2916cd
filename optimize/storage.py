"""Where a study lives, and how several workers share it.

- `sqlite:///...` (the default, in the run folder): one worker at a time. SQLite is not meant for
  parallel writers (Optuna's own advice; users hit "database is locked"), so we warn when we see
  another worker on it.
- `postgresql://...` (or any SQLAlchemy URL): many workers on many machines.
- `journal:PATH`, or the file path alone (`PATH.log`, `/shared/study.log`): Optuna's journal file,
  for a shared file system without a database server. optuna-dashboard takes the path alone, so
  `optuna-dashboard STORAGE` opens any storage given to `--storage` (the `journal:` form without
  its prefix). It is read before use: a record cut by a kill or a full disk is set aside in
  `PATH.cut-<time>`, and a file that is not an Optuna journal is refused untouched.

Every storage we open has heartbeats: a running trial writes one every `heartbeat_s` seconds, and a
trial silent for twice that long belongs to a dead worker. It is marked failed and retried once
with the same parameters (Optuna's RetryHeartbeatStaleTrialCallback), never counted as done.
Optuna has heartbeats only for its RDB storage; `JournalHeartbeatStorage` adds them to the journal.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import sys
import time
import warnings
from pathlib import Path

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import URL, make_url

from core.cli import redact
from core.errors import StorageError, UserError
from core.files import claim_run_dir, unclaim_run_dir

# Optuna calls its heartbeat API "experimental" and says so on every use; we use it on purpose.
warnings.filterwarnings(
    "ignore", r".*(heartbeat|stale_trial|RetryHeartbeat).*", optuna.exceptions.ExperimentalWarning
)

JOURNAL = "journal:"
SCHEME = re.compile(r"[A-Za-z][\w+.-]*:")  # a URL's `postgresql:`, `sqlite:`, `journal:`...
SQLITE_HEADER = b"SQLite format 3\x00"
RECORD_START = b'{"op_code":'  # how Optuna starts every journal record (compact JSON, op_code first)
MISTYPED_URL = re.compile(r"\s|(?:postgres|mysql|mariadb|sqlite|oracle|mssql)[\w+]*/")  # no ":"
HEARTBEAT_ATTR = "alignmerge:heartbeat"
SQLITE_BUSY_S = 60  # seconds SQLite waits for another connection's lock before "database is locked"


class Retry(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a dead worker's trial: a waiting trial with the same parameters, run by
    whichever worker takes it next. It does not inherit the dead run's worker and fail_reason."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trial = copy.copy(trial)
        trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in ("worker", "fail_reason")}
        super().__call__(study, trial)


RETRY = Retry(max_retry=1)


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


def sqlite_url(path: Path) -> str:
    """The SQLite URL of the file `path`, escaped: a `?`, `#` or `%` in a folder name stays in the path
    (unescaped, SQLAlchemy read `run?x=1/study.db` as the file `run` and a query)."""
    return URL.create("sqlite", database=str(path.resolve())).render_as_string(hide_password=False)


def journal_path(url: str) -> Path | None:
    """The journal file `url` names (`journal:PATH` or a path without a URL scheme), else None."""
    if url.startswith(JOURNAL):
        return Path(url[len(JOURNAL) :].removeprefix("//"))
    return None if SCHEME.match(url) else Path(url)


def open_journal(url: str, path: Path) -> JournalFileBackend:
    # a typo, not a file name: no suffix nor folder, or a mistyped URL ("postgresql//u:pw@host/db",
    # "postgresql/u:pw@host/db", a space before "postgresql://")
    if not url.startswith(JOURNAL) and (not (path.suffix or "/" in url) or MISTYPED_URL.match(url)):
        raise StorageError(
            f"storage {redact(url)} is neither a URL (postgresql://..., sqlite:///PATH) nor a journal "
            "file (PATH.log or journal:PATH); check the scheme's '://' and that nothing precedes it"
        )
    if not path.parent.is_dir():
        raise StorageError(
            f"storage {redact(url)}: folder {redact(str(path.parent))} does not exist; create it or "
            "name another journal file (journal:/shared/folder/study.log)"
        )
    try:
        if path.is_file():
            with path.open("rb") as f:
                if f.read(len(SQLITE_HEADER)) == SQLITE_HEADER:
                    raise StorageError(f"storage {redact(url)} is a SQLite database; give {sqlite_url(path)}")
        lock = JournalFileSymlinkLock(str(path))  # the lock Optuna's appends take (the same file)
        while (end := complete_part(url, path)) is not None:
            lock.acquire()  # no worker appends meanwhile
            try:
                if set_aside_cut_record(path, end):
                    break
            finally:
                lock.release()
        return JournalFileBackend(str(path), lock_obj=lock)
    except OSError as err:
        raise StorageError(f"storage {redact(url)}: cannot open the journal file: {err}") from None


def complete_part(url: str, path: Path) -> int | None:
    """Check the journal `path` before anything is appended to it: each complete line must be an
    Optuna journal record, else StorageError and the file is left as it is. Returns the size of its
    complete lines when it ends in a cut record (a kill or a full disk mid-append), else None."""
    if not path.is_file():
        return None  # a new journal
    end = 0
    with path.open("rb") as f:
        if f.read(1) not in (b"", b"{"):  # refused before a big binary file's first "line" is read
            raise not_a_journal(url, path, 1)
        f.seek(0)
        for number, line in enumerate(f, start=1):
            if not line.endswith(b"\n") and RECORD_START.startswith(line[: len(RECORD_START)]):
                return end  # the last record was cut
            if not is_record(line):
                raise not_a_journal(url, path, number)
            end += len(line)
    return None


def not_a_journal(url: str, path: Path, number: int) -> StorageError:
    return StorageError(
        f"storage {redact(url)}: line {number} is not an Optuna journal record, so the file is not "
        "an Optuna journal (or it is corrupt); nothing was changed. Name another file for a new "
        "study, or restore the journal from a copy"
    )


def is_record(line: bytes) -> bool:
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested too deep
        return False
    return isinstance(record, dict) and "op_code" in record


def set_aside_cut_record(path: Path, end: int) -> bool:
    """Move the bytes after `end` (a cut record) to `<path>.cut-<UTC time>` and truncate the journal
    to its complete lines, so the next append starts a line. Call it under the journal's lock.
    False: the file changed since it was checked (records were appended), so check it again."""
    with path.open("r+b") as f:
        f.seek(end)
        tail = f.read()
        if b"\n" in tail:
            return False
        if tail:  # else another worker set it aside already
            cut = path.with_name(f"{path.name}.cut-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
            with cut.open("xb") as out:
                out.write(tail)
                out.flush()
                os.fsync(out.fileno())
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
            print(
                f"[alignmerge] journal {path} ended in a record cut by a kill or a full disk: its "
                f"{len(tail)} bytes are set aside in {cut}; the journal keeps its complete records",
                file=sys.stderr,
            )
    return True


def claim_and_open(run_dir: Path, url: str | None, heartbeat_s: int) -> BaseStorage | None:
    """Claim the run folder (`core.files.claim_run_dir`), then open `url` (a journal file may live in
    the folder): before any model loads. A storage that fails leaves no new folder behind."""
    check_not_an_output(run_dir, url)
    fresh = not run_dir.exists()
    claim_run_dir(run_dir)
    try:
        return open_storage(url, heartbeat_s) if url else None
    except UserError:
        if fresh:
            unclaim_run_dir(run_dir)
        raise


STORAGE_SUFFIXES = (".db", ".sqlite", ".sqlite3", ".log", ".journal")  # no output has one of these


def check_not_an_output(run_dir: Path, url: str | None) -> None:
    """A storage file the command's outputs would replace (journal:RUN/report.md) loses the study
    at the end of the run: inside the run folder only a top-level .db / .log file is a storage.
    Refused before anything starts."""
    if not url:
        return
    if is_sqlite(url):
        try:
            path = Path(make_url(url).database or "")  # %-escapes and ?query read as SQLAlchemy does
        except Exception:  # a bad URL: RDBStorage says what is wrong with it
            return
    else:
        path = journal_path(url)
    if path is None or path == Path(""):
        return
    try:
        inside = path.resolve().relative_to(run_dir.resolve()).parts
    except (ValueError, OSError):
        return
    if len(inside) != 1 or not inside[0].lower().endswith(STORAGE_SUFFIXES):
        raise StorageError(
            f"storage {redact(url)} is inside the run folder {run_dir}, where the run writes its outputs "
            f"(report, data, models), and could be replaced by them; name a file directly in it ending in "
            f"{', '.join(STORAGE_SUFFIXES)} (the default: {run_dir / 'study.db'}; journal:"
            f"{run_dir / 'study.log'} for workers on a shared folder), or a file outside it"
        )


def open_storage(url: str, heartbeat_s: int) -> BaseStorage:
    """The Optuna storage for `url`, connected now: a server that cannot be reached fails here,
    before any model loads."""
    interval = heartbeat_s or None
    retry = RETRY if interval else None
    path = journal_path(url)
    if path is not None:
        backend = open_journal(url, path)
        try:  # replays the whole journal
            return JournalHeartbeatStorage(backend, interval, retry)
        except Exception as err:  # a record of the right shape with wrong fields
            raise StorageError(
                f"storage {redact(url)}: Optuna cannot replay the journal ({type(err).__name__}: {err}); "
                "it is corrupt or not an Optuna journal. Name another file for a new study, or restore "
                "the journal from a copy"
            ) from None
    try:
        parsed = make_url(url)
    except Exception:  # RDBStorage below says what is wrong with the URL
        parsed = None
    password = parsed.password if parsed else None
    if parsed and "@" in (parsed.host or ""):
        raise StorageError(
            f"storage {redact(url)}: the password holds a raw '@', which ends it for SQLAlchemy; "
            "write each @ in it as %40 (postgresql://user:p%40ss@host/db)"
        )
    engine_kwargs = {}
    if url.startswith(("postgresql", "mysql")):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    if is_sqlite(url):  # a short lock by another process (a sqlite3 shell, a dashboard) is waited out
        engine_kwargs["connect_args"] = {"timeout": SQLITE_BUSY_S}
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
        first = first.replace(password, "***") if password else first
        raise StorageError(
            f"cannot open storage {redact(url)}: {first}. {rdb_hint(url, parsed, first)}"
        ) from None


def rdb_hint(url: str, parsed, first: str) -> str:
    """The fix for an RDB storage that would not open (`first`: its error)."""
    if not is_sqlite(url):
        return (
            "Check the URL, that the server runs and accepts this user, or use the default SQLite "
            "(no --storage) or journal:PATH"
        )
    file = (parsed.database if parsed else None) or redact(url)
    if "locked" in first:
        return (
            f"Another process (a sqlite3 shell, optuna-dashboard, another worker) holds a lock on {file}; "
            "end it or wait for it, then run the same command again"
        )
    if re.search(r"not a database|malformed|corrupt", first):
        return (
            f"{file} is corrupt or not a SQLite database: move it away to start a new study, "
            "or restore it from a copy"
        )
    return f"Check that {file} is a SQLite database in a folder that exists and that you may write to"


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")
