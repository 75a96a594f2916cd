"""Models side by side on the test splits, for the demo and the ablation: config variants of one
search, the naive merges a user would try first, and the generation-based measure of any merge
(docs/method.md §6). Every model is written into the same in-memory working model."""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.special import softmax

from eval.behaviour import refusals_by_group
from eval.judge import RefusalJudge
from eval.loss import Scorer
from eval.mcq import EXACT_TOKENS, exact_accuracy
from optimize.config import Config, validate_config
from optimize.context import Context, scored_sets
from optimize.merge import PLAIN
from optimize.methods import Candidate, DareTies, Linear, MergeMethod, Ties


def variant(
    cfg: Config, label: str, search: dict | None = None, data: dict | None = None, **output
) -> Config:
    """The config with other search/data/output settings; `label` names its run folder (under
    the config's) and its study."""
    raw = cfg.model_dump(by_alias=True)
    raw["search"].update(search or {})
    # the variant's run folder moves under this one; its data stays where it is
    test_dir = str(cfg.test_dir) if cfg.test_dir.exists() else None  # named, it must exist
    raw["data"].update({"dir": str(cfg.data_dir), "test_dir": test_dir}, **(data or {}))
    raw["output"].update(output)
    if label:
        raw["out"] = str(cfg.run_dir / label)
        raw["study_name"] = f"{cfg.study_name or cfg.name}-{label}"
    return validate_config(raw, f"({label or 'demo'} variant)")


# The search settings of the domain-only (EvoMM) baseline: the domain loss alone, picked by it.
DOMAIN_ONLY = {"score": "domain", "beta": 0.0, "verify": {"top_k": 0}, "constrain": {"enabled": False}}
# The paper's objective (L_align + alpha L_domain, lowest value chosen), beside this project's.
PAPER_OBJECTIVE = {"beta": 0.0, "verify": {"top_k": 0}, "constrain": {"enabled": False}}


def for_variant(ctx: Context, cfg: Config) -> Context:
    """The context of a variant search (`cfg`): the same models, scored on the sets its
    objective uses (the domain-only search: the domain set alone)."""
    return dataclasses.replace(
        ctx,
        cfg=cfg,
        scorer=ctx.scorer_for({k: ctx.rows[k] for k in scored_sets(cfg.search)}),
        # its own timings: the loading was shared, the search and outputs are its own
        timings={k: v for k, v in ctx.timings.items() if k in ("load_base_s", "task_vectors_s")},
    )


def references(ctx: Context) -> dict[str, tuple[MergeMethod, Candidate]]:
    """The base and each source alone (theta_base + tau_i), labelled for tables."""
    sources = ctx.cfg.sources
    return {
        "base" if i is None else f"source: {sources[i].name} ({sources[i].role})": (PLAIN, c)
        for i, c in ctx.merger.references()
    }


def naive_merges(
    ctx: Context, cocktail_temperature: float = 1.0, losses=None
) -> dict[str, tuple[MergeMethod, Candidate]]:
    """The merges a user tries before any search: task arithmetic with weight 1 each; TIES and
    DARE-TIES with mergekit's documented example settings (weight 1, density 0.5, normalize);
    LM-Cocktail on the domain search split (docs/method.md §6.3). `losses`: as for `cocktail`."""
    half = ctx.merger.uniform(1)
    half.density = np.full_like(half.weight, 0.5)
    return {
        "task arithmetic, weights 1": (PLAIN, ctx.merger.uniform(1)),
        "TIES, weights 1, density 0.5": (Ties(normalize=True), half),
        "DARE-TIES, weights 1, density 0.5": (DareTies(normalize=True, seed=ctx.cfg.search.seed), half),
        "LM-Cocktail, D_domain": (
            Linear(normalize=True),
            cocktail(ctx, ["domain"], cocktail_temperature, losses)[0],
        ),
    }


def remembered_losses(ctx: Context):
    """`losses(method, candidate)` for `cocktail`: each merge's per-example search losses, scored
    once (the sources are scored for every LM-Cocktail variant otherwise)."""
    memo: dict[bytes, dict[str, list[float]]] = {}

    def losses(method, c):
        key = method.name.encode() + c.weight.tobytes()
        if key not in memo:
            with ctx.merger.applied(c, method) as model:
                memo[key] = ctx.scorer.example_losses(model)
        return memo[key]

    return losses


def cocktail(ctx: Context, sets: list[str], temperature: float, losses=None) -> tuple[Candidate, np.ndarray]:
    """LM-Cocktail's weights lambda = softmax(-CE / T) over the sources, CE_t = source t's mean
    response CE on the search split(s) `sets`; theta = sum_t lambda_t theta_t.
    `losses(method, candidate)` gives per-example losses (default: scored now)."""

    def scored(method, c):
        with ctx.merger.applied(c, method) as model:
            return ctx.scorer.example_losses(model)

    per_source = [(losses or scored)(m, c) for m, c in list(references(ctx).values())[1:]]
    ce = np.array([np.mean([x for s in sets for x in per[s]]) for per in per_source])
    lam = softmax(-ce / temperature)
    return Candidate(weight=np.repeat(lam[:, None], ctx.base.groups.n, axis=1)), ce


def evaluate(
    ctx: Context,
    method: MergeMethod,
    candidate: Candidate,
    test: Scorer,
    harmful: list[str],
    benign: list[str],
    max_new_tokens: int,
    suites: dict[str, tuple[list[str], list[str]]] | None = None,
    exact: dict[str, tuple[list[str], list[float]]] | None = None,
) -> dict:
    """Test losses (`alignment_loss`, `domain_loss`, and every other scored set by its name), and
    the shares of harmful prompts refused and of benign prompts wrongly refused (greedy answers,
    rule-based refusal judge); the same shares on each external suite's (harmful, benign) prompts
    (`suites`, eval/suites.py) under "suites"; for each domain of `exact` (prompts, final answers),
    the share of greedy answers of up to `EXACT_TOKENS` tokens with the right final number
    (`accuracy:<domain>`, eval/mcq.py)."""
    groups = {"harmful": harmful, "benign": benign}
    for name, (h, b) in (suites or {}).items():
        groups |= {f"{name}:harmful": h, f"{name}:benign": b}
    tokenizer, accuracy = ctx.base.tokenizer, {}
    with ctx.merger.applied(candidate, method) as model:
        losses = test.losses(model)
        judged = refusals_by_group(
            model, tokenizer, groups, RefusalJudge(), max_new_tokens, 28, generation=ctx.generation
        )
        for domain, (prompts, expected) in (exact or {}).items():
            answers = ctx.generation.answers(model, tokenizer, prompts, EXACT_TOKENS, 28)
            accuracy[f"accuracy:{domain}"] = exact_accuracy(answers, expected)
    harm, ben = judged["harmful"], judged["benign"]
    external = {
        name: {
            "refused_harmful": judged[f"{name}:harmful"]["share"],
            "refused_benign": judged[f"{name}:benign"]["share"],
        }
        for name in suites or {}
    }
    return {
        **({"suites": external} if external else {}),
        **{k if k not in ("alignment", "domain") else f"{k}_loss": v for k, v in losses.items()},
        **accuracy,
        "refused_harmful": harm["share"],
        "refused_benign": ben["share"],
        "examples": [
            {"prompt": p, "answer": a, "verdict": v}
            for p, a, v in list(zip(harmful, harm["answers"], harm["verdicts"]))[:3]
        ],
    }
