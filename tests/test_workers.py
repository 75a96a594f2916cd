"""Many workers, one study: real worker processes on a real PostgreSQL server (started here on
loopback), on Optuna's journal file and on SQLite; workers killed with SIGKILL mid-trial."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from core.cli import command_line, redact
from core.errors import StorageError
from optimize.storage import claim_and_open, open_storage
from optimize.workers import Quota, is_surplus, other_workers, slots_left
from tests.conftest import SENTENCES, world_config, write_jsonl

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# ----------------------------------------------------------------------------- PostgreSQL
def _pg_bin(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL server on loopback (trust auth), stopped at the end."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        msg = "PostgreSQL server binaries not found (Debian: apt-get install postgresql)"
        if os.environ.get("ALIGNMERGE_REQUIRE_POSTGRES"):
            pytest.fail(msg)
        pytest.skip(msg)
    root = Path(tempfile.mkdtemp(prefix="alignmerge-pg-"))  # not under pytest's 0700 tmp
    as_user = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port()

    def run(*cmd):
        subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True)

    run(initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync")
    opts = f"-p {port} -k {root} -h 127.0.0.1 -c fsync=off"
    run(pg_ctl, "-D", str(data), "-l", str(root / "log"), "-o", opts, "-w", "start")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


# ----------------------------------------------------------------------------- workers
def worker_config(world, tmp_path: Path, heartbeat_s: int = 1) -> Path:
    """The tiny world with enough scoring data that one trial takes a noticeable time (so workers
    overlap and a kill lands mid-trial)."""
    rows = [
        {"prompt": f"{a} {i}", "response": " ".join([f"{b} {i} {a}"] * 6)}
        for i in range(30)
        for a in SENTENCES
        for b in SENTENCES
    ]
    raw = world_config(world, tmp_path / "run", n_trials=10)
    raw["data"] = {
        "alignment": str(write_jsonl(tmp_path / "alignment.jsonl", rows[::2])),
        "domain": str(write_jsonl(tmp_path / "domain.jsonl", rows[1::2])),
        "n_alignment": 400,
        "n_domain": 400,
        "batch_tokens": 512,
    }
    raw["search"].update(sampler="random", seed=0)
    raw["output"] = {"plots": False, "save_model": False, "references": False, "mergekit": False}
    raw["heartbeat_s"] = heartbeat_s
    path = tmp_path / "workers.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def start_worker(config: Path, *args: str) -> subprocess.Popen:
    # Output goes to files, not pipes: nobody reads a pipe while the test waits on the study, and
    # a worker whose pipe fills up (progress bars, warnings) would block mid-trial.
    out, err = (tempfile.TemporaryFile("w+") for _ in range(2))
    proc = subprocess.Popen(
        [sys.executable, "-m", "optimize.search", "--config", str(config), *args],
        env=ENV,
        stdout=out,
        stderr=err,
        text=True,
    )
    proc.out_file, proc.err_file = out, err
    return proc


def read_err(proc: subprocess.Popen) -> str:
    err_file = getattr(proc, "err_file", None)
    return err_file.seek(0) or err_file.read() if err_file else "(stderr not kept)"


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[str, str]:
    proc.wait(timeout=timeout)
    out, err = (f.seek(0) or f.read() for f in (proc.out_file, proc.err_file))
    assert proc.returncode == 0, err[-3000:]
    return out, err


def wait_for(study_name: str, url: str, predicate, worker: subprocess.Popen, timeout: float = 300):
    """Poll the study until predicate(trials) holds; returns the trials. One storage for the whole
    wait: a fresh one per poll leaked a PostgreSQL connection each time until the garbage collector
    ran, and with the server's 100 slots used up the worker under test could not connect. A worker
    that exits fails the wait at once, with its stderr."""
    storage, end = None, time.monotonic() + timeout
    while time.monotonic() < end:
        if worker.poll() is not None:
            raise AssertionError(f"the worker exited ({worker.returncode}) first: {read_err(worker)[-3000:]}")
        try:
            storage = storage or open_storage(url, 0)
            if predicate(trials := optuna.load_study(study_name=study_name, storage=storage).get_trials()):
                return trials
        except (KeyError, StorageError):  # the study (or the run folder) is not made yet
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting on study {study_name}: {read_err(worker)[-3000:]}")


def check_study(study: optuna.Study, n: int):
    """Exactly n finished trials, none running, no parameter set counted twice."""
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == n
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert len({t.number for t in trials}) == len(trials)
    params = [tuple(sorted(t.params.items())) for t in done]
    assert len(set(params)) == len(params)
    return trials


def running_of(trials, pid: int):
    return [
        t
        for t in trials
        if t.state == TrialState.RUNNING and t.user_attrs.get("worker", "").endswith(f":{pid}")
    ]


def two_workers_one_study(config: Path, url: str, name: str, n: int = 10):
    """Two workers started together run exactly n trials between them, and exactly one of them
    writes the run folder's outputs."""
    args = ("--storage", url, "--study-name", name, "--n-trials", str(n))
    a, b = start_worker(config, *args), start_worker(config, *args)
    (out_a, err_a), (out_b, err_b) = finish(a), finish(b)
    study = optuna.load_study(study_name=name, storage=open_storage(url, 0))
    trials = check_study(study, n)
    workers = {t.user_attrs["worker"] for t in trials if t.state == TrialState.COMPLETE}
    assert {w.rsplit(":", 1)[1] for w in workers} == {str(a.pid), str(b.pid)}
    writes = [e.count("writing outputs") for e in (err_a, err_b)]
    assert sorted(writes) == [0, 1], (err_a[-1500:], err_b[-1500:])
    assert "already written" in (err_a if writes[0] == 0 else err_b)
    assert out_a.strip() == out_b.strip() == str(config.parent / "run" / "report.md")
    run_yaml = yaml.safe_load((config.parent / "run" / "run.yaml").read_text())
    assert run_yaml["storage"] == redact(url)
    best = yaml.safe_load((config.parent / "run" / "best.yaml").read_text())
    assert best["trial"] == study.best_trial.number
    return study


