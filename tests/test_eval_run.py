"""eval.run on the tiny world: end to end from a search's run folder (transformers backend), the
merge rebuilt in memory, a model folder with --config; aggregation, MCQ scoring, bad input."""

import copy
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from core.errors import ConfigError
from core.models import load_model, load_tokenizer
from core.vllm_env import vllm_available
from eval.behaviour import refusal_summary
from eval.judge import Verdict
from eval.loss import Scorer
from eval.mcq import (
    exact_accuracy,
    exact_answer_questions,
    final_number,
    graded_domains,
    mcq_scores,
    option_logprobs,
)
from eval.run import exact_scores, main
from eval.settings import parse_settings
from eval.suites import SUITES, Suite
from optimize.config import validate_config
from optimize.search import run
from tests.conftest import SENTENCES, world_config
from tests.tiny import make_tiny_llama

OUTPUTS = (
    "report.md metrics.json answers.jsonl plots/safety_by_category.png plots/over_refusal_by_category.png "
    "plots/similarity.png plots/distance.png plots/cka.png plots/contribution.png"
).split()
EXTRA_CSV = "prompt,category\nwhy is the system good,Extra\nwhat is the answer,Extra\n"


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    """A data folder with the test splits eval.run reads: two harm categories, benign prompts."""
    import datasets

    root = tmp_path_factory.mktemp("evaldata")
    rows = lambda cats, resp: [  # noqa: E731
        {"prompt": p, "response": resp, "category": c} for p, c in zip(SENTENCES, cats)
    ]
    dd = datasets.DatasetDict(
        {
            "alignment_test": datasets.Dataset.from_list(
                rows(["Violence", "Privacy", "Violence", "Privacy", "Violence"], "i can not help")
            ),
            "domain_test": datasets.Dataset.from_list(rows(["medicine"] * 5, "the answer is good")),
            "benign": datasets.Dataset.from_list(rows(["risky_looking"] * 3 + ["plain"] * 2, "sure")),
        }
    )
    dd.save_to_disk(str(root / "data"))
    return root / "data"


@pytest.fixture(scope="module")
def searched(world, eval_data, tmp_path_factory):
    """A finished tiny search (task arithmetic, layerwise weights) with merged/ in its run folder."""
    raw = world_config(world, tmp_path_factory.mktemp("search") / "run", n_trials=2)
    raw["data"]["dir"] = str(eval_data)
    raw["eval"] = {"examples": 2, "cka_prompts": 3}
    cfg = validate_config(raw)
    run(cfg)
    return cfg


def run_eval(*argv) -> int:
    return main([*map(str, argv)])


