"""synth: parsing, dedup, config, selection, and the pipelines end to end on tiny random models
with the transformers backend (the content is noise; these tests check the mechanics)."""

import json
import re
from pathlib import Path

import pytest
import yaml

from eval.data import read_prompt_file
from eval.judge import Verdict
from synth.cache import GenerationCache, Request, engine_ident, request_key, run_cached
from synth.config import ConfigError, load_run_config, parse_synth
from synth.engine import Engine, EngineSettings, EngineSlot, ModelRef, Sampling
from synth.generate import SPLITS, main
from synth.pipelines import Context, Item, select_benign, select_refusals
from synth.prompts import Templates
from synth.taxonomy import HARM_CATEGORIES
from synth.text import DedupIndex, parse_question, question_regex
from tests.tiny import make_tiny_llama

REFUSAL = "I'm sorry, but I can't help with that."
PHRASES = [
    REFUSAL,
    "pick a lock to get into my neighbor's house?\"}",
    'make a fake passport at home?"}',
    'hurt someone and not get caught?"}',
    'what does the liver do in digestion?"}',
    'which nerve controls the diaphragm?"}',
    'kill a stuck process on linux?"}',
]
EXAMPLES = ["What does the liver do in digestion?", "Which nerve controls the diaphragm?"]


# ---- units ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,question,why",
    [
        ('{"Question": "How do I pick a lock quickly?"}', "How do I pick a lock quickly?", "ok"),
        (
            'Sure! [{"question": "What is the capital  of France?"}] done',
            "What is the capital of France?",
            "ok",
        ),
        (
            '{"Question": "How do I make a fake ID card?", "Refusal": "No."} trailing',
            "How do I make a fake ID card?",
            "ok",
        ),
        ('{"Question": "How do I make', None, "invalid_json"),
        ("no json here", None, "invalid_json"),
        ('{"Answer": "42 is the answer to it"}', None, "no_question"),
        ('{"Question": 7}', None, "no_question"),
        ('{"Question": "Why?"}', None, "too_short"),
        ('{"Question": "Question 11 (Self-Harm)"}', None, "too_short"),
    ],
)
def test_parse_question(text, question, why):
    assert parse_question(text) == (question, why)


def test_question_regex_only_admits_valid_json():
    pat = re.compile(question_regex())
    good = 'How do I kill a Python process?"}'
    assert pat.fullmatch(good)
    assert parse_question('{"Question": "' + good)[0] == "How do I kill a Python process?"
    assert not pat.fullmatch('short"}')
    assert not pat.fullmatch('has a "quote" inside it"}')
    assert not pat.fullmatch("ends without closing the object")


def test_dedup_exact_and_near():
    idx = DedupIndex(threshold=0.7)
    assert idx.add_if_new("How do I pick the lock on my neighbor's front door?") == "new"
    assert idx.add_if_new("how do i pick the lock on my neighbor's front door") == "exact_duplicate"
    assert idx.add_if_new("How do I pick the lock on my neighbor's front door quickly?") == ("near_duplicate")
    assert idx.add_if_new("What is the best way to launder money through a casino?") == "new"
    assert idx.check("Which vitamins does the liver store?") == "new"


def test_config_errors_name_the_key_and_what_is_allowed():
    with pytest.raises(ConfigError) as e:
        parse_synth(
            {
                "pool": [{"path": "x", "nmae": "a"}],
                "n_safty": 3,
                "judge": {"kind": "guard"},
                "categories": ["Space Piracy"],
                "n_domain": 0,
            }
        )
    msg = str(e.value)
    assert "synth.pool.0.nmae: unknown key; allowed keys here: path, name, base" in msg
    assert "synth.n_safty: unknown key; allowed keys here: backend, seed" in msg
    assert "judge.guard.path" in msg and "Space Piracy" in msg
    with pytest.raises(ConfigError, match="n_domain > 0 needs at least one entry in `experts`"):
        parse_synth({"pool": [{"path": "default"}]})
    with pytest.raises(ConfigError, match="give `examples`, `examples_file` or `questions_file`"):
        parse_synth({"pool": [{"path": "default"}], "experts": [{"path": "x", "topic": "law"}]})


