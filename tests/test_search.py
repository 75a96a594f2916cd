"""The search end to end on the tiny world: outputs, resume, Pareto, grid, failures."""

import csv
import math
import subprocess
import sys

import optuna
import pytest
import torch
import yaml
from safetensors.torch import load_file

from core.errors import ConfigError
from optimize.config import validate_config
from optimize.search import run
from tests.conftest import world_config

FILES = [
    "best.yaml",
    "mergekit.yaml",
    "trials.csv",
    "run.yaml",
    "report.md",
    "study.db",
    "merged/model.safetensors",
    "merged/tokenizer.json",
    "merged/README.md",
    "merged/chat_template.jinja",
    "plots/history.png",
    "plots/losses.png",
    "plots/coefficients.png",
]


def trials(run_dir):
    with open(run_dir / "trials.csv") as f:
        return list(csv.DictReader(f))


def test_search_writes_every_output_and_mergekit_reproduces_it(world, tmp_path):
    raw = world_config(world, tmp_path / "run", n_trials=3)
    raw["merge"] = {"method": "ties", "normalize": False}
    raw["output"] = {"plots": True}
    cfg = validate_config(raw)
    report = run(cfg)
    assert report == cfg.run_dir / "report.md"
    for f in FILES:
        assert (cfg.run_dir / f).exists(), f
    best = yaml.safe_load((cfg.run_dir / "best.yaml").read_text())
    assert set(best["coefficients"]) == {
        "embed",
        "layers.0",
        "layers.1",
        "layers.2",
        "layers.3",
        "norm",
        "lm_head",
    }
    assert set(best["coefficients"]["layers.2"]) == {"weight", "density"}
    assert math.isclose(
        best["scores"]["objective"],
        best["scores"]["alignment_loss_search"] + 0.3 * best["scores"]["domain_loss_search"],
        rel_tol=1e-4,
    )
    rows = trials(cfg.run_dir)
    assert len(rows) == 3 and all(r["state"] == "COMPLETE" for r in rows)
    assert min(float(r["value"]) for r in rows) == pytest.approx(best["scores"]["objective"], rel=1e-4)
    text = (cfg.run_dir / "report.md").read_text()
    assert "| base |" in text and "merged (trial" in text and "plots/losses.png" in text
    assert "What was and was not evaluated" in (cfg.run_dir / "merged/README.md").read_text()
    mergekit_rebuilds_the_merged_model(cfg.run_dir, tmp_path / "mk")


def mergekit_rebuilds_the_merged_model(run_dir, out):
    """The command in mergekit.yaml's header, run as-is from the run folder, rebuilds the model."""
    header = (run_dir / "mergekit.yaml").read_text().splitlines()[1]
    command = header.removeprefix("#").split()
    assert command[:3] == ["mergekit-yaml", "mergekit.yaml", "OUT"], header
    command[0], command[2] = sys.executable.replace("python", "mergekit-yaml"), str(out)
    subprocess.run([*command, "--no-write-model-card"], cwd=run_dir, check=True, capture_output=True)
    ours, theirs = load_file(run_dir / "merged/model.safetensors"), load_file(out / "model.safetensors")
    for n in ours:
        torch.testing.assert_close(ours[n], theirs[n], rtol=1e-5, atol=1e-6)


def test_lora_source_recipe_stays_an_adapter_and_mergekit_reproduces_it(world, tmp_path):
    raw = world_config(world, tmp_path / "run", n_trials=2)
    raw["sources"][1]["path"] = str(world["lora"])
    raw["merge"] = {"method": "ties", "normalize": False}
    cfg = validate_config(raw)
    run(cfg)
    recipe = yaml.safe_load((cfg.run_dir / "mergekit.yaml").read_text())
    assert recipe["models"][1]["model"].startswith(recipe["base_model"] + "+")
    assert not (cfg.run_dir / "sources").exists()  # nothing model-sized written for the adapter
    mergekit_rebuilds_the_merged_model(cfg.run_dir, tmp_path / "mk")


def test_rerun_resumes_and_counts_finished_trials(world, tmp_path):
    raw = world_config(world, tmp_path / "run", n_trials=2)
    run(validate_config(raw))
    first = trials(tmp_path / "run")
    raw["search"]["n_trials"] = 4
    run(validate_config(raw))
    second = trials(tmp_path / "run")
    assert len(second) == 4
    assert [r["value"] for r in second[:2]] == [r["value"] for r in first]  # kept, not redone
    run(validate_config(raw))  # target already met: no new trial
    assert len(trials(tmp_path / "run")) == 4


