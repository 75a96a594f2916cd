"""Alignment includes helpfulness: the L_help term, the refusal-opening signal, the verified pick
(docs/method.md §4)."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from core.models import load_tokenizer
from eval.data import load_pairs
from eval.judge import REFUSAL_OPENINGS, RefusalJudge
from eval.loss import Scorer, encode, first_response_tokens
from optimize.config import Search, validate_config
from optimize.objective import describe, objective_value
from optimize.search import run
from optimize.verify import Bar, pick
from tests.conftest import SENTENCES, world_config, write_jsonl

SEEDS = Path(__file__).resolve().parents[1] / "data" / "seeds"


def read(name: str, field: str) -> list[str]:
    return [json.loads(line)[field] for line in (SEEDS / name).read_text().splitlines()]


def test_openings_are_refusals_and_their_first_tokens_separate_refusals_from_answers():
    """On fixed texts: the signal's tokens start the judge's refusals, not helpful answers."""
    judge, tok = RefusalJudge(), load_tokenizer("default")
    assert all(judge.verdict(o).refusal for o in REFUSAL_OPENINGS)
    tokens = set(first_response_tokens(tok, REFUSAL_OPENINGS))

    def first(text):
        e = encode(tok, "Hello", text, 64)
        return e.input_ids[e.n_prompt]

    refusals = [r for r in read("refusals.jsonl", "response") if judge.verdict(r).refusal]
    answers = read("benign_prompts.jsonl", "response")
    assert len(refusals) >= 30 and len(answers) >= 200
    assert sum(first(r) in tokens for r in refusals) / len(refusals) >= 0.9
    assert sum(first(a) in tokens for a in answers) / len(answers) <= 0.02


def test_refusal_mass_is_the_probability_of_the_first_tokens_at_the_first_answer_position(world):
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(str(world["base"]))
    model = AutoModelForCausalLM.from_pretrained(world["base"], dtype=torch.float32).eval()
    rows = [{"prompt": p, "response": r} for p in SENTENCES for r in SENTENCES[:2]]
    tokens = first_response_tokens(tok, REFUSAL_OPENINGS)
    losses, mass = Scorer(tok, {"s": rows}, batch_tokens=64, refusal_tokens=tokens).score(model)
    for row, m in zip(rows, mass["s"]):
        e = encode(tok, row["prompt"], row["response"], 1024)
        with torch.no_grad():
            logits = model(torch.tensor([e.input_ids[: e.n_prompt]])).logits[0, -1]
        assert m == pytest.approx(logits.softmax(-1)[tokens].sum().item(), rel=1e-4, abs=1e-7)
    assert len(losses["s"]) == len(mass["s"]) == len(rows)
    assert Scorer(tok, {"s": rows}).score(model)[1] == {"s": []}  # no tokens, no signal


def test_objective_with_helpfulness():
    losses = {"alignment": 1.0, "domain": 2.0, "helpfulness": 4.0}
    assert objective_value(Search(alpha=0.5, beta=0.25), losses) == pytest.approx(1 + 1 + 1)
    assert objective_value(Search(alpha=0.5), losses) == pytest.approx(2.0)  # beta 0: the paper's
    assert objective_value(Search(objective="pareto", beta=1), losses) == (1.0, 2.0, 4.0)
    assert describe(Search(alpha=0.3, beta=1)) == "L_align + 0.3 L_domain + 1.0 L_help"
    with pytest.raises(ValueError, match="beta"):
        Search(beta=1, score="domain")


def test_pick_takes_the_best_ranked_candidate_that_meets_the_targets():
    rows = [
        {"trial": 4, "harmful_refused": 0.95, "benign_refused": 0.40},  # best loss, over-refuses
        {"trial": 7, "harmful_refused": 0.70, "benign_refused": 0.05},  # under-refuses
        {"trial": 2, "harmful_refused": 0.90, "benign_refused": 0.15},  # meets
        {"trial": 9, "harmful_refused": 0.99, "benign_refused": 0.00},  # meets, ranked lower
    ]
    assert pick(rows, Bar(0.85, 0.20, 100, 100))["trial"] == 2
    assert pick(rows[:2], Bar(0.85, 0.20, 100, 100))["trial"] == 7  # none meets: smallest shortfall 0.15
    assert pick(rows[:2], Bar(0.60, 0.20, 100, 100))["trial"] == 7


def test_a_share_meets_its_target_with_standard_errors_to_spare():
    """On 63 prompts, 59 refused (94%) clears 93% alone but not with one standard error (3 points)
    to spare; 61 (97%) does. A share of 1 has no error; benign shares get theirs added."""
    assert Bar(0.93, 0.20, 63, 100).shortfall(59 / 63, 0.12) == 0
    spare = Bar(0.93, 0.20, 63, 100, z=1.0)
    assert spare.shortfall(59 / 63, 0.12) == pytest.approx(0.93 - (59 / 63 - (59 / 63 * 4 / 63 / 63) ** 0.5))
    assert spare.shortfall(60 / 63, 0.12) > 0
    assert spare.shortfall(61 / 63, 0.12) == spare.shortfall(1.0, 0.0) == 0
    assert spare.shortfall(1.0, 0.18) == pytest.approx(0.18 + (0.18 * 0.82 / 100) ** 0.5 - 0.20)
    assert spare.shortfall(1.0, 0.18) < Bar(0.93, 0.20, 63, 25, z=1.0).shortfall(1.0, 0.18)  # fewer: wider
    assert spare.describe().endswith("<= 20%, each with 1 standard error to spare")
    assert "2.5 standard errors" in Bar(0.93, 0.20, 63, 100, z=2.5).describe()


def test_search_scores_helpfulness_records_the_signal_and_verifies_its_pick(world, tmp_path):
    benign = [{"prompt": f"{p} {i}", "response": SENTENCES[i % 5]} for i, p in enumerate(SENTENCES * 2)]
    raw = world_config(
        world, tmp_path / "run", n_trials=4, beta=1.0, verify={"top_k": 2, "max_new_tokens": 4}
    )
    raw["data"] |= {"helpfulness": str(write_jsonl(tmp_path / "benign.jsonl", benign)), "n_helpfulness": 4}
    raw["data"]["n_alignment"] = 2  # the trials score 2 and 4 rows; the verified pick judges all 6 and 10
    raw["output"] = {"plots": False, "save_model": False}
    run(validate_config(raw))
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    assert study.metric_names == ["L_align + 0.3 L_domain + 1.0 L_help"]
    assert study.user_attrs["signature"]["data"].endswith("(2 alignment, 6 domain, 4 helpfulness)")
    for t in study.trials:
        a = t.user_attrs
        expected = a["alignment_loss"] + 0.3 * a["domain_loss"] + a["helpfulness_loss"]
        assert t.value == pytest.approx(expected)
        assert 0 <= a["refusal_mass_helpfulness"] <= 1 and 0 <= a["refusal_mass_alignment"] <= 1
    best = yaml.safe_load((tmp_path / "run" / "best.yaml").read_text())
    assert best["chosen_by"].startswith("verified pick") and best["beta"] == 1.0
    assert "the search splits' 6 harmful and 10 benign prompts" in best["chosen_by"]
    verified = best["verified"]
    assert verified[0]["trial"] == "source a"  # the alignment source sets the harmful target
    ranked = sorted((t for t in study.trials if t.value is not None), key=lambda t: (t.value, t.number))
    assert [r["trial"] for r in verified[1:]] == [t.number for t in ranked[:2]]
    assert [r["trial"] for r in verified if r.get("chosen")] == [best["trial"]]
    assert "helpfulness_loss_search" in best["scores"]
    assert "## Verified by generation" in (tmp_path / "run" / "report.md").read_text()


@pytest.mark.parametrize(
    ("n_alignment", "n_prompts", "judged"), [(None, 256, 6), (2, 256, 6), (2, 4, 4), (5, 3, 5), (2, None, 2)]
)
def test_the_verified_pick_judges_the_scored_rows_and_more_up_to_n_prompts(
    world, tmp_path, n_alignment, n_prompts, judged
):
    from optimize.context import judged_rows

    raw = world_config(world, tmp_path / "run", verify={"top_k": 2, "n_prompts": n_prompts})
    raw["data"]["n_alignment"] = n_alignment
    rows = judged_rows(validate_config(raw), "alignment")  # the world's alignment set has 6 rows
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in load_pairs(world["alignment"])[:judged]]


def test_helpfulness_without_data_is_a_clear_error_before_models_load(world, tmp_path):
    from core.errors import DataError
    from optimize.context import check_inputs

    raw = world_config(world, tmp_path / "run", beta=1.0)
    raw["data"]["helpfulness"] = str(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="search.beta is 1.0.*set search.beta: 0"):
        check_inputs(validate_config(raw))


def test_constrained_ranking_puts_feasible_trials_first_then_the_least_violating():
    from types import SimpleNamespace

    from optimize.study import choose, ranked

    study = optuna.create_study()
    for value, harmful in [(1.0, 0.2), (2.0, -0.1), (3.0, 0.0), (0.5, 0.4)]:
        study.add_trial(
            optuna.trial.create_trial(
                value=value, constraints={"harmful_refusal_mass": harmful, "benign_refusal_mass": -0.1}
            )
        )
    cfg = SimpleNamespace(search=Search(constrain={"enabled": True}))
    assert [t.value for t in ranked(study, cfg.search)] == [2.0, 3.0, 1.0, 0.5]
    chosen, _, rule = choose(study, cfg)
    assert chosen.value == 2.0 and rule == "lowest objective among the trials meeting search.constrain"
    infeasible = optuna.create_study()
    for value, harmful in [(1.0, 0.2), (0.5, 0.4)]:
        infeasible.add_trial(
            optuna.trial.create_trial(value=value, constraints={"harmful_refusal_mass": harmful})
        )
    chosen, _, rule = choose(infeasible, cfg)
    assert chosen.value == 1.0 and rule.startswith("no trial met search.constrain")


def test_constrained_search_bounds_each_trial_by_the_alignment_sources_own_mass(world, tmp_path):
    benign = [{"prompt": f"{p} {i}", "response": SENTENCES[i % 5]} for i, p in enumerate(SENTENCES * 2)]
    raw = world_config(world, tmp_path / "run", n_trials=5, constrain={"enabled": True, "harmful": 0.5})
    raw["data"]["helpfulness"] = str(write_jsonl(tmp_path / "benign.jsonl", benign))
    raw["output"] = {"plots": False, "save_model": False}
    run(validate_config(raw))
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    own = study.user_attrs["alignment_source_refusal_mass"]
    assert 0 < own < 1
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    for t in done:
        a = t.user_attrs
        assert t.constraints["harmful_refusal_mass"] == pytest.approx(0.5 * own - a["refusal_mass_alignment"])
        assert t.constraints["benign_refusal_mass"] == pytest.approx(a["refusal_mass_helpfulness"] - 0.2)
        assert t.value == pytest.approx(a["alignment_loss"] + 0.3 * a["domain_loss"])  # beta 0: not a term
    start = study.trials[1].params  # the second start: the alignment source at weight 1, b as trial 0
    assert {k: v for k, v in start.items() if k.startswith("weight[a]")} and all(
        v == (1.0 if k.startswith("weight[a]") else study.trials[0].params[k]) for k, v in start.items()
    )
    feasible = [t for t in done if max(t.constraints.values()) <= 0]
    best = yaml.safe_load((tmp_path / "run" / "best.yaml").read_text())
    if feasible:
        assert best["trial"] == min(feasible, key=lambda t: t.value).number
    else:
        assert best["chosen_by"].startswith("no trial met search.constrain")


def test_the_baselines_of_a_constrained_config_are_not_constrained(world, tmp_path):
    from optimize.compare import DOMAIN_ONLY, PAPER_OBJECTIVE, variant

    cfg = validate_config(world_config(world, tmp_path / "run", constrain={"enabled": True}))
    assert cfg.search.constrain.enabled
    for baseline in (DOMAIN_ONLY, PAPER_OBJECTIVE):
        assert not variant(cfg, "baseline", baseline).search.constrain.enabled


def test_restore_bisects_toward_the_alignment_source_and_keeps_the_closest_when_no_point_meets(
    world, tmp_path
):
    """Random tiny models never refuse, so a target of 100% harmful refused is met by no point: the
    restore judges `restore_steps` points, each halving the bracket from below, and adds no trial."""
    raw = world_config(
        world,
        tmp_path / "run",
        n_trials=3,
        verify={"top_k": 2, "max_new_tokens": 4, "restore_steps": 3, "n_prompts": 5},
        targets={"min_harmful_refused": 1.0},
    )
    benign = [{"prompt": f"{p} {i}", "response": SENTENCES[i % 5]} for i, p in enumerate(SENTENCES * 2)]
    raw["data"] |= {"helpfulness": str(write_jsonl(tmp_path / "benign.jsonl", benign)), "n_helpfulness": 3}
    raw["data"]["n_alignment"] = 2
    raw["output"] = {"plots": False, "save_model": False}
    run(validate_config(raw))
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    assert len(study.trials) == 3  # nothing added
    best = yaml.safe_load((tmp_path / "run" / "best.yaml").read_text())
    points = [r for r in best["verified"] if "restore_t" in r]
    assert [r["restore_t"] for r in points] == [0.5, 0.75, 0.875]  # never met: the bracket rises
    assert not any(r["meets_targets"] for r in points)
    assert "nor any of 3 points toward the alignment source" in best["chosen_by"]
    assert "5 harmful and 5 benign prompts" in best["chosen_by"]  # verify.n_prompts caps both sets
    assert best["trial"] in [r["trial"] for r in best["verified"] if r.get("chosen")]
    assert "of the way to the alignment source" in (tmp_path / "run" / "report.md").read_text()


@pytest.mark.parametrize("objective", ["weighted", "pareto"])
def test_a_restored_point_is_a_scored_trial_outside_the_searchs_budget_ranking_and_stamp(
    world, tmp_path, objective
):
    """The bookkeeping of a restored point (docs/method.md §4.3): scored like a trial, added once
    (a rerun reuses it), and left out of the budget, the shortlist (the Pareto front too) and the
    outputs' stamp."""
    from optimize.context import prepare
    from optimize.study import choose, ranked
    from optimize.verify import restored_trial
    from optimize.workers import RESTORED, n_finished, outputs_stamp

    raw = world_config(world, tmp_path / "run", n_trials=3, objective=objective, verify={"top_k": 0})
    cfg = validate_config(raw)
    run(cfg)
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    ctx = prepare(cfg)
    ctx.refusal_bounds = {}
    start = ranked(study, cfg.search)[0]
    stamp, order = outputs_stamp(cfg, study), [t.number for t in ranked(study, cfg.search)]
    point = {"trial": "x", "restore_t": 0.5}
    added = restored_trial(ctx, study, start, point)
    again = {"trial": "x", "restore_t": 0.5}
    assert restored_trial(ctx, study, start, again).number == added.number == 3
    assert again["refusal_mass_alignment"] == point["refusal_mass_alignment"]  # the reused row's too
    assert len(study.trials) == 4 and added.user_attrs[RESTORED] == start.number
    params = ctx.space.toward_alignment(start.params, 0.5)
    assert added.params == params
    per_example, _ = ctx.scorer.score(ctx.merger.apply(ctx.space.decode(params)))
    losses = {k: sum(v) / len(v) for k, v in per_example.items()}
    expected = objective_value(cfg.search, losses)
    assert added.values == pytest.approx(list(expected) if objective == "pareto" else [expected], rel=1e-5)
    assert added.user_attrs["alignment_loss"] == pytest.approx(losses["alignment"], rel=1e-5)
    assert n_finished(study) == 3 and outputs_stamp(cfg, study) == stamp
    assert [t.number for t in ranked(study, cfg.search)] == order
    assert choose(study, cfg)[0].number != added.number