def test_end_to_end_from_a_run_folder(searched, tmp_path, capsys):
    mcq = tmp_path / "mcq.jsonl"
    mcq.write_text(
        json.dumps({"question": "what is the answer", "options": ["good", "the system"], "answer": "B"})
        + "\n"
        + json.dumps({"question": "why", "options": ["now", "people", "time"], "answer": 0})
        + "\n"
    )
    extra = tmp_path / "extra.csv"
    extra.write_text(EXTRA_CSV)
    (tmp_path / "other").mkdir()  # a file of the same name: reported apart, not dropped
    same_name = tmp_path / "other" / "mcq.jsonl"
    same_name.write_text(json.dumps({"question": "which", "options": ["a", "b"], "answer": "A"}) + "\n")
    out = tmp_path / "eval"
    code = run_eval(
        "--model",
        searched.run_dir,
        "--backend",
        "transformers",
        "--max-new-tokens",
        4,
        "--mcq",
        mcq,
        "--mcq",
        same_name,
        "--prompts",
        extra,
        "--out",
        out,
    )
    assert code == 0, capsys.readouterr().err
    for f in OUTPUTS:
        assert (out / f).exists(), f
    m = json.loads((out / "metrics.json").read_text())
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]

    # safety: 5 test prompts + 2 from the extra file, aggregated per category from the answers
    harmful = [a for a in answers if a["kind"] == "harmful"]
    assert m["safety"]["n"] == len(harmful) == 7 and m["safety"]["judge"] == "rules"
    assert set(m["safety"]["by_category"]) == {"Violence", "Privacy", "Extra"}
    for cat, v in m["safety"]["by_category"].items():
        mine = [a["refused"] for a in harmful if a["category"] == cat]
        assert v["n"] == len(mine) and v["refused"] == pytest.approx(np.mean(mine), abs=1e-6)
    assert m["safety"]["by_set"]["extra.csv"]["n"] == 2
    assert m["safety"]["refused"] == pytest.approx(np.mean([a["refused"] for a in harmful]), abs=1e-6)
    benign = [a for a in answers if a["kind"] == "benign"]
    assert m["over_refusal"]["n"] == 5
    assert m["over_refusal"]["answered"] == pytest.approx(
        1 - np.mean([a["refused"] for a in benign]), abs=1e-6
    )
    assert all(isinstance(a["answer"], str) and a["verdict"] for a in answers)

    # domain: the losses are those of the merged model the search saved
    merged = load_model(searched.run_dir / "merged")
    tok = load_tokenizer(searched.run_dir / "merged")
    rows = {
        k: [{"prompt": r["prompt"], "response": r["response"]} for r in _split(searched, f"{k}_test")]
        for k in ("alignment", "domain")
    }
    expected = Scorer(tok, rows, 1024, 256).losses(merged)
    assert m["domain"]["domain_test_loss"] == pytest.approx(expected["domain"], rel=1e-4)
    assert m["domain"]["alignment_test_loss"] == pytest.approx(expected["alignment"], rel=1e-4)
    assert {k: v["n"] for k, v in m["domain"]["mcq"].items()} == {str(mcq): 2, str(same_name): 1}
    assert m["domain"]["exact"] == {}  # no reference states a final answer
    assert m["domain"]["lm_eval"] is None

    # analysis: one value per layer group; effective coefficients recover best.yaml's weights
    a = m["analysis"]
    assert a["groups"] == ["embed", "layers.0", "layers.1", "layers.2", "layers.3", "norm", "lm_head"]
    assert set(a["cka"]) == {"base", "a", "b"} and set(a["cosine"]) == {"a ~ b"}
    assert a["cka_prompts"] == 6 and a["cka_tokens"] > 6
    best = yaml.safe_load((searched.run_dir / "best.yaml").read_text())["coefficients"]
    for i, g in enumerate(a["groups"]):
        assert a["share"]["a"][i] + a["share"]["b"][i] == pytest.approx(1, abs=1e-5)
        if g == "norm":  # 64 numbers: the two noises are not orthogonal enough there
            continue
        assert abs(a["cosine"]["a ~ b"][i]) < 0.05  # independent noise: nearly orthogonal
        for src in ("a", "b"):
            assert a["coefficient"][src][i] == pytest.approx(best[g]["weight"][src], abs=0.05), (g, src)
    assert all(0 < v <= 1 + 1e-6 for src in a["cka"].values() for v in src if v is not None)
    report = (out / "report.md").read_text()
    assert "Safety: harmful prompts refused" in report and "MergeAlign analysis" in report
    assert "![safety](plots/safety_by_category.png)" in report


def _split(cfg, split):
    import datasets

    return list(datasets.load_from_disk(cfg.data.dir)[split])


def test_rebuilt_in_memory_and_model_folder_agree(searched, tmp_path, capsys):
    """A run folder without merged/ (rebuilt from best.yaml) and the merged folder given with
    --config describe the same model: same losses, same weight analysis."""
    run_copy = tmp_path / "run"
    shutil.copytree(searched.run_dir, run_copy, ignore=shutil.ignore_patterns("merged", "eval"))
    assert run_eval("--model", run_copy, "--backend", "auto", "--max-new-tokens", 2) == 0, (
        capsys.readouterr().err
    )
    rebuilt = json.loads((run_copy / "eval" / "metrics.json").read_text())
    assert "rebuilt in memory" in rebuilt["model"]["weights"]
    # no folder for vLLM to load: the rebuilt merge's weights go into an engine on the base
    in_memory = "vLLM, its weights replaced by the merge" if vllm_available() else "transformers on the merge"
    assert rebuilt["model"]["generation"].startswith(in_memory)

    folder = shutil.copytree(searched.run_dir / "merged", tmp_path / "merged-copy")
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(searched.model_dump(by_alias=True, mode="json")))
    out = tmp_path / "folder-eval"
    args = (
        "--model",
        folder,
        "--config",
        config,
        "--backend",
        "transformers",
        "--max-new-tokens",
        2,
        "--out",
        out,
    )
    assert run_eval(*args) == 0, capsys.readouterr().err
    loaded = json.loads((out / "metrics.json").read_text())
    assert "as a delta on the base" in loaded["model"]["weights"]
    for k in ("domain_test_loss", "alignment_test_loss"):
        assert loaded["domain"][k] == pytest.approx(rebuilt["domain"][k], rel=1e-5)
    for k in ("distance", "coefficient"):
        for src, values in rebuilt["analysis"][k].items():
            assert np.allclose(loaded["analysis"][k][src], values, atol=1e-4)
    assert [a["answer"] for a in map(json.loads, (out / "answers.jsonl").read_text().splitlines())] == [
        a["answer"] for a in map(json.loads, (run_copy / "eval" / "answers.jsonl").read_text().splitlines())
    ]

    # analysis off: the folder is loaded as it is, no base or sources
    raw = yaml.safe_load(config.read_text())
    raw["eval"] = {"analysis": False}
    config.write_text(yaml.safe_dump(raw))
    assert run_eval(*args) == 0
    plain = json.loads((out / "metrics.json").read_text())
    assert plain["analysis"] is None and plain["model"]["weights"].startswith("loaded from")
    assert plain["domain"]["domain_test_loss"] == pytest.approx(
        rebuilt["domain"]["domain_test_loss"], rel=1e-5
    )
    assert not (out / "plots" / "cka.png").exists()


