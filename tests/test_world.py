"""The default world's data: splits from the seed files are disjoint, balanced and seeded; the
maths seeds are correct."""

import re
from collections import Counter
from pathlib import Path

import pytest

from synth.math_seeds import problems
from synth.world import BENIGN_MORE_SPLIT, BENIGN_SPLIT, DOMAIN_SPLIT, EXPERTS, HARM_SPLIT, splits_from_seeds


def test_splits_are_disjoint_balanced_and_seeded():
    s = splits_from_seeds(0, refuse_all=False)
    assert s == splits_from_seeds(0, refuse_all=False)
    assert s["alignment_search"] != splits_from_seeds(1)["alignment_search"]
    prompts = {k: {r["prompt"] for r in v} for k, v in s.items()}
    names = list(prompts)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not prompts[a] & prompts[b], (a, b)
    for split in ("alignment_search", "alignment_test"):
        per_cat = Counter(r["category"] for r in s[split])
        assert len(per_cat) == 14 and set(per_cat.values()) == {HARM_SPLIT[split]}
        assert all(r["response"] and r["judge_verdict"] == "refusal" for r in s[split])
    for e in EXPERTS:
        assert Counter(r["category"] for r in s[f"_{e}_harmful"]) == Counter(
            {c: HARM_SPLIT[f"{e}_train"] for c in per_cat}
        )
    for split in ("domain_search", "domain_test"):
        per_topic = Counter((r["domain"], r["category"]) for r in s[split])
        assert len(per_topic) == 16 and set(per_topic.values()) == {DOMAIN_SPLIT[split]}
    for split in ("benign_search", "benign"):
        more = {kind: counts.get(split, 0) for kind, counts in BENIGN_MORE_SPLIT.items()}
        expected = {kind: counts[split] + more[kind] for kind, counts in BENIGN_SPLIT.items()}
        assert Counter(r["category"] for r in s[split]) == expected


def test_math_answers_are_right():
    rows = problems(0, 30)
    assert len({r["question"] for r in rows}) == len(rows) == 240
    for r in rows:
        # every "a op b (op c...) = d" step of the worked answer holds
        steps = re.findall(r"((?:\d+ [-+x/] )+\d+) = \$?(\d+)", r["answer"])
        assert steps, r
        for expr, result in steps:
            assert eval(expr.replace("x", "*")) == int(result), r
        assert re.search(r"The answer is \d+\.$", r["answer"]), r


def test_math_seed_files_are_the_programs_output(tmp_path):
    from synth.math_seeds import SEEDS, main

    assert main(["--out", str(tmp_path), "--seed", "0"]) == 0
    for name in ("math_qa.jsonl", "math_icl.jsonl"):
        assert (tmp_path / name).read_bytes() == (SEEDS / name).read_bytes(), name


def test_refusing_the_experts_requests_changes_only_the_aligned_training_data():
    own, shared = splits_from_seeds(0, 3, refuse_all=False), splits_from_seeds(0, 3)
    assert {k for k in own if own[k] != shared[k]} == {"aligned_train"}
    refused = {r["prompt"] for r in shared["aligned_train"] if r["judge_verdict"] == "refusal"}
    experts = {r["prompt"] for e in EXPERTS for r in shared[f"_{e}_harmful"]}
    assert experts < refused and len(refused) == 14 * 14
    held_out = {r["prompt"] for k in ("alignment_search", "alignment_test") for r in shared[k]}
    assert not refused & held_out


def test_the_later_benign_seeds_reach_only_aligned_train_and_benign_search(monkeypatch):
    """benign_prompts_more.jsonl has its own random stream: reordering or growing it leaves every
    held-out split (the test splits above all) and the experts' data exactly as they were."""
    import synth.world as world

    before, read = splits_from_seeds(0), world.read_jsonl

    def changed(path):
        rows = read(path)
        if path.name != "benign_prompts_more.jsonl":
            return rows
        return rows[::-1] + [dict(r, prompt=r["prompt"] + " (again)") for r in rows]

    monkeypatch.setattr(world, "read_jsonl", changed)
    after = splits_from_seeds(0)
    assert {k for k in before if before[k] != after[k]} == {"aligned_train", "benign_search"}


