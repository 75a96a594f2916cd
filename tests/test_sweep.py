"""The sweep runner on the tiny world: every point its own study in one storage, resumed, summed up."""

import datetime
import json
from types import SimpleNamespace

import optuna
import pytest
import yaml

import optimize.sweep as sweep_mod
from optimize.config import load_config
from optimize.sweep import label_of, main, parse_grid, reusable
from tests.conftest import world_config


@pytest.fixture
def config_file(world, tmp_path):
    raw = world_config(world, tmp_path / "unused", n_trials=2)
    raw["output"] = {"plots": False, "save_model": False, "mergekit": False}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_every_point_is_a_study_of_one_storage_resumed_and_summed_up(
    config_file, tmp_path, monkeypatch, capsys
):
    prepared = []
    real_prepare = sweep_mod.prepare
    monkeypatch.setattr(
        sweep_mod, "prepare", lambda cfg, rows: prepared.append(cfg) or real_prepare(cfg, rows)
    )
    out = tmp_path / "sweep"
    argv = [
        "--config",
        str(config_file),
        "--out",
        str(out),
        "--grid",
        "search.alpha=0.1,1",
        "merge.method=task_arithmetic,ties",
    ]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(out / "sweep.md")

    storage = f"sqlite:///{out / 'sweep.db'}"
    names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage))
    assert names == sorted(
        f"tiny[alpha={a},method={m}]" for a in ("0.1", "1") for m in ("task_arithmetic", "ties")
    )
    for name in names:
        study = optuna.load_study(study_name=name, storage=storage)
        assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 2
    # the two alpha points of a method share the loaded models: one context per method
    assert sorted(c.merge.method for c in prepared) == ["task_arithmetic", "ties"]

    rows = json.loads((out / "sweep.json").read_text())
    assert {r["status"] for r in rows} == {"done"}
    for r in rows:
        best = yaml.safe_load((out / r["point"] / "best.yaml").read_text())
        assert (best["alpha"], best["method"]) == (r["search.alpha"], r["merge.method"])
        assert r["objective"] == pytest.approx(
            r["alignment_loss_search"] + r["search.alpha"] * r["domain_loss_search"], abs=1e-4
        )
    table = (out / "sweep.md").read_text()
    assert all(f"| {r['point']} | done |" in table for r in rows)
    assert (out / "sweep.png").stat().st_size > 0

    # the same command again: nothing new; more trials: each point resumes its own study
    assert main(argv) == 0
    assert main(argv + ["--n-trials", "3"]) == 0
    for name in names:
        assert len(optuna.load_study(study_name=name, storage=storage).trials) == 3


def test_grid_values_are_yaml_and_labels_name_the_point():
    grid = parse_grid(["search.alpha=0.1,1", "search.grid=[0.5,1],[1]", "merge.method=ties"])
    assert grid == {"search.alpha": [0.1, 1], "search.grid": [[0.5, 1], [1]], "merge.method": ["ties"]}
    assert label_of({"search.alpha": 0.1, "merge.method": "ties"}) == "alpha=0.1,method=ties"
    assert label_of({"search.grid": [0.5, 1]}) == "grid=_0.5,1_"


@pytest.mark.parametrize(
    "grid, expected",
    [
        (["search.alpha"], "expected KEY=V1,V2"),
        (["search.alpha="], "expected KEY=V1,V2"),
        (["search.alpha=0.1,0.1"], "listed twice"),
        (["search.alpha=[0.1"], "not a comma-separated list"),
        (["search.alpha=&a [*a]"], "not a comma-separated list"),  # a YAML alias inside itself
        (["search.alpha=0.1", "search.alpha=1"], "given twice"),
        (["merge.method=ties,nosuch"], "sweep point method=nosuch"),
        (["search.alpha=0.1,-1"], "sweep point alpha=-1"),
        (["out=a,b"], "give each key once"),
        (["search.n_trials=2,3"], "give each key once"),
        (
            ["data.alignment=/nonexistent/a.jsonl"],
            "sweep point alignment=_nonexistent_a.jsonl: data not found",
        ),
    ],
)
def test_bad_grids_fail_before_anything_runs(config_file, tmp_path, capsys, grid, expected):
    out = tmp_path / "sweep"
    argv = ["--config", str(config_file), "--out", str(out), "--n-trials", "2", "--grid", *grid]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err, err
    assert not out.exists()


def test_an_unreachable_storage_fails_before_any_model_loads(config_file, tmp_path, capsys, monkeypatch):
    import optimize.sweep as sweep_module

    monkeypatch.setattr(sweep_module, "prepare", lambda *a: pytest.fail("models loaded"))
    url = "postgresql://u:secret@127.0.0.1:9/db"  # port 9 (discard): nothing listens
    argv = ["--config", str(config_file), "--out", str(tmp_path / "sweep"), "--grid", "search.alpha=0.1,1"]
    assert main([*argv, "--storage", url]) == 2
    err = capsys.readouterr().err
    assert "cannot open storage postgresql://u:***@127.0.0.1:9/db" in err and "secret" not in err


def test_points_share_loaded_models_only_when_nothing_loaded_differs(config_file):
    def point(**sets):
        return load_config(config_file, {f"search.{k}": v for k, v in sets.items()})

    first = point(alpha=0.3)
    ctx = SimpleNamespace(cfg=first, rows={"alignment": [], "domain": []})
    assert reusable(ctx, point(alpha=1.0, seed=3, sampler="cmaes"))
    assert not reusable(ctx, point(sampler="grid"))  # the grid's own densities
    assert not reusable(ctx, point(init_weight=0.9))  # the space's initial point
    assert not reusable(ctx, point(parametrization="global"))
    assert not reusable(ctx, point(beta=1.0))  # helpfulness was not loaded
    assert not reusable(None, first)
    assert label_of({"name": datetime.date(2024, 1, 2)}) == "name=_2024-01-02_"