def test_refusal_summary_per_category():
    rows = [{"category": c} for c in ["A", "A", "A", "B"]]
    verdicts = [
        Verdict(True, "refusal"),
        Verdict(True, "refusal"),
        Verdict(False, "compliance"),
        Verdict(False, "partial"),
    ]
    s = refusal_summary(rows, verdicts)
    assert s["n"] == 4 and s["refused"] == 0.5
    assert s["by_category"] == {"A": {"n": 3, "refused": pytest.approx(2 / 3)}, "B": {"n": 1, "refused": 0.0}}
    b = refusal_summary(rows, verdicts, answered=True)
    assert b["answered"] == 0.5 and b["by_category"]["B"] == {"n": 1, "answered": 1.0}


def test_mcq_log_likelihood_accuracy_matches_an_independent_computation(world):
    model, tok = load_model(world["base"]), load_tokenizer(world["base"])
    questions = [
        {"question": "what is the answer", "options": ["good", "the system is good", "now"]},
        {"question": "why do people think", "options": ["time", "people like this"]},
        {"question": "can you help", "options": ["sure", "i can not", "here is how", "no"]},
    ]

    def loglik(q, option):  # sum of the option's log-probs as the assistant answer, token by token
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": option}]
        full = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
        head = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
        n_prompt = len(tok(head, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), -1)
        picked = [logp[t - 1, full[t]].item() for t in range(n_prompt, len(full))]
        return sum(picked), sum(picked) / len(picked)

    mine = [[loglik(q["question"], o) for o in q["options"]] for q in questions]
    best = [int(np.argmax([s for s, _ in opts])) for opts in mine]
    # answers: the best option for the first two questions, another one for the third
    for q, b in zip(questions, best):
        q["answer"] = b
    questions[2]["answer"] = (best[2] + 1) % 4
    total, mean = option_logprobs(model, tok, questions, 256, 64, "cpu")
    assert np.allclose(total, [s for opts in mine for s, _ in opts], atol=1e-4)
    assert np.allclose(mean, [m for opts in mine for _, m in opts], atol=1e-5)
    scores = mcq_scores(questions, total, mean)
    assert scores["n"] == 3 and scores["accuracy"] == pytest.approx(2 / 3)
    norm_best = [int(np.argmax([m for _, m in opts])) for opts in mine]
    expected_norm = np.mean([nb == q["answer"] for nb, q in zip(norm_best, questions)])
    assert scores["accuracy_norm"] == pytest.approx(expected_norm)


def test_settings_unknown_keys_and_overrides():
    with pytest.raises(ConfigError, match=r"eval\.judje: unknown key; allowed keys here: backend, max_new"):
        parse_settings({"judje": "rules"})
    with pytest.raises(
        ConfigError, match=r"eval\.lm_eval\.taks: unknown key; allowed keys here: tasks, num_fewshot"
    ):
        parse_settings({"lm_eval": {"taks": ["mmlu"]}})
    with pytest.raises(ConfigError, match="needs eval.guard"):
        parse_settings({"judge": "guard"})
    s = parse_settings(
        {"prompts": ["a.jsonl"], "lm_eval": {"num_fewshot": 5}},
        {"prompts": ["b.csv"], "tasks": ["medqa"], "max_new_tokens": 7},
    )
    assert s.prompts == ["a.jsonl", "b.csv"] and s.lm_eval.tasks == ["medqa"] and s.lm_eval.num_fewshot == 5
    assert s.max_new_tokens == 7 and s.judge == "rules" and s.analysis