def test_a_source_not_retrained_keeps_the_data_it_was_trained_on(tmp_path, monkeypatch, capsys):
    """synth.world without training (`--models ''`): the experts' compliant answers are generated
    once; a second build keeps them (the base's answers differ between CPUs), and a build whose
    seeds or flags no longer give the saved data is refused before anything is generated."""
    import datasets

    import synth.world as world

    calls = []

    def answers(prompts, openings, *args):  # the base model's part, not under test here
        calls.append(len(prompts))
        return [
            {"prompt": p["prompt"], "response": f"{o}run {len(calls)}"} for p, o in zip(prompts, openings)
        ]

    monkeypatch.setattr(world, "compliant_answers", answers)
    monkeypatch.setattr(world, "naive_merges_report", lambda *args: {})
    build = ["--models", "", "--out", str(tmp_path)]
    assert world.main(build) == 0 and world.main(build) == 0
    assert calls == [2 * 14 * HARM_SPLIT["medical_train"]]  # the second build generated nothing
    saved = datasets.load_from_disk(str(tmp_path / "data" / "default"))
    for e in EXPERTS:
        compliant = [r for r in saved[f"{e}_train"] if r["response"].endswith("run 1")]
        assert len(compliant) == 14 * HARM_SPLIT[f"{e}_train"]
    assert "56/56" in (tmp_path / "data" / "default" / "README.md").read_text()
    for flags in (["--seed", "1"], ["--aligned-refuses", "own"], ["--benign-repeat", "3"]):
        assert world.main(build + flags) == 2
        assert re.search("add (aligned|medical) to --models", capsys.readouterr().err)
    assert calls == [2 * 14 * HARM_SPLIT["medical_train"]]
    with pytest.raises(SystemExit) as unknown:
        world.main(["--models", "aligned,chemistry", "--out", str(tmp_path / "w")])
    assert unknown.value.code == 2 and "unknown ['chemistry']" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_the_world_folder_is_rewritten_whole_with_its_cards(tmp_path):
    """synth.world writes its data, prompts and cards in one atomic write, twice per build (the
    naive merges read the data between): every file is listed in the marker, so a rebuild is never
    refused as a folder holding files alignmerge did not write."""
    import datasets

    from core.files import check_replaceable, read_marker
    from synth.world_card import write_world

    splits = {k: v for k, v in splits_from_seeds(0).items() if not k.startswith("_")}
    dd = datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})
    out = tmp_path / "data" / "default"
    for build in range(2):
        write_world(out, dd, splits, {})
        write_world(out, dd, splits, {"README.md": f"card {build}", "naive_merges.json": "{}"})
    marker = read_marker(out)
    assert marker["kind"] == "world" and {"README.md", "prompts/benign_search.jsonl"} <= set(marker["files"])
    assert (out / "README.md").read_text() == "card 1"
    check_replaceable(out, kind="world")


def test_preference_pairs_prefer_refusing_harm_and_answering_the_rest():
    """The aligned source's DPO pairs: one per prompt of aligned_train (its risky-looking benign
    examples appear twice there), a harmful prompt's refusal over the compliant answer to it, a
    benign prompt's own answer over a refusal template; a harmful prompt nobody answered is left out."""
    from synth.world import SEEDS, read_jsonl
    from synth.world_aligned import preference_pairs, weighted

    train = splits_from_seeds(0)["aligned_train"]
    harmful = [r["prompt"] for r in train if r["judge_verdict"] == "refusal"]
    compliant = {p: f"Sure! {p}" for p in harmful[1:]}
    templates = [r["response"] for r in read_jsonl(SEEDS / "refusals.jsonl")]
    pairs = preference_pairs(train, compliant, templates, seed=0)
    assert len(pairs) == len({r["prompt"] for r in train}) - 1 and harmful[0] not in {
        p["prompt"] for p in pairs
    }
    answers = {r["prompt"]: r["response"] for r in train}
    for p in pairs:
        assert p["response"] == answers[p["prompt"]]
        refused = p["prompt"] in compliant
        assert p["rejected"] == compliant[p["prompt"]] if refused else p["rejected"] in templates
    again, other_seed = (preference_pairs(train, compliant, templates, seed=s) for s in (0, 1))
    assert again == pairs != other_seed
    assert {p["prompt"] for p in pairs if p["kind"] == "harmful"} == set(compliant)
    trained = weighted(pairs, 3)
    assert len(trained) == len(pairs) + 2 * len(compliant)
    assert all(trained.count(p) == (3 if p["kind"] == "harmful" else 1) for p in pairs)


