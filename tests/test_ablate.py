"""The ablation runner end to end on the tiny world: rows, columns, grid choices made on the
search splits, LM-Cocktail weights, sampler studies, resume, config errors."""

import csv
import json
import math
import re
import shlex

import datasets
import numpy as np
import optuna
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.errors import ConfigError
from eval.behaviour import refusals
from eval.data import load_pairs
from eval.judge import RefusalJudge
from eval.loss import Scorer
from eval.suites import suite_prompts
from optimize.ablate import main
from optimize.ablate_config import load_ablation
from optimize.ablate_report import COLUMNS
from optimize.config import validate_config
from optimize.context import prepare
from optimize.methods import Candidate, Ties
from optimize.storage import sqlite_url
from tests.conftest import SENTENCES, world_config

SUITE = "weighted-safety-refusal"

LABELS = [
    "base",
    "source: a (alignment)",
    "source: b (domain)",
    "task arithmetic, uniform",
    "TIES, grid",
    "DARE-TIES, grid",
    "SLERP, grid",
    "MergeAlign, grid",
    "LM-Cocktail, D_domain",
    "LM-Cocktail, D_domain ∪ D_safety",
    "domain-only search (EvoMM)",
    "safety-aware search, paper objective",
    "safety-aware search (alignmerge)",
]
# what a reader of ablation.csv needs: how each row was picked and its test-split numbers
REQUIRED = ["row", "merge", "weighting", "picked_on", "setting", "objective_search", "refused_harmful"]
REQUIRED += ["domain_loss_test", "alignment_loss_test", "refused_benign"]
SAMPLERS = ["tpe", "cmaes", "random", "gp", "gradient"]
T = 0.01  # the tiny sources' CEs differ by ~1e-3: a low temperature makes their weights differ


def splits(root):
    """A DatasetDict like synth.generate's: search and test splits that differ, and benign."""
    pairs = [(a, b) for a in SENTENCES for b in SENTENCES]
    cut = {
        "alignment_search": pairs[0:6],
        "alignment_test": pairs[6:10],
        "domain_search": pairs[10:16],
        "domain_test": pairs[16:21],
        "benign_search": pairs[2:6],
        "benign": pairs[21:25],
    }
    dd = datasets.DatasetDict(
        {
            name: datasets.Dataset.from_list(
                [{"prompt": p, "response": r, "category": f"c{i % 2}"} for i, (p, r) in enumerate(rows)]
            )
            for name, rows in cut.items()
        }
    )
    dd.save_to_disk(str(root / "data"))
    return root / "data"


def write_configs(world, root, **ablation):
    search = world_config(world, root / "unused")
    search["merge"] = {"method": "ties", "normalize": False}
    search["search"].update(parametrization="global", beta=1.0, verify={"top_k": 2, "max_new_tokens": 4})
    search["data"] = {"dir": str(splits(root)), "batch_tokens": 256}
    (root / "search.yaml").write_text(yaml.safe_dump(search))
    abl = {
        "name": "abl",
        "search_config": "search.yaml",
        "cocktail_temperature": T,
        "grids": {
            "weights": [0.5, 1.0],
            "densities": [0.5, 1.0],
            "slerp_t": [0.2, 0.8],
            "mergealign_lambda": [0.3, 0.7],
        },
        "searches": {"n_trials": 3},
        "samplers": {"names": SAMPLERS, "seeds": [0, 1, 2], "n_trials": 3, "n_alignment": 4, "n_domain": 4},
        "evaluation": {"max_new_tokens": 4, "suites": [SUITE]},
        "quick": {"samplers": {"n_trials": 2}, "searches": {"n_trials": 1}},
        **ablation,
    }
    (root / "ablations.yaml").write_text(yaml.safe_dump(abl, allow_unicode=True))
    return root / "ablations.yaml", search


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def losses(model, tok, sets):
    return Scorer(tok, sets, batch_tokens=256).losses(model)