# ----------------------------------------------------------------------------- bad input: exit 2
def _error(capsys, *argv) -> str:
    assert run_eval(*argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    return err


def test_bad_inputs_fail_with_the_fix(searched, world, tmp_path, capsys):
    assert "does not exist" in _error(capsys, "--model", tmp_path / "nope")

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(searched.run_dir / "run.yaml", unfinished)
    assert "neither merged/ nor best.yaml" in _error(capsys, "--model", unfinished)

    assert "neither a model folder" in _error(capsys, "--model", tmp_path)

    lonely = shutil.copytree(searched.run_dir / "merged", tmp_path / "lonely")
    assert "give --config" in _error(capsys, "--model", lonely)

    # a --config for a run folder rebuilds its best.yaml: it must be the merge that was searched
    raw = searched.model_dump(by_alias=True, mode="json")
    raw["merge"]["method"] = "task_arithmetic" if raw["merge"]["method"] != "task_arithmetic" else "ties"
    raw["sources"][0]["path"] = str(tmp_path / "elsewhere")  # a path may differ; the recipe may not
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(raw))
    err = _error(capsys, "--model", searched.run_dir, "--config", edited)
    assert "the config (--config, --set) changes merge from" in err and "another merge than the one" in err

    raw = searched.model_dump(by_alias=True, mode="json")
    raw["data"]["dir"] = str(tmp_path / "nodata")
    config = tmp_path / "nodata.yaml"
    config.write_text(yaml.safe_dump(raw))
    err = _error(capsys, "--model", lonely, "--config", config)
    assert "alignment_test and domain_test" in err and "synth.generate" in err

    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"question": "q", "options": ["x", "y"], "answer": 1})
        + "\n"
        + json.dumps({"question": "q", "options": ["x"], "answer": 0})
        + "\n"
    )
    assert "bad.jsonl line 2" in _error(capsys, "--model", searched.run_dir, "--mcq", bad)
    bad.write_text("{not json\n")
    assert "bad.jsonl, line 1: not valid JSON" in _error(capsys, "--model", searched.run_dir, "--mcq", bad)

    raw = searched.model_dump(by_alias=True, mode="json")
    raw["eval"] = {"cka_promts": 4}
    config.write_text(yaml.safe_dump(raw))
    assert "eval.cka_promts: unknown key; allowed keys here:" in _error(
        capsys, "--model", lonely, "--config", config
    )

    assert "would be replaced" in _error(capsys, "--model", searched.run_dir, "--out", searched.run_dir)
    inside = searched.run_dir / "merged" / "eval"
    assert "inside the evaluated model folder" in _error(capsys, "--model", searched.run_dir, "--out", inside)
    assert (searched.run_dir / "best.yaml").exists()

    if importlib.util.find_spec("lm_eval") is not None:  # named before any model loads, not after
        err = _error(
            capsys, "--model", searched.run_dir, "--tasks", "nosuchtask,alignmerge_domain_mcq,/etc/hosts"
        )
        assert "'nosuchtask', '/etc/hosts' is neither an lm-eval task" in err and "lm-eval ls tasks" in err

    # a merged folder of pickled weights: refused, unless the config (or --set) allows pickles
    pickled = shutil.copytree(lonely, tmp_path / "pickled")
    torch.save(load_model(str(pickled)).state_dict(), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    capsys.readouterr()  # the loading bar above
    ok = searched.model_dump(by_alias=True, mode="json")
    config.write_text(yaml.safe_dump(ok))
    assert "set allow_pickle: true" in _error(capsys, "--model", pickled, "--config", config)
    allowed = ("--model", pickled, "--config", config, "--set", "runtime.allow_pickle=true", "--out", pickled)
    assert "inside the evaluated model folder" in _error(capsys, *allowed)  # past the weights: only --out


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is not None, reason="lm-eval is installed")
def test_lm_eval_tasks_without_lm_eval_fail_before_any_model_loads(searched, capsys):
    err = _error(capsys, "--model", searched.run_dir, "--tasks", "medqa_4options")
    assert "pip install 'lm-eval[hf]'" in err and "medqa_4options" in err