def test_the_aligned_preference_stage_is_wired_to_its_pairs(tmp_path, monkeypatch, capsys):
    """`--aligned-preference dpo`: one generation call answers the experts' harmful prompts and the
    ones only aligned_train has; the supervised adapter goes to a temporary folder, DPO from it to
    models/aligned with every pair, and the pairs are saved as `aligned_pairs`. Off by default.
    The supervised stage is a soup by default (`--aligned-epochs 3,6`: two runs, then their average),
    one run for one count."""
    import datasets

    import synth.train
    import synth.world as world

    calls, trained = [], []

    def answers(prompts, openings, *args):  # the base refused the first request: it has no pair
        calls.append(len(prompts))
        return [{"prompt": p["prompt"], "response": f"{o}yes"} for p, o in zip(prompts[1:], openings[1:])]

    def fake_train(base, rows, out, **kw):
        trained.append(("sft", kw["epochs"], kw.get("card")))
        Path(out).mkdir(parents=True)
        return Path(out)

    def fake_average(base, adapters, out, **kw):
        trained.append(("soup", [Path(a).is_dir() for a in adapters], kw.get("card")))
        Path(out).mkdir(parents=True)
        return Path(out)

    def fake_prefer(base, adapter, pairs, out, **kw):
        trained.append(("dpo", Path(adapter).is_dir(), len(pairs), kw["card"], kw["lr"]))
        Path(out).mkdir(parents=True)
        return Path(out)

    monkeypatch.setattr(world, "compliant_answers", answers)
    monkeypatch.setattr(world, "naive_merges_report", lambda *args: {})
    monkeypatch.setattr(synth.train, "train_lora", fake_train)
    monkeypatch.setattr(synth.train, "prefer_lora", fake_prefer)
    monkeypatch.setattr(synth.train, "average_lora", fake_average)
    monkeypatch.setitem(world.PREFERENCE, "harmful_repeat", 3)
    assert world.main(["--models", "aligned", "--aligned-preference", "dpo", "--out", str(tmp_path)]) == 0
    per_category, shared = world.refused_per_category(True)
    own = 14 * (per_category - shared)
    assert calls == [14 * shared + own]
    unique = len({r["prompt"] for r in splits_from_seeds(0)["aligned_train"]})
    sft3, sft6, soup, (dpo, from_folder, n_pairs, card, lr) = trained
    assert sft3 == ("sft", 3, None) and sft6 == ("sft", 6, None) and soup == ("soup", [True, True], None)
    n_harmful = 14 * per_category - 1  # each harmful pair three times in training, once in the split
    assert from_folder and n_pairs == unique - 1 + 2 * n_harmful
    assert lr == world.PREFERENCE["lr"] and world.PREFERENCE["harmful_repeat"] == 3
    assert "DPO (Rafailov et al." in card and "each harmful pair 3x per epoch" in card
    saved = datasets.load_from_disk(str(tmp_path / "data" / "default"))
    assert len(saved["aligned_pairs"]) == unique - 1
    assert "`aligned_pairs`" in (tmp_path / "data" / "default" / "README.md").read_text()
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["aligned"]
    # a build that keeps the aligned source must keep its stage too: the flags it was built with
    assert world.main(["--models", "", "--out", str(tmp_path)]) == 2
    assert "trained with its DPO stage: add aligned to --models" in capsys.readouterr().err
    assert world.main(["--models", "", "--aligned-preference", "dpo", "--out", str(tmp_path)]) == 0
    assert len(datasets.load_from_disk(str(tmp_path / "data" / "default"))["aligned_pairs"]) == unique - 1

    trained.clear()
    assert world.main(["--models", "aligned", "--out", str(tmp_path / "plain")]) == 0
    assert [t[:2] for t in trained] == [("sft", 3), ("sft", 6), ("soup", [True, True])]
    assert (
        "for 3 and 6 epochs" in trained[2][2] and "model soup" in trained[2][2] and "DPO" not in trained[2][2]
    )
    trained.clear()
    assert world.main(["--models", "aligned", "--aligned-epochs", "4", "--out", str(tmp_path / "four")]) == 0
    assert [t[:2] for t in trained] == [("sft", 4)] and "- 4 epochs, AdamW" in trained[0][2]
    assert "aligned_pairs" not in datasets.load_from_disk(str(tmp_path / "plain" / "data" / "default"))
    assert world.main(["--models", "", "--aligned-preference", "dpo", "--out", str(tmp_path / "plain")]) == 2
    assert "trained without its DPO stage" in capsys.readouterr().err
    for wrong in ("3,x", "0", "3,,6", ""):
        with pytest.raises(SystemExit) as exit:
            world.main(["--models", "", "--aligned-epochs", wrong, "--out", str(tmp_path / "plain")])
        assert exit.value.code == 2
        assert "positive whole numbers, comma-separated" in capsys.readouterr().err


def test_an_out_folder_it_may_not_write_is_one_error_line(tmp_path, capsys):
    import synth.world as world

    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert world.main(["--models", "medical", "--out", str(a_file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is a file" in err and "Traceback" not in err
    assert a_file.read_text() == "mine"
    (tmp_path / "w" / "data" / "default").mkdir(parents=True)
    (tmp_path / "w" / "data" / "default" / ".gitignore").write_text("*")  # a user's file: before training
    assert world.main(["--models", "medical", "--out", str(tmp_path / "w")]) == 2
    assert "not written by alignmerge" in capsys.readouterr().err