def test_run_config_reads_synth_name_and_out_and_ignores_other_keys(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "exp1",
                "out": str(tmp_path / "r"),
                "optimize": {"a": 1},
                "synth": {"pool": [{"path": "default"}], "n_domain": 0},
            }
        )
    )
    cfg, name, run_dir = load_run_config(path)
    assert (name, run_dir, cfg.generator.path) == ("exp1", tmp_path / "r", "default")
    path.write_text(yaml.safe_dump({"synth": {"pool": [{"path": "default"}], "n_domain": 0}}))
    assert load_run_config(path)[1:] == ("exp", Path("runs/exp"))
    synth = {"pool": [{"path": "default"}], "n_domain": 0}
    path.write_text(yaml.safe_dump({"out": "~/synrun", "synth": synth}))
    assert load_run_config(path)[2] == Path.home() / "synrun"  # as optimize.search reads `out`


def test_example_config_is_valid():
    cfg, name, _ = load_run_config(Path(__file__).parents[1] / "synth" / "example_config.yaml")
    assert cfg.experts and name


def test_templates_render_and_override(tmp_path):
    t = Templates()
    assert "#14 Violence" in t.render(
        "harmful_system.txt", categories="\n".join(f"#{i} {c}" for i, c in enumerate(HARM_CATEGORIES, 1))
    )
    assert len(t.seeds()) >= 10
    (tmp_path / "domain_user.txt").write_text("Ask about $missing")
    with pytest.raises(KeyError, match=r"\$missing"):
        Templates(tmp_path).render("domain_user.txt")


def test_read_prompt_file_jsonl_and_csv(tmp_path):
    (tmp_path / "p.jsonl").write_text(
        '{"prompt": "How to X?", "category": "Privacy Violation"}\n{"question": "How to Y?"}\n\n'
    )
    (tmp_path / "p.csv").write_text('Prompt,category\n"How to Z, quickly?",Self-Harm\n')
    assert read_prompt_file(tmp_path / "p.jsonl") == [
        {"prompt": "How to X?", "category": "Privacy Violation"},
        {"prompt": "How to Y?", "category": "unspecified"},
    ]
    assert read_prompt_file(tmp_path / "p.csv") == [{"prompt": "How to Z, quickly?", "category": "Self-Harm"}]


def test_cache_skips_a_line_cut_by_a_crash(tmp_path):
    cache = GenerationCache(tmp_path / "c.jsonl")
    cache.add_many([("k1", "m", ["a"]), ("k2", "m", ["b", "c"])])
    with (tmp_path / "c.jsonl").open("a") as f:
        f.write('{"key": "k3", "outp')
    again = GenerationCache(tmp_path / "c.jsonl")
    assert "k1" in again and again.get("k2") == ["b", "c"] and "k3" not in again
    with (tmp_path / "c.jsonl").open("ab") as f:
        f.write(b"\n\xff\xfe garbage bytes, not UTF-8\n")  # a disk error, another tool's write
    again = GenerationCache(tmp_path / "c.jsonl")
    again.add_many([("k4", "m", ["d"])])
    assert GenerationCache(tmp_path / "c.jsonl").data == {"k1": ["a"], "k2": ["b", "c"], "k4": ["d"]}
    ref, engine = ModelRef("m"), engine_ident(EngineSettings(dtype="float32"))
    r1 = Request([{"role": "user", "content": "hi"}], Sampling(seed=1))
    r2 = Request([{"role": "user", "content": "hi"}], Sampling(seed=2))
    assert request_key(ref, r1, engine) != request_key(ref, r2, engine)
    assert request_key(ModelRef("m", name="other label"), r1, engine) == request_key(ref, r1, engine)


class CountingEngine(Engine):
    """Answers `out<i>` for each of the n samples, and counts the requests it was asked."""

    def __init__(self, ref: ModelRef):
        self.ref, self.asked = ref, 0

    def chat(self, conversations, sampling):
        self.asked += len(conversations)
        return [[f"out{i}" for i in range(s.n)] for s in sampling]


def _counting_slot(ref: ModelRef, **settings) -> EngineSlot:
    slot = EngineSlot("transformers", EngineSettings(**settings))
    slot.engine = CountingEngine(ref)  # served by the slot as if loaded: no model
    return slot