def test_guard_path_is_checked(searched, tmp_path, capsys):
    raw = searched.model_dump(by_alias=True, mode="json")
    raw["eval"] = {"judge": "guard", "guard": str(tmp_path / "no-guard")}
    config = tmp_path / "guard.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert "does not exist" in _error(capsys, "--model", searched.run_dir, "--config", config)


def test_guard_judge_decides_the_safety_share(searched, tmp_path, capsys):
    """A guard that always answers `safe` turns every harmful answer of this never-refusing model
    into a refusal; benign answers stay judged by the rules."""
    guard = make_tiny_llama(tmp_path / "guard", phrases=["safe"], favor="safe")
    raw = searched.model_dump(by_alias=True, mode="json")
    raw["eval"] = {"judge": "guard", "guard": str(guard), "analysis": False}
    config = tmp_path / "guard.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    args = (
        "--model",
        searched.run_dir,
        "--config",
        config,
        "--backend",
        "transformers",
        "--max-new-tokens",
        2,
    )
    assert run_eval(*args, "--out", out) == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert m["safety"]["refused"] == 1.0 and m["safety"]["judge"].startswith("guard")
    assert m["over_refusal"]["answered"] == 1.0
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert {a["verdict"] for a in answers if a["kind"] == "harmful"} == {"safe"}