@pytest.fixture(scope="module")
def ablation(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation")
    path, search = write_configs(world, root)
    out = root / "run"
    assert main(["--config", str(path), "--out", str(out)]) == 0
    return {"root": root, "out": out, "path": path, "search": search, "data": root / "data"}


def test_table_rows_columns_and_files(ablation):
    out = ablation["out"]
    for f in ["ablation.md", "ablation.csv", "ablation.json", "grid.csv", "samplers.csv", "study.db"]:
        assert (out / f).exists(), f
    assert (out / "plots/ablation.png").stat().st_size > 0 and (out / "plots/samplers.png").exists()
    dashboard = re.search(r"`(optuna-dashboard [^`]+)`", (out / "ablation.md").read_text()).group(1)
    assert shlex.split(dashboard) == ["optuna-dashboard", sqlite_url(out / "study.db")]  # runs as shown
    with open(out / "ablation.csv") as f:
        header = next(csv.reader(f))
    assert header == COLUMNS + [f"{SUITE}: refused_harmful", f"{SUITE}: refused_benign"]
    assert set(REQUIRED) <= set(header)
    rows = read_csv(out / "ablation.csv")
    assert [r["row"] for r in rows] == LABELS
    picked = {r["row"]: r["picked_on"] for r in rows}
    assert picked["safety-aware search (alignmerge)"].endswith(
        "L_align + 0.3 L_domain + 1.0 L_help, verified by generation on the search prompts"
    )
    assert picked["safety-aware search, paper objective"].endswith(": L_align + 0.3 L_domain")
    for r in rows:
        assert 0 <= float(r["refused_harmful"]) <= 1 and 0 <= float(r["refused_benign"]) <= 1
        assert float(r["domain_loss_test"]) > 0
    md = (out / "ablation.md").read_text()
    for label in LABELS:
        assert f"| {label} |" in md
    assert "picked on the search splits" in md and "measured on the test splits" in md
    for s in SAMPLERS:
        assert f"| {s} | {1 if s == 'gradient' else 3} |" in md


def test_test_columns_are_the_test_split_scores_of_the_chosen_model(world, ablation):
    """The base row (no choice) scored independently on the test splits, from its own folder."""
    tok = AutoTokenizer.from_pretrained(world["base"])
    model = AutoModelForCausalLM.from_pretrained(world["base"], dtype=torch.float32).eval()
    test = {k: load_pairs(ablation["data"], f"{k}_test") for k in ("alignment", "domain")}
    expect = losses(model, tok, test)
    base = read_csv(ablation["out"] / "ablation.csv")[0]
    assert float(base["domain_loss_test"]) == pytest.approx(expect["domain"], rel=1e-4)
    assert float(base["alignment_loss_test"]) == pytest.approx(expect["alignment"], rel=1e-4)
    # the external suite's prompts, answered and judged apart from the test splits
    for kind, prompts in zip(("harmful", "benign"), suite_prompts([SUITE])[SUITE]):
        assert len(prompts) == 60
        share = refusals(model, tok, prompts, RefusalJudge(), max_new_tokens=4)["share"]
        assert float(base[f"{SUITE}: refused_{kind}"]) == pytest.approx(share)


def test_grid_points_are_chosen_on_the_search_splits(ablation):
    grid = read_csv(ablation["out"] / "grid.csv")
    for method in ("ties", "dare_ties", "slerp", "mergealign"):
        points = [g for g in grid if g["merge"] == method]
        assert len(points) == (4 if "ties" in method else 2)
        best = min(points, key=lambda g: float(g["objective_search"]))
        assert [g["chosen"] for g in points].count("True") == 1 and best["chosen"] == "True"
    # TIES rescored independently: search-split objective, and test losses of the chosen point
    cfg = validate_config(ablation["search"])
    ctx = prepare(cfg)
    ctx.merger.method = Ties(normalize=False)
    tok, d = ctx.base.tokenizer, ablation["data"]
    search = {k: load_pairs(d, f"{k}_search") for k in ("alignment", "domain")}
    search["helpfulness"] = load_pairs(d, "benign_search")
    test = {k: load_pairs(d, f"{k}_test") for k in ("alignment", "domain")}
    n, g = len(cfg.sources), ctx.base.groups.n
    ties = [p for p in grid if p["merge"] == "ties"]
    on_test = []
    for point in ties:
        w, dens = (float(x.split("=")[1]) for x in point["setting"].split(", "))
        model = ctx.merger.apply(Candidate(weight=np.full((n, g), w), density=np.full((n, g), dens)))
        s, t = losses(model, tok, search), losses(model, tok, test)
        objective = s["alignment"] + 0.3 * s["domain"] + s["helpfulness"]  # beta 1
        assert float(point["objective_search"]) == pytest.approx(objective, rel=1e-4)
        on_test.append(t["alignment"] + 0.3 * t["domain"])
        if point["chosen"] == "True":
            row = next(r for r in read_csv(ablation["out"] / "ablation.csv") if r["row"] == "TIES, grid")
            assert row["setting"] == point["setting"]
            assert float(row["domain_loss_test"]) == pytest.approx(t["domain"], rel=1e-4)
            assert float(row["objective_search"]) == pytest.approx(float(point["objective_search"]))
    # the test splits would have given other numbers (so the test could tell them apart)
    assert all(abs(a - float(p["objective_search"])) > 1e-3 for a, p in zip(on_test, ties))


def test_lm_cocktail_weights_are_softmax_of_minus_ce_over_t(world, ablation):
    tok = AutoTokenizer.from_pretrained(world["base"])
    d = ablation["data"]
    domain, safety = load_pairs(d, "domain_search"), load_pairs(d, "alignment_search")
    ce = {}
    for name in ("a", "b"):
        model = AutoModelForCausalLM.from_pretrained(world[name], dtype=torch.float32).eval()
        per = Scorer(tok, {"domain": domain, "alignment": safety}, batch_tokens=256).example_losses(model)
        ce[name] = {
            "D_domain": sum(per["domain"]) / len(per["domain"]),
            "D_domain ∪ D_safety": sum(per["domain"] + per["alignment"]) / (len(domain) + len(safety)),
        }
    rows = {r["row"]: r for r in json.loads((ablation["out"] / "ablation.json").read_text())["rows"]}
    expect = {}
    for data in ("D_domain", "D_domain ∪ D_safety"):
        z = {n: math.exp(-ce[n][data] / T) for n in ce}
        expect[data] = {n: v / sum(z.values()) for n, v in z.items()}
    assert abs(expect["D_domain"]["a"] - expect["D_domain ∪ D_safety"]["a"]) > 0.01  # tells them apart
    for data in expect:
        row = rows[f"LM-Cocktail, {data}"]
        assert row["details"]["weights"] == pytest.approx(expect[data], rel=1e-3), data
        assert (
            row["merge"] == "linear"
            and row["setting"] == f"a {expect[data]['a']:.3f}, b {expect[data]['b']:.3f}"
        )


def test_sampler_table_matches_the_studies_and_a_rerun_resumes(ablation):
    out = ablation["out"]
    storage = f"sqlite:///{out / 'study.db'}"
    doc = json.loads((out / "ablation.json").read_text())
    summary = {r["sampler"]: r for r in doc["samplers"]["summary"]}
    assert set(summary) == set(SAMPLERS)
    counts = {}
    for s in SAMPLERS:
        finals = []
        for seed in (0,) if s == "gradient" else (0, 1, 2):  # the descent does not depend on the seed
            study = optuna.load_study(study_name=f"abl-samplers/{s}_seed{seed}", storage=storage)
            assert len(study.trials) == 3
            counts[study.study_name] = len(study.trials)
            finals.append(min(t.value for t in study.trials if t.value is not None))
        assert summary[s]["mean"] == pytest.approx(sum(finals) / len(finals))
        assert summary[s]["min"] == pytest.approx(min(finals))
    assert summary["gradient"]["std"] is None and summary["gradient"]["seeds"] == 1
    for s in SAMPLERS:  # the picks' objective on the test splits, beside the search split's
        assert np.isfinite(summary[s]["test_mean"]) and summary[s]["test_mean"] != summary[s]["mean"]
    assert "test objective of the pick (mean)" in (out / "ablation.md").read_text()
    curves = read_csv(out / "samplers.csv")
    assert len(curves) == (4 * 3 + 1) * 3
    for s in SAMPLERS:
        run = [float(c["best_so_far"]) for c in curves if c["sampler"] == s and c["seed"] == "0"]
        assert run == sorted(run, reverse=True)  # best so far never gets worse
    before = (out / "ablation.csv").read_text()
    assert main(["--config", str(ablation["path"]), "--out", str(out)]) == 0
    for name, n in counts.items():
        assert len(optuna.load_study(study_name=name, storage=storage).trials) == n  # not redone
    assert (out / "ablation.csv").read_text() == before


def test_config_errors_name_the_key_and_the_allowed_keys(world, tmp_path, capsys):
    path, _ = write_configs(world, tmp_path, sampler="tpe")
    with pytest.raises(ConfigError, match="sampler: unknown key") as err:
        load_ablation(path)
    assert "allowed keys here: name, out, search_config, rows" in str(err.value)

    path, _ = write_configs(world, tmp_path, samplers={"trials": 3})
    with pytest.raises(ConfigError, match="samplers.trials: unknown key") as err:
        load_ablation(path)
    assert "allowed keys here: names, seeds, n_trials" in str(err.value)

    path, _ = write_configs(world, tmp_path, quick={"grids": {"weight": [1]}})
    with pytest.raises(ConfigError, match="quick section") as err:
        load_ablation(path)
    assert "grids.weight" in str(err.value) and "allowed keys here: weights, densities" in str(err.value)

    for bad, where in [
        ({"samplers": {"seeds": [0, 1]}}, "samplers.seeds"),
        ({"samplers": {"names": ["grid"]}}, "samplers.names.0"),
        ({"grids": {"densities": [0]}}, "grids.densities.0"),
        ({"search_config": "missing.yaml"}, "config file not found"),
    ]:
        path, _ = write_configs(world, tmp_path, **bad)
        with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
            load_ablation(path)

    # the CLI fails with the key before loading any model (the base here does not exist)
    path, search = write_configs(world, tmp_path, bogus=1)
    search["base"] = str(tmp_path / "no-such-model")
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(search))
    assert main(["--config", str(path)]) == 2
    assert "bogus: unknown key" in capsys.readouterr().err