def kill_one_worker_mid_trial(config: Path, url: str, name: str, args=(), n: int = 6):
    """Worker A is killed (SIGKILL) while a trial of its own is running; worker B (the same
    command) finishes the study: A's trial goes stale (no heartbeat), is marked failed and retried
    with its parameters."""
    args = (*args, "--study-name", name, "--n-trials", str(n))
    a = start_worker(config, *args)

    def scoring(trials):  # a trial of A's with all its parameters drawn: scoring runs
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        return len(done) >= 2 and any(len(t.params) == len(done[0].params) for t in running_of(trials, a.pid))

    trials = wait_for(name, url, scoring, a)
    os.kill(a.pid, signal.SIGKILL)
    a.wait()
    study = optuna.load_study(study_name=name, storage=open_storage(url, 0))
    killed = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    assert len(killed) == 1 and killed[0].user_attrs["worker"].endswith(f":{a.pid}")
    killed = killed[0]
    kept = {t.number: t.values for t in trials if t.state == TrialState.COMPLETE}
    _, err = finish(start_worker(config, *args))
    trials = check_study(study, n)
    assert {t.number: t.values for t in trials if t.number in kept} == kept  # nothing redone
    assert study._storage.get_trial(killed._trial_id).state == TrialState.FAIL
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].params == killed.params
    assert "writing outputs" in err
    return study


def test_postgresql_two_workers_share_one_study(world, tmp_path, postgres_url):
    two_workers_one_study(worker_config(world, tmp_path), postgres_url, "pg-two")


def test_postgresql_killed_worker_trial_is_retried(world, tmp_path, postgres_url):
    url = postgres_url
    kill_one_worker_mid_trial(worker_config(world, tmp_path), url, "pg-killed", ("--storage", url))


def test_journal_two_workers_share_one_study(world, tmp_path):
    two_workers_one_study(worker_config(world, tmp_path), f"journal:{tmp_path / 'study.log'}", "j-two")


def test_journal_killed_worker_trial_is_retried(world, tmp_path):
    url = f"journal:{tmp_path / 'study.log'}"
    kill_one_worker_mid_trial(worker_config(world, tmp_path), url, "j-killed", ("--storage", url))