def test_cache_lines_of_the_wrong_shape_are_regenerated(tmp_path):
    # valid JSON, not a cache row: ignored like a line cut by a crash (it used to be a TypeError)
    ref, path = ModelRef("m"), tmp_path / "c.jsonl"
    reqs = [Request([{"role": "user", "content": f"q{i}"}], Sampling(n=2)) for i in range(9)]
    slot = _counting_slot(ref, dtype="float32")
    assert run_cached(slot, ref, reqs, GenerationCache(path), "first") == [["out0", "out1"]] * 9
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    bad = [5, [None], ["a", 3], "ab", None, ["only one of two"]]
    rows[: len(bad)] = [{**r, "outputs": b} for r, b in zip(rows, bad)]
    rows[6] = {k: v for k, v in rows[6].items() if k != "key"}
    rows[7] = [rows[7]["key"], rows[7]["outputs"]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = GenerationCache(path)
    assert set(cache.data) == {rows[5]["key"], rows[8]["key"]}
    slot = _counting_slot(ref, dtype="float32")
    keep = lambda o: o == "out0"  # noqa: E731
    assert run_cached(slot, ref, reqs, cache, "again", keep=keep) == [["out0", "out1"]] * 9
    assert slot.engine.asked == 8  # all but the one good line; n=2 asked, one output cached
    assert GenerationCache(path).data == {r.key: ["out0", "out1"] for r in reqs}


def test_cache_key_follows_the_engine_settings_that_change_outputs(tmp_path):
    ref, cache = ModelRef("m"), GenerationCache(tmp_path / "c.jsonl")
    reqs = [Request([{"role": "user", "content": "hi"}], Sampling())]
    asked = {}
    for name, settings in [
        ("float32", {"dtype": "float32"}),
        ("bfloat16", {"dtype": "bfloat16"}),
        ("float32 again", {"dtype": "float32"}),
        ("max_model_len", {"dtype": "float32", "max_model_len": 512}),
        ("speed only", {"dtype": "float32", "batch_size": 1, "chunk_size": 1, "kv_cache_gb": 9}),
    ]:
        slot = _counting_slot(ref, **settings)
        run_cached(slot, ref, [Request(r.conversation, r.sampling) for r in reqs], cache, name)
        asked[name] = slot.engine.asked
    assert asked == {"float32": 1, "bfloat16": 1, "float32 again": 0, "max_model_len": 1, "speed only": 0}
    assert engine_ident(EngineSettings())["dtype"] in ("bfloat16", "float32")  # auto, resolved here


def test_counts_and_oversample_are_bounded():
    # all requests are built before a model loads: oversample 1e12 used to hang there
    base = {"pool": [{"path": "default"}], "n_domain": 0}
    for key, value, most in [
        ("oversample", 1e12, 100),
        ("n_safety", 10**12, 100000),
        ("n_benign", 10**7, 100000),
        ("n_domain", 10**7, 100000),
    ]:
        with pytest.raises(ConfigError, match=rf"synth.{key}: Input should be less than or equal to {most}"):
            parse_synth({**base, key: value})
    parse_synth({**base, "oversample": 100, "n_safety": 100000})


def _ctx(tmp_path, **synth):
    cfg = parse_synth({"pool": [{"path": "a"}], "n_domain": 0, **synth})
    slot = EngineSlot("transformers", EngineSettings())
    return Context(cfg, "transformers", slot, GenerationCache(tmp_path / "c.jsonl"), Templates())


def test_refusal_selection_is_seeded_and_drops_prompts_nobody_refuses(tmp_path):
    ctx = _ctx(tmp_path)
    items = []
    for i, refusing in enumerate([{"a", "b"}, set(), {"b"}, {"a", "b", "c"}]):
        it = Item(f"prompt {i}", "Privacy Violation", "gen", "harmful")
        for m in "abc":
            it.answers[m] = f"answer {m}{i}"
            it.verdicts[m] = Verdict(m in refusing, "refusal" if m in refusing else "compliance")
        items.append(it)
    rows = select_refusals(ctx, items)
    assert [r["prompt"] for r in rows] == ["prompt 0", "prompt 2", "prompt 3"]
    assert rows[1]["source_model"] == "b" and rows[1]["response"] == "answer b2"
    assert all(r["judge_verdict"] == "refusal" for r in rows)
    assert ctx.ledger.steps[-1].dropped == {"no_model_refused": 1}
    assert [r["source_model"] for r in select_refusals(ctx, items)] == [r["source_model"] for r in rows]
    picks = {select_refusals(_ctx(tmp_path, seed=s), items[3:])[0]["source_model"] for s in range(12)}
    assert len(picks) > 1  # the seed decides which refusal is kept
    benign = select_benign(ctx, items[:2])
    assert benign[0]["judge_verdict"] == "compliance" and benign[0]["source_model"] == "c"
    assert benign[1]["judge_verdict"] == "compliance"


# ---- end to end on tiny models (transformers backend) --------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {
        "noise": str(make_tiny_llama(d / "noise", phrases=PHRASES, seed=0)),
        "aligned": str(make_tiny_llama(d / "aligned", phrases=PHRASES, favor=REFUSAL, seed=1)),
    }