def test_quick_budget_and_rows_that_need_two_sources(world, tmp_path):
    path, search = write_configs(world, tmp_path)
    abl, cfg = load_ablation(path, quick=True, out=str(tmp_path / "q"))
    assert (abl.samplers.n_trials, abl.searches.n_trials, abl.samplers.seeds) == (2, 1, [0, 1, 2])
    assert cfg.run_dir == tmp_path / "q" and cfg.search.objective == "weighted"
    assert load_ablation(path)[0].samplers.n_trials == 3
    assert cfg.search.verify.n_prompts == 256  # no data caps: the search config's judged prompts
    capped = write_configs(world, tmp_path, quick={"data": {"n_alignment": 2}})[0]
    cfg = load_ablation(capped, quick=True, out=str(tmp_path / "q"))[1]
    assert cfg.data.n_alignment == 2 and cfg.search.verify.n_prompts is None  # the scored rows alone
    search["sources"].append({"name": "lora", "path": str(world["lora"])})
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(search))
    with pytest.raises(ConfigError, match="slerp needs exactly 2 sources"):
        load_ablation(path)


def test_ctrl_c_during_a_study_exits_130(world, tmp_path):
    """It used to end in `stopped: ...` and exit code 1, so `ablate && ...` could not tell a user's
    Ctrl-C from failing trials."""
    import os
    import signal
    import sqlite3
    import subprocess
    import sys
    import time
    from pathlib import Path

    path, _ = write_configs(world, tmp_path, rows=["searches"], searches={"n_trials": 200})
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "optimize.ablate", "--config", str(path), "--out", str(tmp_path / "run")]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    db, done = tmp_path / "run" / "study.db", 0
    while proc.poll() is None and not done:
        time.sleep(0.5)
        if db.is_file():
            with sqlite3.connect(db) as con:
                try:
                    done = con.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0]
                except sqlite3.OperationalError:  # the tables are not made yet
                    pass
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted: run the same command again" in err and "Traceback" not in err, err[-3000:]