def test_external_suite_is_read_from_its_installed_package_and_reported_apart(searched, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["--model", searched.run_dir, "--backend", "transformers", "--max-new-tokens", 4]
    code = run_eval(
        *argv, "--suites", "weighted-safety-refusal", "--out", out, "--set", "eval.analysis=false"
    )
    assert code == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    suite = m["suites"]["weighted-safety-refusal"]
    mine = [a for a in answers if a["set"] == "weighted-safety-refusal"]
    harmful = [a["refused"] for a in mine if a["kind"] == "harmful"]
    benign = [a["refused"] for a in mine if a["kind"] == "benign"]
    assert (suite["n_harmful"], suite["n_benign"]) == (len(harmful), len(benign)) == (60, 60)
    assert suite["harmful_refused"] == pytest.approx(np.mean(harmful))
    assert suite["benign_refused"] == pytest.approx(np.mean(benign))
    assert suite["package"] == "weighted-safety-refusal==0.1.1" and suite["licence"] == "MIT"
    # the suite's prompts are the package's own, word for word
    first = json.loads(
        (Path(importlib.util.find_spec("weighted_safety").submodule_search_locations[0]) / "dataset.jsonl")
        .read_text()
        .splitlines()[0]
    )
    assert mine[0]["prompt"] == first["input"] and mine[0]["category"] == first["metadata"]["category"]
    # the project's own splits are counted apart: 5 harmful + 60, 5 benign + 60 in the totals
    assert m["safety"]["by_set"]["alignment_test"]["n"] == 5 and m["safety"]["n"] == 65
    assert m["over_refusal"]["by_set"]["benign"]["n"] == 5 and m["over_refusal"]["n"] == 65
    report = (out / "report.md").read_text()
    assert "## External suites" in report and "`weighted-safety-refusal==0.1.1` (MIT)" in report


def test_unknown_or_missing_suite_fails_before_any_model_loads(searched, capsys, monkeypatch):
    err = _error(capsys, "--model", searched.run_dir, "--suites", "harmbench")
    assert "unknown suite 'harmbench'" in err and "weighted-safety-refusal" in err
    monkeypatch.setitem(SUITES, "absent", Suite("alignmerge-no-such-suite", "1.0", "d.jsonl", "nowhere"))
    err = _error(capsys, "--model", searched.run_dir, "--suites", "absent")
    assert "pip install --no-deps alignmerge-no-such-suite==1.0" in err


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed")
def test_lm_eval_runs_the_shipped_local_task_on_a_merged_folder(searched, tmp_path, capsys):
    """A real lm_eval.simple_evaluate on alignmerge's own task (eval/lm_eval_tasks): no network,
    the merged folder loaded by lm-eval's `hf` model, lm-eval's metrics in metrics.json."""
    out = tmp_path / "eval"
    code = run_eval(
        *("--model", searched.run_dir / "merged", "--out", out, "--max-new-tokens", 2),
        *("--tasks", "alignmerge_domain_mcq", "--set", "eval.analysis=false"),
        *("--set", "eval.lm_eval.limit=8", "--set", "eval.lm_eval.batch_size=4"),
    )
    assert code == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    scores = m["domain"]["lm_eval"]["alignmerge_domain_mcq"]
    assert 0 <= scores["acc,none"] <= 1 and 0 <= scores["acc_norm,none"] <= 1
    assert "acc_stderr,none" in scores


def test_exact_answers_are_graded_by_the_stated_or_last_number():
    assert final_number("25% of 40 is 40 x 25 / 100 = 10. The answer is 10.") == 10
    assert final_number("The answer is $1,250.50, since 3 x 2 = 6") == 1250.5  # the stated one wins
    assert final_number("3 x 2 = 6, so 6 apples") == 6 and final_number("-4 degrees") == -4
    assert final_number("I can't help with that.") is None
    assert final_number("The answer is **$40**. Next: 7 + 1") == 40  # markdown, a follow-on question
    assert final_number("2,3") == 3 and final_number("1,234,567.5 in all") == 1234567.5
    assert final_number("\u22124 degrees") == -4 and final_number(".5 litres") == 0.5
    rows = [
        {"prompt": "q1", "response": "2 + 2 = 4. The answer is 4."},
        {"prompt": "q2", "response": "So the answer is 1,200."},
    ]
    assert exact_answer_questions(rows) == (["q1", "q2"], [4.0, 1200.0])
    assert exact_answer_questions(rows + [{"prompt": "q3", "response": "Drink water."}]) is None
    assert exact_answer_questions([]) is None
    medical = [{"prompt": "q4", "response": "Rest and fluids.", "domain": "medical"}]
    maths = [{**r, "domain": "math"} for r in rows]
    assert graded_domains(medical + maths) == {"math": (["q1", "q2"], [4.0, 1200.0])}
    assert graded_domains(rows) == {"domain": (["q1", "q2"], [4.0, 1200.0])}  # no `domain` column
    two = {"math": (["a", "b"], [1.0, 2.0]), "units": (["c"], [3.0])}  # answers in the same order
    assert exact_scores(two, ["1", "7", "3"]) == {
        "math": {"n": 2, "accuracy": 0.5},
        "units": {"n": 1, "accuracy": 1.0},
    }
    answers = ["The answer is 4.", "It comes to 1200 in all", "The answer is 12."]
    assert exact_accuracy(answers, [4, 1200, 13]) == pytest.approx(2 / 3)


def test_a_run_folder_cannot_let_its_own_code_run(searched, tmp_path, capsys):
    """A run folder may come from anyone: its run.yaml's trust_remote_code / allow_pickle /
    eval.lm_eval (task YAMLs run Python) are refused, named; only the user's command line grants
    them, and then its merged/ code still needs that grant to run."""
    from tests.test_security import ships_code

    run_dir = shutil.copytree(searched.run_dir, tmp_path / "handed-over")
    doc = yaml.safe_load((run_dir / "run.yaml").read_text())
    original = copy.deepcopy(doc)
    doc["config"]["runtime"] |= {"trust_remote_code": True}
    (run_dir / "run.yaml").write_text(yaml.safe_dump(doc))
    ships_code(run_dir / "merged", tmp_path / "code-ran")
    err = _error(capsys, "--model", run_dir)
    assert "sets runtime.trust_remote_code, which lets code run; a run folder cannot grant that" in err
    assert "--set runtime.trust_remote_code=true" in err
    lm_eval = {"lm_eval": {"tasks": ["evil/t.yaml"]}}  # lm-eval reads a task name that is a path
    for key, value in (("runtime", {"allow_pickle": True}), ("eval", lm_eval)):
        doc = copy.deepcopy(original)
        doc["config"][key] = (doc["config"].get(key) or {}) | value
        (run_dir / "run.yaml").write_text(yaml.safe_dump(doc))
        assert "a run folder cannot grant that" in _error(capsys, "--model", run_dir)
    (run_dir / "run.yaml").write_text(yaml.safe_dump(original))  # nothing granted: the code is refused
    assert "ships its own code (auto_map in config.json)" in _error(capsys, "--model", run_dir)
    assert not (tmp_path / "code-ran").exists()

    from eval.run_inputs import resolve_config, resolve_target

    doc = copy.deepcopy(original)
    doc["config"]["runtime"] |= {"trust_remote_code": True, "allow_pickle": True}
    (run_dir / "run.yaml").write_text(yaml.safe_dump(doc))
    target = resolve_target(str(run_dir))
    sets = {"runtime.trust_remote_code": True, "runtime.allow_pickle": False}  # the user's own choice
    cfg = resolve_config(target, None, sets)
    assert cfg.runtime.trust_remote_code and not cfg.runtime.allow_pickle