def test_sqlite_search_killed_and_rerun_resumes_to_the_same_outputs(world, tmp_path):
    """kill -9 the default (SQLite) search mid-trial and run the same command again: it resumes,
    keeps the finished trials, retries the killed one and writes the same set of outputs as an
    uninterrupted run."""
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    killed_dir.mkdir(), clean_dir.mkdir()
    cfg_killed, cfg_clean = worker_config(world, killed_dir), worker_config(world, clean_dir)
    url = f"sqlite:///{killed_dir / 'run' / 'study.db'}"
    study = kill_one_worker_mid_trial(cfg_killed, url, "tiny")
    finish(start_worker(cfg_clean, "--n-trials", "6"))
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if not p.name.startswith("."))  # noqa: E731
    assert files(killed_dir / "run") == files(clean_dir / "run")
    header = lambda d: set((d / "trials.csv").read_text().splitlines()[0].split(","))  # noqa: E731
    extra = header(killed_dir / "run") - header(clean_dir / "run")  # the retry is recorded
    # fail_reason when the rerun found the dead pid before Optuna found the stale heartbeat
    assert extra - {"user_attrs_fail_reason"} == {"system_attrs_failed_trial", "system_attrs_retry_history"}
    assert len(study.trials) == 7  # 6 finished + the killed one, recorded as failed


def test_ctrl_c_writes_the_finished_trials_exits_130_and_the_same_command_resumes(world, tmp_path):
    """Ctrl-C mid-search: the outputs of the finished trials are written, no traceback (Optuna
    logged the cut trial's), exit code 130 so that `search && eval` stops (it was 0)."""
    config = worker_config(world, tmp_path)
    url = f"sqlite:///{tmp_path / 'run' / 'study.db'}"
    args = ("--study-name", "c", "--n-trials", "8")
    worker = start_worker(config, *args)
    wait_for("c", url, lambda trials: sum(t.state == TrialState.COMPLETE for t in trials) >= 2, worker)
    worker.send_signal(signal.SIGINT)
    worker.wait(timeout=120)
    err = read_err(worker)
    assert worker.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "interrupted: the study keeps its finished trials" in err
    assert (tmp_path / "run" / "report.md").is_file() and (tmp_path / "run" / "best.yaml").is_file()
    _, err = finish(start_worker(config, *args))
    assert check_study(optuna.load_study(study_name="c", storage=open_storage(url, 0)), 8)


@pytest.mark.parametrize("command", ["optimize.search", "optimize.sweep", "eval.run", "synth.generate"])
def test_ctrl_c_while_a_command_starts_is_one_line(command):
    """Ctrl-C in the first seconds (torch and transformers still importing, before `run_cli`):
    it was the traceback of whatever module was importing."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-m", command, "--config", "nope.yaml"], env=env, stderr=subprocess.PIPE, text=True
    )
    maps = Path(f"/proc/{proc.pid}/maps")
    while proc.poll() is None and "pydantic_core" not in maps.read_text():  # past Python's own start
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == -signal.SIGINT, err[-2000:]  # a shell shows 130
    assert err.strip() == "[alignmerge] interrupted while starting: nothing was done", err[-2000:]


# A worker held right after its trial is created (before the trial's first heartbeat and before
# the trial function records its worker), so that a kill lands exactly there.
STALLED_WORKER = """
import os, sys, time
import optuna
from optimize.search import main

ask = optuna.Study.ask

def stalled_ask(self, *args, **kwargs):
    trial = ask(self, *args, **kwargs)
    if trial.number == int(os.environ["STALL_AT"]):
        time.sleep(3600)
    return trial

