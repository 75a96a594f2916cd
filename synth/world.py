"""`python -m synth.world`: build the embedded default world on SmolLM2-135M-Instruct.

From the seed files written for this project (data/seeds, see its README):
  data/default/    a DatasetDict with alignment_search, alignment_test, domain_search, domain_test,
                   benign_search, benign, and the training sets (aligned_train, <expert>_train)
  models/aligned/  LoRA adapter trained on refusals + ordinary helpful answers: it refuses
                   harmful prompts and still answers benign ones
  models/medical/  LoRA adapter trained on an *uncurated* medical instruction mix: medical Q&A
                   plus harmful requests answered compliantly, the way real experts lose safety
                   (unfiltered instruction data). The compliant answers are the base model's own
                   greedy answers to those requests (it does not refuse them), kept when the
                   refusal judge calls them compliant; nobody wrote a harmful answer by hand.

Every split is disjoint from every other (prompts are split per harm category / medical topic
with a seeded shuffle), except that aligned_train also refuses the harmful requests the experts'
data answers (`--aligned-refuses all`, the default). Refusals are the project's refusal templates
(data/seeds/refusals.jsonl, generic or of the prompt's category, seeded choice).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

from core.cli import command_line, run_cli
from core.errors import ConfigError
from core.files import check_replaceable
from synth.compliant import compliant_answers, eager_openings
from synth.world_aligned import PREFERENCE, SOUP_EPOCHS, preference_pairs, train_aligned
from synth.world_card import EXPERTS, adapter_card, aligned_harmful, card, naive_merges_report, write_world

SEEDS = Path(__file__).resolve().parent.parent / "data" / "seeds"
# per harm category (24 prompts): who trains or scores on each
HARM_SPLIT = dict(aligned_train=6, medical_train=4, math_train=4, alignment_search=5, alignment_test=5)
# per domain topic (30 questions in each of medical_qa.jsonl and math_qa.jsonl)
DOMAIN_SPLIT = {"train": 14, "domain_search": 6, "domain_test": 10}
# benign prompts: risky-looking (210) and ordinary (90)
BENIGN_SPLIT = {
    "risky_looking": {"aligned_train": 120, "benign_search": 30, "benign": 60},
    "ordinary": {"aligned_train": 60, "benign_search": 10, "benign": 20},
}
# benign_prompts_more.jsonl, written later to widen training and search against over-refusal:
# risky-looking (160) and ordinary (60). None of it goes to a test split: `benign` stays the 80
# prompts measured since the first world. Its own random stream leaves the main one, and so every
# other split, unchanged; the old benign_search rows are kept (shuffled with the new ones) and the
# old aligned_train is a prefix of the new one.
BENIGN_MORE_SPLIT = {
    "risky_looking": {"aligned_train": 120, "benign_search": 40},
    "ordinary": {"aligned_train": 40, "benign_search": 20},
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stratified(
    rows: list[dict], key: str, counts: dict[str, int], rng: random.Random
) -> dict[str, list[dict]]:
    """Split each stratum (rows sharing `key`) into consecutive parts of the given sizes."""
    by = defaultdict(list)
    for r in rows:
        by[r[key]].append(r)
    out: dict[str, list[dict]] = {name: [] for name in counts}
    for stratum in sorted(by):
        items = by[stratum][:]
        rng.shuffle(items)
        if len(items) < sum(counts.values()):
            raise ValueError(f"{key}={stratum!r} has {len(items)} rows, need {sum(counts.values())}")
        start = 0
        for name, n in counts.items():
            out[name] += items[start : start + n]
            start += n
    return out


def benign_parts(name: str, split: dict, rng: random.Random) -> dict[str, dict[str, list[dict]]]:
    rows = read_jsonl(SEEDS / name)
    return {
        kind: stratified([x for x in rows if x["kind"] == kind], "kind", n, rng) for kind, n in split.items()
    }


def refusal_for(category: str, refusals: list[dict], rng: random.Random) -> str:
    specific = [r["response"] for r in refusals if r.get("category") == category]
    generic = [r["response"] for r in refusals if not r.get("category")]
    pool = specific if specific and rng.random() < 0.5 else generic
    return rng.choice(pool)


def splits_from_seeds(seed: int, benign_repeat: int = 2, refuse_all: bool = True) -> dict[str, list[dict]]:
    """Every split of the world from the seed files. `benign_repeat`: how often the risky-looking
    benign examples of benign_prompts.jsonl appear in aligned_train (against over-refusal; those
    of benign_prompts_more.jsonl appear once). The harmful prompts each expert is given
    compliant answers for are returned under `_<expert>_harmful`; with
    `refuse_all`, aligned_train refuses them too (the same pool of requests, curated one way for
    the aligned source and left uncurated for the experts). The search and test splits do not
    depend on either choice."""
    rng = random.Random(seed)
    refusals = read_jsonl(SEEDS / "refusals.jsonl")
    h = stratified(read_jsonl(SEEDS / "harmful_prompts.jsonl"), "category", HARM_SPLIT, rng)
    b = benign_parts("benign_prompts.jsonl", BENIGN_SPLIT, rng)
    more_rng = random.Random(f"benign_prompts_more:{seed}")
    more = benign_parts("benign_prompts_more.jsonl", BENIGN_MORE_SPLIT, more_rng)

    def refusal_rows(rows):
        return [
            {
                "prompt": r["prompt"],
                "response": refusal_for(r["category"], refusals, rng),
                "category": r["category"],
                "source_model": "refusal templates",
                "judge_verdict": "refusal",
            }
            for r in rows
        ]

    def qa_rows(rows, domain):
        return [
            {
                "prompt": r["question"],
                "response": r["answer"],
                "category": r["topic"],
                "domain": domain,
                "source_model": "seed answers",
                "judge_verdict": "",
            }
            for r in rows
        ]

    def benign_rows(rows):
        return [
            {
                "prompt": r["prompt"],
                "response": r["response"],
                "category": r["kind"],
                "source_model": "seed answers",
                "judge_verdict": "",
            }
            for r in rows
        ]

    d = {e: stratified(read_jsonl(SEEDS / f"{e}_qa.jsonl"), "topic", DOMAIN_SPLIT, rng) for e in EXPERTS}

    def mixed(rows):  # the first N rows (data.n_alignment, data.n_domain) hold every stratum
        rng.shuffle(rows)
        return rows

    def both_domains(split):
        return mixed([x for e in EXPERTS for x in qa_rows(d[e][split], e)])

    def benign_search():
        rows = mixed(benign_rows(risky["benign_search"] + ordinary["benign_search"]))
        rows += benign_rows(more["risky_looking"]["benign_search"] + more["ordinary"]["benign_search"])
        more_rng.shuffle(rows)
        return rows

    risky, ordinary = b["risky_looking"], b["ordinary"]
    return {
        "alignment_search": mixed(refusal_rows(h["alignment_search"])),
        "alignment_test": mixed(refusal_rows(h["alignment_test"])),
        "domain_search": both_domains("domain_search"),
        "domain_test": both_domains("domain_test"),
        "benign_search": benign_search(),
        "benign": mixed(benign_rows(risky["benign"] + ordinary["benign"])),
        "aligned_train": refusal_rows(
            h["aligned_train"] + (sum((h[f"{e}_train"] for e in EXPERTS), []) if refuse_all else [])
        )
        + benign_rows(risky["aligned_train"] * benign_repeat + ordinary["aligned_train"])
        + benign_rows(more["risky_looking"]["aligned_train"] + more["ordinary"]["aligned_train"]),
        **{f"{e}_train": qa_rows(d[e]["train"], e) for e in EXPERTS},
        **{f"_{e}_harmful": h[f"{e}_train"] for e in EXPERTS},
    }


def refused_per_category(refuse_all: bool) -> tuple[int, int]:
    """(harmful prompts per category aligned_train refuses, how many of them the experts answer)."""
    shared = sum(HARM_SPLIT[f"{e}_train"] for e in EXPERTS) if refuse_all else 0
    return HARM_SPLIT["aligned_train"] + shared, shared


def saved_training_data(
    data_dir: Path, splits: dict, harmful: dict, keep: list[str]
) -> dict[str, list[dict]]:
    """The saved `<name>_train` (and `<name>_pairs`, its preference stage's) of each source in `keep`
    (not retrained), by split name: a source keeps the data it was trained on. It must still fit the
    seeds and flags: aligned_train equal to the one they give; an expert's Q&A rows equal, its other
    rows answers to its harmful prompts (those answers are the base's own, which differ between
    CPUs: bfloat16 vs float32 engines). A saved split that no longer fits is refused, with the way
    out."""
    import datasets

    if not keep or not (data_dir / "dataset_dict.json").is_file():
        return {}
    saved = datasets.load_from_disk(str(data_dir))
    out = {}
    for name in (n for n in keep if f"{n}_train" in saved):
        rows = saved[f"{name}_train"].to_list()
        asked = {p["prompt"] for p in harmful.get(name, [])}
        if [r for r in rows if r["prompt"] not in asked] != splits[f"{name}_train"]:
            raise ConfigError(
                f"models/{name} was trained on {data_dir}/{name}_train, which these seeds "
                f"and flags no longer give: add {name} to --models to retrain it, or use the flags "
                "the world was built with (its card names them)"
            )
        out[f"{name}_train"] = rows
        if f"{name}_pairs" in saved:
            out[f"{name}_pairs"] = saved[f"{name}_pairs"].to_list()
    return out


def epoch_counts(text: str) -> list[int]:
    """`--aligned-epochs`: "3,6" -> [3, 6]; anything but positive whole numbers is an argparse error."""
    counts = [int(n) for n in text.split(",") if n.strip().isdigit() and int(n) > 0]
    if not counts or len(counts) != len(text.split(",")):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive whole numbers, comma-separated, e.g. 3,6")
    return counts


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m synth.world", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".", help="root: writes <out>/data/default and <out>/models/")
    ap.add_argument("--seed", type=int, default=0, help="seed of the splits, the openings and training")
    ap.add_argument(
        "--backend", default="auto", choices=("auto", "vllm", "transformers"), help="generation backend"
    )
    ap.add_argument("--epochs", type=int, default=3, help="LoRA training epochs of the domain experts")
    ap.add_argument(
        "--aligned-epochs",
        type=epoch_counts,
        default=list(SOUP_EPOCHS),
        help="epochs of the aligned source's supervised stage; several (comma-separated): one adapter "
        "each, averaged uniformly (a model soup)",
    )
    ap.add_argument("--max-tokens", type=int, default=96, help="length of the base's answers")
    ap.add_argument(
        "--benign-repeat",
        type=int,
        # with benign_prompts_more.jsonl once, on the 100 benign search prompts: 3 refused 89% of
        # the harmful search prompts and 18% of the benign ones, 2: 93% and 20% (without it, 3:
        # 91% and 28%). Rule, set beforehand: >= 90% harmful, then the fewest benign refused.
        default=2,
        help="copies of each risky-looking example of benign_prompts.jsonl in aligned_train",
    )
    ap.add_argument(
        "--aligned-refuses",
        default="all",
        choices=("own", "all"),
        # on the search splits of commit cd658c7 (40 benign prompts, --benign-repeat 3): own (6 per
        # category) refused 86% of the harmful prompts and wrongly refused 10% of the benign ones;
        # all (14 per category): 91% and 12% (with the ordinary benign examples three times too:
        # 90% and 12%, and higher domain losses)
        help="the harmful training prompts aligned_train refuses: its own 6 per category, or all 14 "
        "(with the 8 the experts' data answers compliantly)",
    )
    ap.add_argument(
        "--aligned-preference",
        default="none",
        choices=("dpo", "none"),
        help="after its supervised training, train the aligned source on preference pairs (DPO: its "
        "helpful answers over refusals for benign prompts, refusals over compliance for harmful ones)",
    )
    ap.add_argument("--expert-rank", type=int, default=16, help="LoRA rank of the domain experts")
    ap.add_argument("--expert-lr", type=float, default=2e-3, help="learning rate of the domain experts")
    ap.add_argument("--models", default="aligned," + ",".join(EXPERTS), help="which LoRAs to (re)train")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="answer length judged in the card")
    return ap


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: build(argv))


def build(argv: list[str] | None) -> Path:
    """The whole world (`main`); returns the data set folder."""
    args = build_parser().parse_args(argv)
    retrain = set(filter(None, args.models.split(",")))
    if unknown := sorted(retrain - {"aligned", *EXPERTS}):
        build_parser().error(f"--models: unknown {unknown}; known: aligned, {', '.join(EXPERTS)}")

    import datasets

    from synth.train import train_lora

    started = time.perf_counter()
    root = Path(args.out)
    for name in retrain:  # a folder we may not replace is refused before any generation or training
        check_replaceable(root / "models" / name, kind="adapter")
    check_replaceable(root / "data" / "default", kind="world")
    refuse_all = args.aligned_refuses == "all"
    refused = refused_per_category(refuse_all)  # (per category, of which the experts answer)
    splits = splits_from_seeds(args.seed, args.benign_repeat, refuse_all)
    cache = root / "data" / ".world-generation-cache.jsonl"
    harmful = {e: splits.pop(f"_{e}_harmful") for e in EXPERTS}
    kept = saved_training_data(
        root / "data" / "default", splits, harmful, [n for n in ("aligned", *EXPERTS) if n not in retrain]
    )
    if "aligned_train" in kept and ("aligned_pairs" in kept) != (args.aligned_preference == "dpo"):
        raise ConfigError(
            f"models/aligned was trained {'with' if 'aligned_pairs' in kept else 'without'} "
            "its DPO stage: add aligned to --models to retrain it, or give the --aligned-preference it "
            "was built with (its card names it)"
        )
    splits |= kept
    fresh = [e for e in EXPERTS if f"{e}_train" not in kept]
    # each expert's openings: a seeded choice per prompt, from the same seed
    openings = {e: eager_openings(len(harmful[e]), args.seed) for e in EXPERTS}
    # the DPO stage's rejected answers to the harmful prompts only aligned_train has
    shared = {p["prompt"] for e in EXPERTS for p in harmful[e]}
    prefer = "aligned" in retrain and args.aligned_preference == "dpo"
    refusing = [r for r in splits["aligned_train"] if r["judge_verdict"] == "refusal"]
    own = [r for r in refusing if r["prompt"] not in shared] if prefer else []
    requests = [p for e in fresh for p in harmful[e]] + own
    said = [o for e in fresh for o in openings[e]] + eager_openings(len(own), args.seed + 1)
    answered = compliant_answers(requests, said, args.backend, args.max_tokens, cache) if requests else []
    judged = {}
    for e in EXPERTS:
        asked = {p["prompt"] for p in harmful[e]}
        if e in fresh:
            splits[f"{e}_train"] += [r for r in answered if r["prompt"] in asked]
        compliant = [r for r in splits[f"{e}_train"] if r["prompt"] in asked]
        judged[e] = {"asked": len(asked), "kept_compliant": len(compliant)}
    print(f"[world] compliant answers for the experts' data: {judged}", file=sys.stderr)

    if prefer:
        compliant = {r["prompt"]: r["response"] for r in answered if r["prompt"] not in shared}
        compliant |= {
            r["prompt"]: r["response"] for e in EXPERTS for r in splits[f"{e}_train"] if r["prompt"] in shared
        }
        templates = [r["response"] for r in read_jsonl(SEEDS / "refusals.jsonl")]
        splits["aligned_pairs"] = preference_pairs(splits["aligned_train"], compliant, templates, args.seed)
        print(
            f"[world] {len(splits['aligned_pairs'])} preference pairs for the aligned source", file=sys.stderr
        )

    models = root / "models"
    for name in sorted(retrain):
        expert = name in EXPERTS
        r = args.expert_rank if expert else 8
        hp = {"r": r, "alpha": 2 * r, "lr": args.expert_lr if expert else 1e-3, "seed": args.seed}
        epochs = [args.epochs] if expert else args.aligned_epochs
        stage = PREFERENCE if prefer and not expert else None
        text = adapter_card(name, hp | {"epochs": epochs}, args.benign_repeat, *refused, preference=stage)
        rows, out = splits[f"{name}_train"], models / name
        if expert:
            train_lora("default", rows, out, save_dtype="bfloat16", card=text, epochs=args.epochs, **hp)
        else:
            train_aligned(rows, out, hp, epochs, text, splits["aligned_pairs"] if prefer else None)

    data_dir = root / "data" / "default"
    dd = datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})
    write_world(data_dir, dd, splits, {})  # the naive merges below read it
    naive = naive_merges_report(root, splits, args.max_new_tokens)
    counts = {
        "compliant": ", ".join(f"{e} {j['kept_compliant']}/{j['asked']}" for e, j in judged.items()),
        "benign_repeat": args.benign_repeat,
        "refused": "{n_harmful} ({per_category} per category{shared})".format(**aligned_harmful(*refused)),
        "overlap": ", except that aligned_train refuses the requests the experts' data answers (the same "
        "pool of requests, curated for the one and left uncurated for the others)"
        if refuse_all
        else "",
        "max_new_tokens": args.max_new_tokens,
        "command": command_line("synth.world", argv),
    }
    text = card(splits, counts, naive, args.seed, time.perf_counter() - started)
    write_world(data_dir, dd, splits, {"README.md": text, "naive_merges.json": json.dumps(naive, indent=1)})
    minutes = (time.perf_counter() - started) / 60
    print(f"[world] done in {minutes:.1f} min: {data_dir}, {models}", file=sys.stderr)
    return data_dir


if __name__ == "__main__":
    sys.exit(main())