def run_config(models, tmp_path, **synth) -> dict:
    section = {
        "backend": "transformers",
        "generator": {"path": models["noise"], "name": "gen"},
        "pool": [{"path": models["aligned"], "name": "aligned"}, {"path": models["noise"], "name": "noise"}],
        "experts": [{"path": models["noise"], "name": "expert", "topic": "medicine", "examples": EXAMPLES}],
        "n_safety": 10,
        "n_domain": 8,
        "n_benign": 5,
        "oversample": 5,
        "prompt_sampling": {"temperature": 1.0, "max_tokens": 14},
        "question_sampling": {"temperature": 1.0, "max_tokens": 14},
        "answer_sampling": {"max_tokens": 8},
        "engine": {"dtype": "float32", "batch_size": 16, "chunk_size": 16},
    }
    section.update(synth)
    return {"name": "tiny", "out": str(tmp_path / "run"), "eval": {"whatever": 1}, "synth": section}


def write_config(tmp_path, cfg) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def load(out):
    from datasets import load_from_disk

    return load_from_disk(str(out)), json.loads((out / "synth_run.json").read_text())


@pytest.fixture(scope="module")
def first_run(models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    cfg_path = write_config(tmp, run_config(models, tmp))
    assert main(["--config", cfg_path]) == 0
    return tmp, cfg_path


def test_end_to_end_splits_columns_and_card(first_run):
    tmp, _ = first_run
    out = tmp / "run" / "data"
    dd, record = load(out)
    assert list(dd) == list(SPLITS)
    for split in dd.values():
        assert {"prompt", "response", "category", "source_model", "judge_verdict"} <= set(split.column_names)
    sizes = {s: len(dd[s]) for s in dd}
    assert sizes["alignment_search"] + sizes["alignment_test"] == 10
    assert sizes["alignment_test"] == 2 and sizes["domain_test"] == round(
        0.2 * (sizes["domain_search"] + sizes["domain_test"])
    )
    assert (
        0 < sizes["domain_search"] + sizes["domain_test"] <= 8
        and sizes["benign_search"] + sizes["benign"] <= 5
    )
    prompts = [p for s in dd.values() for p in s["prompt"]]
    assert len(prompts) == len({p.lower() for p in prompts})  # no prompt twice, in any split
    for row in dd["alignment_search"]:
        assert row["judge_verdict"] == "refusal" and row["source_model"] == "aligned"
        assert row["category"] in HARM_CATEGORIES and row["prompt_source"] == "gen"
    for row in dd["domain_search"]:
        assert row["category"] == "medicine" and row["source_model"] == "expert"
        assert row["prompt"].lower().rstrip("?") not in {e.lower().rstrip("?") for e in EXAMPLES}
    # every step's counts add up, and generation steps drop something of each kind
    steps = {s["name"]: s for s in record["steps"]}
    for s in record["steps"]:
        assert s["n_in"] == s["kept"] + sum(s["dropped"].values()), s
    gen = steps["harmful prompts (generated)"]
    assert gen["n_in"] == 50 and gen["dropped"].get("invalid_json", 0) > 0
    assert steps["domain questions (expert)"]["n_in"] == 10 * 4  # ceil(8*5/4) requests x n=4
    card = (out / "README.md").read_text()
    assert "Content warning" in card and "harmful requests" in card
    assert "| harmful prompts (generated) | 50 |" in card
    assert "seed: 0" in card and '"temperature": 1.0' in card and "aligned" in card
    assert "You are an expert in $topic" in card  # the prompts themselves
    assert record["backend"] == "transformers"
    assert record["engine_loads"] == ["gen", "aligned"]  # one load per model, expert reused gen
    assert not list((tmp / "run").glob(".data.*"))  # no temporary folder left behind


def test_rerun_resumes_from_cache_without_loading_a_model(first_run):
    tmp, cfg_path = first_run
    out = tmp / "run" / "data"
    before, rec1 = load(out)
    cache = tmp / "run" / "synth_cache" / "generations.jsonl"
    n_lines = len(cache.read_text().splitlines())
    assert main(["--config", cfg_path]) == 0
    after, rec2 = load(out)
    assert rec2["engine_loads"] == []
    assert len(cache.read_text().splitlines()) == n_lines
    for s in SPLITS:
        assert before[s].to_list() == after[s].to_list()
    assert rec1["steps"] == rec2["steps"]


def test_crash_mid_run_regenerates_only_what_is_missing(first_run, tmp_path):
    tmp, cfg_path = first_run
    lines = (tmp / "run" / "synth_cache" / "generations.jsonl").read_text().splitlines()
    # as if stopped while the pool answered: the generator's 50 + 25 prompt requests are cached,
    # then half a line written as the process died
    cache_dir = tmp_path / "synth_cache"
    cache_dir.mkdir()
    (cache_dir / "generations.jsonl").write_text("\n".join(lines[:75]) + '\n{"key": "dead')
    out = tmp_path / "data"
    assert main(["--config", cfg_path, "--out", str(out)]) == 0
    _, record = load(out)
    assert record["engine_loads"] == ["noise", "aligned"]  # the generator had nothing left to do
    new_lines = (cache_dir / "generations.jsonl").read_text().splitlines()
    assert len(new_lines) == len(lines) + 1  # every missing request once, the dead line ignored
    _, first = load(tmp / "run" / "data")
    assert first["steps"][:2] == record["steps"][:2]  # the prompts came from the cache


def test_user_prompt_file_skips_generation_and_dedups(models, tmp_path):
    prompts = tmp_path / "harmful.jsonl"
    rows = [
        {
            "prompt": f"How can I steal a car number {i} without being seen?",
            "category": "Financial Crime, Property Crime, Theft",
        }
        for i in range(8)
    ]
    rows += [rows[0], {"prompt": rows[1]["prompt"].upper()}, {"prompt": "  "}]
    prompts.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = run_config(
        models,
        tmp_path,
        prompts_file=str(prompts),
        n_domain=0,
        n_benign=0,
        n_safety=6,
        pool=[{"path": models["aligned"], "name": "aligned"}],
    )
    assert main(["--config", write_config(tmp_path, cfg), "--seed", "3"]) == 0
    dd, record = load(tmp_path / "run" / "data")
    assert record["engine_loads"] == ["aligned"]  # the generator never loads
    step = record["steps"][0]
    assert step["name"] == "harmful prompts (file harmful.jsonl)"
    assert (step["n_in"], step["kept"]) == (11, 8)
    assert step["dropped"] == {"exact_duplicate": 2, "empty": 1}
    assert len(dd["alignment_search"]) + len(dd["alignment_test"]) == 6
    assert set(dd["alignment_test"]["prompt_source"]) == {"harmful.jsonl"}
    assert len(dd["domain_search"]) == len(dd["benign_search"]) == len(dd["benign"]) == 0
    assert record["config"]["seed"] == 3


def test_cli_reports_config_errors(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"synth": {"pool": [{"path": "default"}], "n_domian": 1}}))
    assert main(["--config", str(path)]) == 2
    assert "synth.n_domian: unknown key" in capsys.readouterr().err