def test_a_run_folder_named_like_a_url_query_keeps_its_own_study(world, tmp_path):
    """`--out 'run?x=1'`: the default storage URL was not escaped, so SQLAlchemy wrote the study to
    the file `run` and a second folder `run?x=2` resumed the first one's trials."""
    for name in ("run?x=1", "run?x=2", "b%41#c"):
        run(validate_config(world_config(world, tmp_path / name, n_trials=1)))
        assert (tmp_path / name / "study.db").is_file() and len(trials(tmp_path / name)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b%41#c", "run?x=1", "run?x=2"]


def test_resume_with_another_search_space_is_refused(world, tmp_path):
    raw = world_config(world, tmp_path / "run", n_trials=1)
    run(validate_config(raw))
    raw["search"]["parametrization"] = "global"
    with pytest.raises(ConfigError, match=r"made with other settings(.|\n)*params: study has"):
        run(validate_config(raw))
    raw["search"]["parametrization"] = "layerwise"
    raw["data"]["n_domain"] = 3  # other data: the old trials' losses are not comparable
    with pytest.raises(ConfigError, match=r"data: study has \w+ \(6 alignment, 6 domain\), config asks"):
        run(validate_config(raw))
    raw["data"]["n_domain"] = 6
    raw.setdefault("runtime", {})["dtype"] = "bfloat16"  # losses as far apart as trials
    with pytest.raises(
        ConfigError, match="precision: study has compute float32, store float32, config asks "
    ):
        run(validate_config(raw))
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    study.set_user_attr(
        "signature", {k: v for k, v in study.user_attrs["signature"].items() if k != "precision"}
    )
    raw["runtime"]["dtype"] = "float32"
    run(validate_config(raw))  # a study made before its precision was recorded resumes


def test_pareto_objective_reports_front_and_rule(world, tmp_path):
    raw = world_config(
        world, tmp_path / "run", n_trials=4, objective="pareto", sampler="nsga2", pareto_rule="knee"
    )
    raw["output"] = {"plots": True, "save_model": False}
    cfg = validate_config(raw)
    run(cfg)
    text = (cfg.run_dir / "report.md").read_text()
    assert "## Pareto front" in text and "(chosen)" in text and "knee" in text
    assert (cfg.run_dir / "plots/pareto.png").exists()
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{cfg.run_dir / 'study.db'}")
    assert len(study.directions) == 2


@pytest.mark.parametrize("sampler", ["cmaes", "gp", "random", "grid"])
def test_samplers_run(world, tmp_path, sampler):
    raw = world_config(world, tmp_path / "run", n_trials=3, sampler=sampler, parametrization="global")
    raw["output"] = {"plots": False, "save_model": False}
    run(validate_config(raw))
    assert len(trials(tmp_path / "run")) == 3


def test_same_seed_same_trials(world, tmp_path):
    values = []
    for k in range(2):
        raw = world_config(world, tmp_path / f"run{k}", n_trials=3, sampler="tpe", seed=5)
        raw["output"] = {"plots": False, "save_model": False}
        run(validate_config(raw))
        values.append([r["value"] for r in trials(tmp_path / f"run{k}")])
    assert values[0] == values[1]


def test_a_diverged_source_is_refused_and_a_study_without_a_finished_trial_says_why(
    world, tmp_path, monkeypatch
):
    """NaN weights (a diverged fine-tune) are refused when the task vectors load, naming the
    tensor; a search that ends without a finished trial says why (the first fail_reason, or the
    timeout), as one error line, not a RuntimeError."""
    import shutil

    from safetensors.torch import save_file

    from core.errors import ModelLoadError, UserError
    from eval import loss

    bad = shutil.copytree(world["b"], tmp_path / "diverged")
    weights = load_file(bad / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    raw = world_config(world, tmp_path / "run", n_trials=2)
    raw["sources"][1]["path"] = str(bad)
    with pytest.raises(ModelLoadError, match=r"source 'b': model.layers.0.mlp.up_proj.weight holds NaN"):
        run(validate_config(raw))

    real = loss.response_scores

    def always_nan(*a, **k):
        ce, mass = real(*a, **k)
        return ce * float("nan"), mass

    monkeypatch.setattr(loss, "response_scores", always_nan)
    raw = world_config(world, tmp_path / "run2", n_trials=2)
    with pytest.raises(
        UserError, match="no trial completed: 5 failed, the first because of: non-finite loss"
    ):
        run(validate_config(raw))


def test_non_finite_loss_fails_the_trial_and_the_study_goes_on(world, tmp_path, monkeypatch):
    from eval import loss

    real = loss.response_scores
    calls = {"n": 0}

    def sometimes_nan(*a, **k):
        ce, mass = real(*a, **k)
        calls["n"] += 1
        return (ce * float("nan") if calls["n"] <= 2 else ce), mass  # the first trial's batches

    monkeypatch.setattr(loss, "response_scores", sometimes_nan)
    raw = world_config(world, tmp_path / "run", n_trials=2)
    raw["data"]["batch_tokens"] = 4096  # one batch per set
    raw["output"] = {"plots": False, "save_model": False}
    run(validate_config(raw))
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    states = [t.state.name for t in study.trials]
    assert states.count("FAIL") == 1 and states.count("COMPLETE") == 2
    failed = next(t for t in study.trials if t.state.name == "FAIL")
    assert "non-finite loss" in failed.user_attrs["fail_reason"]
