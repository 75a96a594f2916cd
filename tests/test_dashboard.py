"""optuna-dashboard opens a search's study as is: the storage string given to `--storage` (SQLite,
or a journal file's path) is the one the dashboard takes, and it shows the study, its trials and
the names of the objectives."""

import json
from wsgiref.util import setup_testing_defaults

import optuna
import pytest
from optuna_dashboard import wsgi

from core.errors import StorageError
from optimize.config import validate_config
from optimize.search import run
from optimize.storage import HEARTBEAT_ATTR, JournalHeartbeatStorage, open_storage
from optimize.study import trials_frame
from tests.conftest import world_config


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


def test_journal_file_path_alone_is_a_storage(tmp_path):
    assert isinstance(open_storage(str(tmp_path / "study.log"), 1), JournalHeartbeatStorage)
    optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}")
    with pytest.raises(StorageError, match=r"is a SQLite database; give sqlite:////"):
        open_storage(str(tmp_path / "study.db"), 1)
    with pytest.raises(StorageError, match="storage postgres is neither a URL .* nor a journal file"):
        open_storage("postgres", 1)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # set_metric_names
@pytest.mark.parametrize(
    "names, columns", [(["L_align + 0.3 L_domain"], ["value"]), (["a", "b"], ["values_0", "values_1"])]
)
def test_named_values_keep_the_trials_table_header(names, columns):
    study = optuna.create_study(directions=["minimize"] * len(names))
    study.set_metric_names(names)
    study.add_trial(optuna.trial.create_trial(values=[1.0] * len(names)))
    assert [c for c in trials_frame(study).columns if c.startswith("value")] == columns