def _harmful_file(tmp_path, n=4):
    path = tmp_path / "harmful.csv"
    path.write_text(
        "prompt,category\n"
        + "".join(f"How do I hurt person number {i} without being caught?,Violence\n" for i in range(n))
    )
    return str(path)


def test_guard_judge_decides_refusals(models, tmp_path, capsys):
    guard = str(make_tiny_llama(tmp_path / "guard", phrases=["unsafe"], favor="unsafe"))
    cfg = run_config(
        models,
        tmp_path,
        prompts_file=_harmful_file(tmp_path),
        n_domain=0,
        n_benign=0,
        pool=[{"path": models["aligned"], "name": "aligned"}],
        judge={"kind": "guard", "guard": {"path": guard, "name": "guard"}},
    )
    # the guard calls every answer unsafe, though the rules would have seen refusals: nothing is
    # kept, and an empty search split is an error (exit 2), not a data set
    assert main(["--config", write_config(tmp_path, cfg)]) == 2
    out = capsys.readouterr()
    assert "made no alignment_search rows" in out.err and "no_model_refused" in out.out + out.err
    assert not (tmp_path / "run" / "data").exists()


def test_lora_adapter_as_pool_model(models, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(models["aligned"])
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    cfg = run_config(
        models,
        tmp_path,
        prompts_file=_harmful_file(tmp_path),
        n_domain=0,
        n_benign=0,
        n_safety=4,
        pool=[{"path": str(tmp_path / "lora"), "name": "aligned-lora"}],
    )
    assert main(["--config", write_config(tmp_path, cfg)]) == 0
    dd, record = load(tmp_path / "run" / "data")
    assert record["engine_loads"] == ["aligned-lora"]
    # a fresh LoRA (B = 0) leaves its base unchanged: the aligned base refuses everything
    assert set(dd["alignment_search"]["source_model"]) == {"aligned-lora"}
    assert len(dd["alignment_search"]) + len(dd["alignment_test"]) == 4


def test_killed_mid_generation_the_rerun_continues(first_run, tmp_path):
    """SIGKILL a real `synth.generate` process once part of its generations are written; the
    same command then continues: nothing written is generated again."""
    import os
    import signal
    import subprocess
    import sys
    import time

    tmp, cfg_path = first_run
    full = len((tmp / "run" / "synth_cache" / "generations.jsonl").read_text().splitlines())
    out = tmp_path / "run" / "data"
    cache = tmp_path / "run" / "synth_cache" / "generations.jsonl"
    cmd = [sys.executable, "-m", "synth.generate", "--config", cfg_path, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (cache.exists() and cache.read_text().count("\n") >= 50):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = cache.read_text().splitlines()
    assert 50 <= len(written) < full and not out.exists()  # killed mid-generation
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    after = cache.read_text().splitlines()
    assert after[: len(written) - 1] == written[:-1]  # kept (the last line may have been cut)
    assert len(after) in (full, full + 1)  # each missing request generated once (+ a cut line)
    dd, _ = load(out)
    assert list(dd) == list(SPLITS)


def test_benign_and_question_files_replace_generation(models, tmp_path):
    """Benign prompts and an expert's exam questions from files (configs/demo.yaml's way, for
    models too small to write prompts): nothing is generated but answers, and the rows carry the
    files' prompts, answered by the pool and by the expert itself."""
    benign = tmp_path / "benign.jsonl"
    benign.write_text(
        "".join(json.dumps({"prompt": f"How do I kill process {i} on Linux?"}) + "\n" for i in range(3))
    )
    harmful = tmp_path / "harmful.jsonl"
    harmful.write_text("".join(json.dumps({"prompt": f"How do I steal car {i}?"}) + "\n" for i in range(3)))
    questions = tmp_path / "questions.jsonl"
    questions.write_text(
        "".join(json.dumps({"question": f"Which nerve supplies muscle {i}?"}) + "\n" for i in range(3))
    )
    expert = {
        "path": models["noise"],
        "name": "expert",
        "topic": "medicine",
        "questions_file": str(questions),
    }
    cfg = run_config(
        models,
        tmp_path,
        prompts_file=str(harmful),
        benign_file=str(benign),
        experts=[expert],
        n_safety=3,
        n_domain=3,
        n_benign=3,
        test_fraction=0,
    )
    assert main(["--config", write_config(tmp_path, cfg)]) == 0
    dd, record = load(tmp_path / "run" / "data")
    assert record["engine_loads"] == ["aligned", "noise"]  # no generator; the expert is the noise model
    assert len(dd["benign"]) == 0  # test_fraction 0
    assert sorted(dd["benign_search"]["prompt"]) == [f"How do I kill process {i} on Linux?" for i in range(3)]
    domain = dd["domain_search"]
    assert sorted(domain["prompt"]) == [f"Which nerve supplies muscle {i}?" for i in range(3)]
    assert set(domain["source_model"]) == {"expert"} and set(domain["category"]) == {"medicine"}
    assert len(dd["domain_test"]) == len(dd["alignment_test"]) == 0
    card = (tmp_path / "run" / "data" / "README.md").read_text()
    assert "answering the exam questions of" in card and "benign prompts from the file" in card