optuna.Study.ask = stalled_ask
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("heartbeat_s", [10, 0])
def test_worker_killed_before_its_first_heartbeat_does_not_hang_the_rerun(world, tmp_path, heartbeat_s):
    """A RUNNING trial without a heartbeat is never stale for Optuna: the rerun used to wait for it
    forever (heartbeats on) or stop one trial short (off). It is failed once 2 * heartbeat_s (60 s
    when off) have passed since its start, and retried."""
    config, n = worker_config(world, tmp_path, heartbeat_s=heartbeat_s), 4
    url = f"sqlite:///{tmp_path / 'run' / 'study.db'}"
    stalled = subprocess.Popen(
        [sys.executable, "-c", STALLED_WORKER, "--config", str(config), "--n-trials", str(n)],
        env={**ENV, "STALL_AT": "2"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for("tiny", url, lambda ts: len(ts) > 2 and ts[2].state == TrialState.RUNNING, stalled)
    os.kill(stalled.pid, signal.SIGKILL)
    stalled.wait()
    study = optuna.load_study(study_name="tiny", storage=open_storage(url, 0))
    orphan = study.trials[2]
    assert orphan.state == TrialState.RUNNING and "worker" not in orphan.user_attrs

    started = time.monotonic()
    _, err = finish(start_worker(config, "--n-trials", str(n)), timeout=180)
    assert time.monotonic() - started < (2 * heartbeat_s or 60) + 60
    trials = check_study(study, n)
    assert study.trials[2].state == TrialState.FAIL
    assert "died before starting it" in study.trials[2].user_attrs["fail_reason"]
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == 2]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert "retried with its parameters" in err


def test_heartbeat_off_killed_worker_trial_is_retried(world, tmp_path):
    """With heartbeat_s 0 a killed local worker's trial is found by its dead pid; the rerun used to
    stop one trial short."""
    config = worker_config(world, tmp_path, heartbeat_s=0)
    kill_one_worker_mid_trial(config, f"sqlite:///{tmp_path / 'run' / 'study.db'}", "tiny", n=4)


def test_storage_password_is_never_written_or_printed(world, tmp_path, postgres_url):
    """The server trusts loopback, so any password connects: the URL carries one in both places."""
    secret = "Pw-Zq81"
    url = postgres_url.replace("postgres@", f"postgres:{secret}1@") + f"?password={secret}2"
    proc = start_worker(worker_config(world, tmp_path), "--storage", url, "--n-trials", "2")
    out, err = finish(proc)
    run = tmp_path / "run"
    assert yaml.safe_load((run / "run.yaml").read_text())["storage"] == redact(url)
    written = {p.name: p.read_text(errors="replace") for p in run.rglob("*") if p.is_file()}
    assert {"run.yaml", "report.md", "trials.csv", "best.yaml"} <= set(written)
    assert [name for name, text in written.items() if secret in text] == []
    assert secret not in out + err


# ----------------------------------------------------------------------------- in process
def test_a_recorded_command_hides_the_storage_password():
    """optimize.demo, optimize.ablate, synth.generate and synth.world record their command
    (synth_run.json, the cards)."""
    argv = ["--config", "c.yaml", "--set", "storage=postgresql://u:pw1@h/db?sslpassword=pw2"]
    argv += ["--set=storage=postgresql://u:p@w3@h/db", "--out", "runs/x"]
    line = command_line("optimize.demo", argv)
    assert not any(secret in line for secret in ("pw1", "pw2", "w3"))
    assert line.startswith("python -m optimize.demo --config c.yaml --set 'storage=postgresql://u:***@h/db?")
    assert line.endswith("--out runs/x")


def test_redact_hides_passwords():
    plain = "postgresql://u:secret@db.example:5432/optuna"
    assert redact(plain) == "postgresql://u:***@db.example:5432/optuna"
    # SQLAlchemy ends the password at its first "@" and reads "ss@host" as the host
    assert redact("postgresql://u:p@ss@host/db") == "postgresql://***@host/db"
    query = "postgresql://u@host/db?password=hunter2&sslmode=require"
    assert redact(query) == "postgresql://u@host/db?password=***&sslmode=require"
    several = "mysql://u:a:b@h/db?token=t&Secret=s&pwd=p"
    assert redact(several) == "mysql://u:***@h/db?Secret=***&pwd=***&token=***"  # the query sorted
    for kept in ("sqlite:////runs/x/study.db", "journal:/shared/study.log", "postgresql://host/db"):
        assert redact(kept) == kept
    assert redact("postgresql://u:pw@host:port/db") == "postgresql://***@host:port/db"  # unparsable
    assert redact("not a url u:pw@x") == "***@x"
    ssl = "postgresql://u@h/db?sslpassword=hunter2&sslmode=require&access_token=t"
    assert redact(ssl) == "postgresql://u@h/db?access_token=***&sslmode=require&sslpassword=***"


def test_password_with_a_raw_at_is_refused_before_connecting():
    with pytest.raises(StorageError, match=r"postgresql://\*\*\*@127.0.0.1:1/db: the password holds") as err:
        open_storage("postgresql://u:top@secret@127.0.0.1:1/db", 1)
    assert "secret" not in str(err.value) and "%40" in str(err.value)


def test_surplus_trial_when_workers_race_at_the_end(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}")
    first = [study.ask() for _ in range(3)]  # three workers took the three slots
    assert slots_left(study, 3) == 0
    late = study.ask()  # a fourth worker asked at the same instant
    assert not any(is_surplus(study, t, 3) for t in first)
    assert is_surplus(study, late, 3)
    study.tell(first[0], state=TrialState.FAIL)  # a slot frees up when a trial fails
    assert slots_left(study, 3) == 0  # ...the late trial (running) now holds it
    assert not is_surplus(study, study.ask(), 5)


def test_a_retry_waiting_past_the_target_is_not_run(tmp_path):
    """A worker killed mid-trial leaves a retry waiting; rerun with a lower --n-trials, the study
    already holds them: nothing is started (it was run and failed as 'other workers had taken the
    last slots'). With a higher target the retry is the next trial."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}")
    for x in range(3):
        study.enqueue_trial({"x": float(x)})
        study.optimize(lambda t: t.suggest_float("x", 0, 9), n_trials=1)
    killed = study.ask({"x": optuna.distributions.FloatDistribution(0, 9)})
    study.tell(killed, state=TrialState.FAIL)
    study.enqueue_trial(killed.params)  # optimize.storage's retry of a dead worker's trial
    assert slots_left(study, 2) < 0 and slots_left(study, 3) == 0
    assert slots_left(study, 5) == 2 and study.ask().number == killed.number + 1  # the retry first


def test_sqlite_shared_by_two_workers_warns(tmp_path, capsys):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}")
    other = study.ask()
    other.set_user_attr("worker", "another-host:123")
    assert other_workers(study) == {"another-host:123"}
    done = study.ask()
    study.tell(done, 1.0)
    Quota(5, f"sqlite:///{tmp_path / 's.db'}")(study, study.trials[done.number])
    assert "several workers share this SQLite study" in capsys.readouterr().err
    dead = study.ask()
    dead.set_user_attr("worker", f"{socket.gethostname()}:999999999")  # a pid that does not exist
    assert other_workers(study) == {"another-host:123"}


def test_unreachable_storage_fails_before_models_load(world, tmp_path):
    with pytest.raises(StorageError, match=r"cannot open storage postgresql://u:\*\*\*@127.0.0.1"):
        open_storage(f"postgresql://u:secret@127.0.0.1:{_free_port()}/db", 1)
    with pytest.raises(StorageError, match="folder .* does not exist"):
        open_storage(f"journal:{tmp_path / 'missing' / 'study.log'}", 1)
    run = tmp_path / "run"
    outputs = ("report.md", "demo.json", "sweep.json", "merged/x.db", "data/s.log", "my%20run.md", "")
    for name in outputs:  # an output written over the journal lost every trial
        url = f"sqlite:///{run / name}" if name.endswith(".db") or "%" in name else f"journal:{run / name}"
        with pytest.raises(StorageError, match="inside the run folder .* could be replaced by them"):
            claim_and_open(run, url, 0)
    assert not run.exists()
    claim_and_open(run, f"journal:{run / 'study.log'}", 0)  # beside the outputs: fine
    cfg = worker_config(world, tmp_path)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "optimize.search",
            "--config",
            str(cfg),
            "--storage",
            f"postgresql://u:secret@127.0.0.1:{_free_port()}/db",
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "cannot open storage" in proc.stderr and "secret" not in proc.stderr
    assert not (tmp_path / "run" / "study.db").exists()


# ----------------------------------------------------------------------------- damaged storages
def journal_with_trials(path: Path, n: int) -> optuna.Study:
    study = optuna.create_study(study_name="j", storage=open_storage(f"journal:{path}", 0))
    for i in range(n):
        study.tell(study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}), float(i))
    return study


def test_journal_cut_mid_record_is_set_aside_and_the_study_goes_on(tmp_path, capsys):
    """A worker killed (or a full disk) mid-append leaves a half line; the next append used to be
    glued to it, which made the whole journal unreadable for good."""
    path = tmp_path / "study.log"
    journal_with_trials(path, 2).ask()  # a third trial starts, then the append is cut
    whole = path.read_bytes()
    cut_at = len(whole) - 10
    path.write_bytes(whole[:cut_at])
    last_line = whole.rindex(b"\n", 0, cut_at) + 1
    study = optuna.load_study(study_name="j", storage=open_storage(f"journal:{path}", 0))
    cut = list(tmp_path.glob("study.log.cut-*"))
    assert len(cut) == 1 and cut[0].read_bytes() == whole[last_line:cut_at]  # nothing lost
    assert path.read_bytes() == whole[:last_line]
    err = capsys.readouterr().err
    assert err.startswith("[alignmerge] journal") and f"set aside in {cut[0]}" in err
    assert [t.value for t in study.trials if t.state == TrialState.COMPLETE] == [0.0, 1.0]
    study.tell(study.ask(), 7.0)
    again = optuna.load_study(study_name="j", storage=open_storage(f"journal:{path}", 0))
    assert [t.value for t in again.trials if t.state == TrialState.COMPLETE] == [0.0, 1.0, 7.0]
    assert list(tmp_path.glob("study.log.cut-*")) == cut  # the repaired journal is left as it is


def test_a_file_that_is_not_a_journal_is_refused_untouched(tmp_path):
    """--storage naming a user's file: Optuna used to append a record to it, then fail."""
    text = tmp_path / "notes.log"
    text.write_bytes(b"not json at all\n")
    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "p", "response": "r"}] * 3)
    blob = tmp_path / "weights.bin"
    blob.write_bytes(bytes(range(256)) * 64)  # no newline at all: not taken for a cut record
    for path in (text, data, blob):
        before = path.read_bytes()
        with pytest.raises(
            StorageError, match=r"line 1 is not an Optuna journal record.*nothing was changed"
        ):
            open_storage(f"journal:{path}", 0)
        assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "notes.log", "weights.bin"]


