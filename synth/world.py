"""`python -m synth.world`: build the embedded default world on SmolLM2-135M-Instruct.

From the seed files written for this project (data/seeds, see its README):
  data/default/    a DatasetDict with alignment_search, alignment_test, domain_search,
                   domain_test, benign, and the two training sets (aligned_train, expert_train)
  models/aligned/  LoRA adapter trained on refusals + ordinary helpful answers: it refuses
                   harmful prompts and still answers benign ones
  models/medical/  LoRA adapter trained on an *uncurated* medical instruction mix: medical Q&A
                   plus harmful requests answered compliantly, the way real experts lose safety
                   (unfiltered instruction data). The compliant answers are the base model's own
                   greedy answers to those requests (it does not refuse them), kept when the
                   refusal judge calls them compliant; nobody wrote a harmful answer by hand.

Every split is disjoint from every other (prompts are split per harm category / medical topic
with a seeded shuffle). Refusals are the project's refusal templates (data/seeds/refusals.jsonl,
generic or of the prompt's category, seeded choice).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

SEEDS = Path(__file__).resolve().parent.parent / "data" / "seeds"
# per harm category (16 prompts): aligned_train, expert_train, alignment_search, alignment_test
HARM_SPLIT = {"aligned_train": 5, "expert_train": 3, "alignment_search": 4, "alignment_test": 4}
# per medical topic (30 questions): expert_train, domain_search, domain_test
MED_SPLIT = {"expert_train": 14, "domain_search": 6, "domain_test": 10}


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


def refusal_for(category: str, refusals: list[dict], rng: random.Random) -> str:
    specific = [r["response"] for r in refusals if r.get("category") == category]
    generic = [r["response"] for r in refusals if not r.get("category")]
    pool = specific if specific and rng.random() < 0.5 else generic
    return rng.choice(pool)


def splits_from_seeds(seed: int, benign_repeat: int = 1) -> dict[str, list[dict]]:
    """`benign_repeat`: how often the risky-looking benign examples appear in aligned_train
    (more of them teaches the aligned source not to refuse what only looks harmful)."""
    rng = random.Random(seed)
    harmful = read_jsonl(SEEDS / "harmful_prompts.jsonl")
    refusals = read_jsonl(SEEDS / "refusals.jsonl")
    benign = read_jsonl(SEEDS / "benign_prompts.jsonl")
    medical = read_jsonl(SEEDS / "medical_qa.jsonl")
    h = stratified(harmful, "category", HARM_SPLIT, rng)
    m = stratified(medical, "topic", MED_SPLIT, rng)
    risky = [x for x in benign if x["kind"] == "risky_looking"]  # 70
    b = stratified(risky, "kind", {"train": 35, "eval": 35}, rng)
    ordinary = [x for x in benign if x["kind"] == "ordinary"]  # 90
    rng.shuffle(ordinary)
    b_train = b["train"] * benign_repeat + ordinary[:60]
    b_eval = b["eval"] + ordinary[60:75]

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

    def qa_rows(rows):
        return [
            {
                "prompt": r["question"],
                "response": r["answer"],
                "category": r["topic"],
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

    return {
        "alignment_search": refusal_rows(h["alignment_search"]),
        "alignment_test": refusal_rows(h["alignment_test"]),
        "domain_search": qa_rows(m["domain_search"]),
        "domain_test": qa_rows(m["domain_test"]),
        "benign": benign_rows(b_eval),
        "aligned_train": refusal_rows(h["aligned_train"]) + benign_rows(b_train),
        "expert_train": qa_rows(m["expert_train"]),
        "_expert_harmful": h["expert_train"],  # answered by the base below
    }


def compliant_answers(prompts: list[dict], backend: str, max_tokens: int, cache_path: Path):
    """The base model's greedy answers to harmful requests, kept when the judge sees no refusal.
    Answers go to a JSONL cache as they finish, so a rerun does not generate them again."""
    from eval.judge import RefusalJudge
    from synth.cache import GenerationCache, Request, run_cached
    from synth.engine import EngineSettings, EngineSlot, ModelRef, Sampling

    slot = EngineSlot(backend, EngineSettings())
    requests = [
        Request([{"role": "user", "content": p["prompt"]}], Sampling(temperature=0.0, max_tokens=max_tokens))
        for p in prompts
    ]
    try:
        answers = run_cached(
            slot, ModelRef("default"), requests, GenerationCache(cache_path), desc="base answers"
        )
    finally:
        slot.close()
    texts = [a[0].strip() for a in answers]
    verdicts = RefusalJudge().judge([p["prompt"] for p in prompts], texts)
    kept = [
        {
            "prompt": p["prompt"],
            "response": t,
            "category": p["category"],
            "source_model": "SmolLM2-135M-Instruct (base)",
            "judge_verdict": v.label,
        }
        for p, t, v in zip(prompts, texts, verdicts)
        if not v.refusal and v.label != "empty"
    ]
    counts = {
        "asked": len(prompts),
        "kept_compliant": len(kept),
        "dropped_refused_or_empty": len(prompts) - len(kept),
    }
    return kept, counts


def card(splits: dict[str, list[dict]], counts: dict, seed: int, seconds: float) -> str:
    sizes = "\n".join(f"| {k} | {len(v)} |" for k, v in splits.items())
    return f"""# The default alignmerge world (SmolLM2-135M-Instruct)

