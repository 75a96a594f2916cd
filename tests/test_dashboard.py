"""optuna-dashboard opens a search's study as is: the storage string given to `--storage` (SQLite,
or a journal file's path) is the one the dashboard takes, and it shows the study, its trials and
the names of the objectives."""

import json
import os
import subprocess
import sys
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import optuna
import pytest
import yaml
from optuna_dashboard import wsgi

from core.errors import StorageError
from optimize.config import validate_config
from optimize.search import run
from optimize.storage import HEARTBEAT_ATTR, JournalHeartbeatStorage, open_storage
from optimize.study import trials_frame
from tests.conftest import world_config

ROOT = Path(__file__).resolve().parents[1]


def api(app, path: str) -> dict:
    """GET `path` from the dashboard's WSGI app, as its web page does."""
    environ = {"PATH_INFO": path, "REQUEST_METHOD": "GET"}
    setup_testing_defaults(environ)
    status = []
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    assert status == ["200 OK"], body
    return json.loads(body)


@pytest.mark.parametrize(
    "storage, objective, names",
    [
        ("sqlite", "weighted", ["L_align + 0.3 L_domain"]),
        ("journal", "pareto", ["L_align", "L_domain"]),
    ],
)
def test_dashboard_opens_the_study_of_a_search(world, tmp_path, storage, objective, names):
    raw = world_config(world, tmp_path / "run", n_trials=2, objective=objective, parametrization="global")
    raw["search"]["sampler"] = "nsga2" if objective == "pareto" else "tpe"
    raw["output"] = {"plots": False, "save_model": False}
    url = str(tmp_path / "study.log") if storage == "journal" else None  # None: the run's study.db
    run(validate_config(raw), storage=url)
    url = url or f"sqlite:///{tmp_path / 'run' / 'study.db'}"

    app = wsgi(url)  # what `optuna-dashboard URL` serves, through the dashboard's own storage parsing
    [study] = api(app, "/api/studies")["study_summaries"]
    assert study["study_name"] == "tiny" and study["directions"] == ["minimize"] * len(names)
    detail = api(app, f"/api/studies/{study['study_id']}")
    assert detail["objective_names"] == names
    assert [t["state"] for t in detail["trials"]] == ["Complete", "Complete"]
    assert all(len(t["values"]) == len(names) for t in detail["trials"])
    assert {"signature"} <= {a["key"] for a in detail["user_attrs"]}
    if storage == "journal":  # the dashboard read trials that carry our heartbeat attribute
        trials = optuna.load_study(study_name="tiny", storage=open_storage(url, 0)).trials
        assert all(HEARTBEAT_ATTR in t.system_attrs for t in trials)


def test_journal_file_path_alone_is_a_storage(tmp_path, monkeypatch):
    assert isinstance(open_storage(str(tmp_path / "study.log"), 1), JournalHeartbeatStorage)
    optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}")
    with pytest.raises(StorageError, match=r"is a SQLite database; give sqlite:////"):
        open_storage(str(tmp_path / "study.db"), 1)
    with pytest.raises(StorageError, match="storage postgres is neither a URL .* nor a journal file"):
        open_storage("postgres", 1)
    typos = ("postgresql//alice:S3cret@db.example/optuna", "postgresql/alice:S3cret@db/optuna")
    for typo in (*typos, " postgresql://alice:S3cret@db/optuna"):
        with pytest.raises(StorageError, match="is neither a URL") as err:  # not a journal file path
            open_storage(typo, 1)
        assert "S3cret" not in str(err.value) and "***@db" in str(err.value)
    monkeypatch.chdir(tmp_path)  # relative paths too
    for folder, odd in (("scratch", "scratch//study.log"), ("me@corp", f"{tmp_path}/me@corp/study.log")):
        (tmp_path / folder).mkdir()  # a doubled slash, an @ in a folder name: still journal files
        assert isinstance(open_storage(odd, 1), JournalHeartbeatStorage)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # set_metric_names
@pytest.mark.parametrize(
    "names, columns", [(["L_align + 0.3 L_domain"], ["value"]), (["a", "b"], ["values_0", "values_1"])]
)
def test_named_values_keep_the_trials_table_header(names, columns):
    study = optuna.create_study(directions=["minimize"] * len(names))
    study.set_metric_names(names)
    study.add_trial(optuna.trial.create_trial(values=[1.0] * len(names)))
    assert [c for c in trials_frame(study).columns if c.startswith("value")] == columns


READ_TRACKIO = """
import json, sys
from trackio.sqlite_storage import SQLiteStorage
project, run = sys.argv[1:]
print(json.dumps({"runs": SQLiteStorage.get_runs(project), "logs": SQLiteStorage.get_logs(project, run),
                  "config": SQLiteStorage.get_run_config(project, run)}))
"""


def test_tracking_logs_every_trial_to_a_local_trackio_store(world, tmp_path):
    """tracking.backend trackio: one trackio run per study, a step per trial with its objective,
    losses and parameters, then the chosen trial's scores; stdout stays the report's path."""
    raw = world_config(world, tmp_path / "run", n_trials=3, parametrization="global")
    raw["output"] = {"plots": False, "save_model": False, "mergekit": False}
    raw["storage"] = f"journal:{tmp_path / 'journal.log'}"
    raw["tracking"] = {"backend": "trackio", "dir": str(tmp_path / "trackio")}
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k != "TRACKIO_DIR"}
    cmd = [sys.executable, "-m", "optimize.search", "--config", str(config)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == str(tmp_path / "run" / "report.md")

    env["TRACKIO_DIR"] = str(tmp_path / "trackio")
    read = [sys.executable, "-c", READ_TRACKIO, "alignmerge-tiny", "tiny"]
    found = json.loads(subprocess.run(read, env=env, capture_output=True, text=True, check=True).stdout)
    assert found["runs"] == ["tiny"]
    logs = {row["step"]: row for row in found["logs"]}
    study = optuna.load_study(study_name="tiny", storage=open_storage(raw["storage"], 0))
    for t in study.trials:
        assert logs[t.number]["L_align + 0.3 L_domain"] == pytest.approx(t.value)
        assert logs[t.number]["alignment_loss"] == pytest.approx(t.user_attrs["alignment_loss"])
        assert {f"param/{k}" for k in t.params} <= set(logs[t.number])
    best = yaml.safe_load((tmp_path / "run" / "best.yaml").read_text())
    chosen = logs[len(study.trials)]
    assert chosen["chosen/objective"] == pytest.approx(best["scores"]["objective"])
    assert found["config"]["search"]["n_trials"] == 3 and "journal.log" in found["config"]["storage"]