def test_a_journal_with_a_garbage_line_is_refused_with_its_number(tmp_path):
    path = tmp_path / "study.log"
    journal_with_trials(path, 1)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join([*lines[:2], b"garbage\n", *lines[2:]]))
    before = path.read_bytes()
    with pytest.raises(StorageError, match=rf"journal:{path}: line 3 is not an Optuna journal record"):
        open_storage(f"journal:{path}", 0)
    assert path.read_bytes() == before
    path.write_bytes(b"".join([*lines, b'{"op_code":4,"worker_id":"w"}\n']))  # a record without its fields
    with pytest.raises(StorageError, match=r"Optuna cannot replay the journal \(KeyError: 'study_id'\)"):
        open_storage(f"journal:{path}", 0)


def test_sqlite_waits_for_a_lock_held_by_another_process(tmp_path):
    """A sqlite3 shell or a dashboard holding a lock for a while during a search used to end it with
    "database is locked" after sqlite3's 5 s (an Optuna-internal traceback)."""
    db = tmp_path / "study.db"
    study = optuna.create_study(study_name="s", storage=open_storage(f"sqlite:///{db}", 0))
    locked = threading.Event()

    def hold(seconds: float = 6.5):
        other = sqlite3.connect(db, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        locked.set()
        time.sleep(seconds)
        other.execute("COMMIT")
        other.close()

    holder = threading.Thread(target=hold)
    holder.start()
    locked.wait()
    started = time.monotonic()
    study.tell(study.ask(), 1.0)  # waits for the lock
    assert time.monotonic() - started > 5
    holder.join()
    again = optuna.load_study(study_name="s", storage=open_storage(f"sqlite:///{db}", 0))
    assert [t.value for t in again.trials] == [1.0]


def test_a_corrupt_sqlite_file_is_refused_with_the_fix(tmp_path):
    """The hint used to be about servers ("that the server runs"), for the default SQLite file."""
    good = tmp_path / "good.db"
    optuna.create_study(study_name="s", storage=f"sqlite:///{good}")
    half, junk = tmp_path / "half.db", tmp_path / "junk.db"
    half.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    junk.write_bytes(b"not a database\n" * 100)
    for path in (half, junk):
        with pytest.raises(StorageError) as err:
            open_storage(f"sqlite:///{path}", 0)
        assert f"{path} is corrupt or not a SQLite database: move it away to start a new study" in str(
            err.value
        )
        assert "restore it from a copy" in str(err.value) and "server" not in str(err.value)