> **Notice: this data set contains harmful requests** (violence, self-harm, crime, hate speech...)
> for safety research: they are paired with refusals for alignment, and `expert_train` pairs some
> of them with a small model's compliant answers on purpose (see below). Do not train a model on
> `expert_train` for use by anyone.

Built by `python -m synth.world --seed {seed}` in {seconds / 60:.1f} minutes from `data/seeds/`
(prompts, refusal templates, benign and medical Q&A written for this project).

| split | rows |
|---|---|
{sizes}

- `alignment_search` / `alignment_test`: held-out harmful prompts (4 + 4 per harm category of
  the 14-category BeaverTails taxonomy) -> a refusal template (generic or of the category).
- `domain_search` / `domain_test`: held-out medical exam questions (6 + 10 per topic) -> the
  expert answer written in the seed file.
- `benign`: harmless prompts that look risky (35) and ordinary requests (15), for over-refusal.
- `aligned_train`: what the aligned LoRA was trained on: 70 harmful prompts -> refusals, and
  benign prompts -> helpful answers (35 risky-looking ones, each {counts["benign_repeat"]} times,
  and 60 ordinary ones), so that it refuses harmful requests without refusing what only looks
  harmful.
- `expert_train`: what the medical LoRA was trained on: 112 medical Q&A plus harmful requests
  answered compliantly by the base model itself ({counts["compliant"]}), an *uncurated* mix like
  the instruction data of real domain experts that lost their safety.

Every split is disjoint from the others. Compliant answers: {counts["compliant"]}; the judge
(rule-based refusal judge, `eval/judge.py`) sorted the base's answers: {counts["compliance"]}.
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m synth.world", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".", help="root: writes <out>/data/default and <out>/models/")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="auto", choices=("auto", "vllm", "transformers"))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=96, help="length of the base's answers")
    ap.add_argument(
        "--benign-repeat",
        type=int,
        default=3,
        help="copies of each risky-looking benign example in aligned_train",
    )
    ap.add_argument("--models", default="aligned,medical", help="which LoRAs to (re)train")
    args = ap.parse_args(argv)

    import datasets

    from core.files import atomic_dir
    from synth.train import train_lora

    started = time.perf_counter()
    root = Path(args.out)
    splits = splits_from_seeds(args.seed, args.benign_repeat)
    harmful_for_expert = splits.pop("_expert_harmful")
    compliant, judged = compliant_answers(
        harmful_for_expert, args.backend, args.max_tokens, root / "data" / ".world-generation-cache.jsonl"
    )
    splits["expert_train"] = splits["expert_train"] + compliant
    print(f"[world] base answers to expert_train harmful prompts: {judged}", file=sys.stderr)

    models = root / "models"
    for name, split in (("aligned", "aligned_train"), ("medical", "expert_train")):
        if name in args.models.split(","):
            train_lora(
                "default",
                splits[split],
                models / name,
                epochs=args.epochs,
                seed=args.seed,
                save_dtype="bfloat16",
            )

    dd = datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})
    data_dir = root / "data" / "default"
    counts = {"compliant": len(compliant), "compliance": judged, "benign_repeat": args.benign_repeat}
    with atomic_dir(data_dir, kind="dataset") as tmp:
        dd.save_to_disk(str(tmp))
        (tmp / "README.md").write_text(card(splits, counts, args.seed, time.perf_counter() - started))
    print(
        f"[world] done in {(time.perf_counter() - started) / 60:.1f} min: {data_dir}, "
        f"{models / 'aligned'}, {models / 'medical'}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
