"""The four data pipelines of Hammoud et al. (arXiv 2406.14563; docs/method.md §7), one function per step.

    harmful prompts (generator, or your file) -> every pool model answers -> judge -> one refusal
    benign-but-risky prompts (generator, or your file) -> every pool model answers -> judge -> one answer
    exam questions (each expert, or your file) -> dedup, in-context examples out -> expert answers

Each step records in the `Ledger` how many items came in, how many were kept, and why the others
were dropped; the dataset card prints that table. All randomness comes from `cfg.seed`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from eval.data import read_prompt_file
from eval.judge import BothJudge, GuardJudge, RefusalJudge, Verdict
from synth.cache import GenerationCache, Request, run_cached
from synth.config import ExpertSpec, ModelSpec, SamplingSpec, SynthConfig
from synth.engine import EngineSlot, ModelRef, Sampling
from synth.prompts import Templates
from synth.taxonomy import numbered
from synth.text import DedupIndex, parse_question, question_regex


@dataclass
class Step:
    name: str
    n_in: int
    kept: int
    dropped: Counter = field(default_factory=Counter)


class Ledger:
    def __init__(self):
        self.steps: list[Step] = []

    def add(self, name: str, n_in: int, kept: int, dropped: Counter | dict | None = None) -> Step:
        step = Step(name, n_in, kept, Counter(dropped or {}))
        self.steps.append(step)
        why = ", ".join(f"{k} {v}" for k, v in step.dropped.items() if v) or "none dropped"
        print(f"[synth] {name}: {n_in} in, {kept} kept ({why})", file=sys.stderr)
        return step


@dataclass
class Item:
    """A prompt on its way to becoming a row."""

    prompt: str
    category: str
    prompt_source: str
    kind: str  # harmful | benign | domain
    answers: dict[str, str] = field(default_factory=dict)  # model label -> response
    verdicts: dict[str, Verdict] = field(default_factory=dict)


@dataclass
class Context:
    cfg: SynthConfig
    backend: str
    slot: EngineSlot
    cache: GenerationCache
    templates: Templates
    ledger: Ledger = field(default_factory=Ledger)
    seen: DedupIndex = field(init=False)  # every prompt kept so far, across all splits

    def __post_init__(self):
        self.seen = DedupIndex(self.cfg.near_dup_threshold)


def ref(spec: ModelSpec) -> ModelRef:
    return ModelRef(path=spec.path, name=spec.name, base=spec.base)


def request_seed(seed: int, stage: str, i: int) -> int:
    return int(hashlib.sha256(f"{seed}:{stage}:{i}".encode()).hexdigest()[:8], 16) % 2**31


def sampling(spec: SamplingSpec, seed: int | None = None, n: int = 1, regex: str | None = None):
    return Sampling(
        temperature=spec.temperature,
        max_tokens=spec.max_tokens,
        n=n,
        seed=seed if spec.temperature > 0 else None,
        top_p=spec.top_p,
        regex=regex,
    )


def with_prefill(ctx: Context, messages: list[dict], kind: str) -> tuple[list[dict], str, str | None]:
    """Messages + the assistant prefill of `kind`, the prefill, and the regex that keeps the
    continuation valid JSON (vLLM only, when the prefill opens the Question string)."""
    prefill = ctx.templates.raw(f"{kind}_prefill.txt")
    regex = None
    if ctx.backend == "vllm" and ctx.cfg.structured_output == "auto" and prefill.endswith('"'):
        regex = question_regex()
    if prefill:
        messages = [*messages, {"role": "assistant", "content": prefill}]
    return messages, prefill, regex


def parse_and_dedup(
    ctx: Context, step: str, texts: list[tuple[str, str, str]], extra: DedupIndex | None = None
) -> list[Item]:
    """(generated text incl. prefill, category, source) -> new prompts; counts every drop."""
    dropped: Counter = Counter()
    items = []
    kind = step.split()[0]
    for text, category, source in texts:
        q, why = parse_question(text)
        if q is None:
            dropped[why] += 1
            continue
        if extra is not None and extra.check(q) != "new":
            dropped["in_context_example"] += 1
            continue
        status = ctx.seen.add_if_new(q)
        if status != "new":
            dropped[status] += 1
            continue
        items.append(Item(q, category, source, kind))
    ctx.ledger.add(step, len(texts), len(items), dropped)
    return items


# ---- 1. harmful prompts -------------------------------------------------------------------------


def harmful_from_generator(ctx: Context) -> list[Item]:
    cfg, t = ctx.cfg, ctx.templates
    gen = ref(cfg.generator)
    rng = random.Random(request_seed(cfg.seed, "harmful-categories", 0))
    system = t.render("harmful_system.txt", categories=numbered(cfg.categories))
    prefill = t.raw("harmful_prefill.txt")
    requests, categories = [], []
    for i in range(math.ceil(cfg.n_safety * cfg.oversample)):
        k = rng.randrange(len(cfg.categories))
        user = t.render("harmful_user.txt", number=k + 1, category=cfg.categories[k])
        msgs, prefill, regex = with_prefill(
            ctx, [{"role": "system", "content": system}, {"role": "user", "content": user}], "harmful"
        )
        seed = request_seed(cfg.seed, "harmful", i)
        requests.append(Request(msgs, sampling(cfg.prompt_sampling, seed, regex=regex)))
        categories.append(cfg.categories[k])
    outs = run_cached(
        ctx.slot,
        gen,
        requests,
        ctx.cache,
        f"{gen.label}: harmful prompts",
        keep=lambda o: parse_question(prefill + o)[0] is not None,
    )
    texts = [(prefill + o, c, gen.label) for c, out in zip(categories, outs) for o in out]
    return parse_and_dedup(ctx, "harmful prompts (generated)", texts)


def prompts_from_file(ctx: Context, path: str | Path, kind: str, category: str | None = None) -> list[Item]:
    """Prompts of `kind` (harmful, benign or domain) read from a JSONL/CSV file, deduplicated
    against every prompt seen so far; `category` replaces the file's (an expert's topic)."""
    path = Path(path)
    rows = read_prompt_file(path)
    dropped: Counter = Counter()
    items = []
    for row in rows:
        prompt = " ".join(row["prompt"].split())
        if not prompt:
            dropped["empty"] += 1
            continue
        status = ctx.seen.add_if_new(prompt)
        if status != "new":
            dropped[status] += 1
            continue
        items.append(Item(prompt, category or row["category"], path.name, kind))
    ctx.ledger.add(f"{kind} prompts (file {path.name})", len(rows), len(items), dropped)
    return items


# ---- 4. benign-but-risky prompts (for over-refusal) ---------------------------------------------


def benign_from_generator(ctx: Context) -> list[Item]:
    cfg, t = ctx.cfg, ctx.templates
    gen = ref(cfg.generator)
    seeds = cfg.benign_seeds or t.seeds()
    seed_index = DedupIndex(cfg.near_dup_threshold)
    for s in seeds:
        seed_index.add(s)
    rng = random.Random(request_seed(cfg.seed, "benign-examples", 0))
    prefill = t.raw("benign_prefill.txt")
    requests = []
    for i in range(math.ceil(cfg.n_benign * cfg.oversample)):
        examples = "\n".join(f"- {s}" for s in rng.sample(seeds, min(3, len(seeds))))
        system = t.render("benign_system.txt", examples=examples)
        msgs, prefill, regex = with_prefill(
            ctx,
            [{"role": "system", "content": system}, {"role": "user", "content": t.render("benign_user.txt")}],
            "benign",
        )
        seed = request_seed(cfg.seed, "benign", i)
        requests.append(Request(msgs, sampling(cfg.prompt_sampling, seed, regex=regex)))
    outs = run_cached(
        ctx.slot,
        gen,
        requests,
        ctx.cache,
        f"{gen.label}: benign prompts",
        keep=lambda o: parse_question(prefill + o)[0] is not None,
    )
    texts = [(prefill + o, "benign", gen.label) for out in outs for o in out]
    return parse_and_dedup(ctx, "benign prompts (generated)", texts, extra=seed_index)


# ---- 2. answers from the pool, judged -----------------------------------------------------------


def answer(ctx: Context, model: ModelSpec, items: list[Item], desc: str) -> None:
    m = ref(model)
    reqs = [
        Request([{"role": "user", "content": it.prompt}], sampling(ctx.cfg.answer_sampling)) for it in items
    ]
    for it, out in zip(items, run_cached(ctx.slot, m, reqs, ctx.cache, f"{m.label}: {desc}")):
        it.answers[m.label] = out[0].strip()


def make_judge(ctx: Context):
    rules = RefusalJudge()
    jc = ctx.cfg.judge
    if jc.kind == "rules":
        return rules
    guard_ref = ref(jc.guard)

    def generate(convs: list[list[dict]]) -> list[str]:
        reqs = [Request(c, Sampling(temperature=0.0, max_tokens=jc.guard_max_tokens)) for c in convs]
        return [o[0] for o in run_cached(ctx.slot, guard_ref, reqs, ctx.cache, f"{guard_ref.label}: judging")]

    guard = GuardJudge(generate, guard_ref.label)
    return guard if jc.kind == "guard" else BothJudge(rules, guard)


def judge_all(ctx: Context, judge, items: list[Item]) -> None:
    pairs = [(it, m) for it in items for m in it.answers]
    verdicts = judge.judge([it.prompt for it, _ in pairs], [it.answers[m] for it, m in pairs])
    for (it, m), v in zip(pairs, verdicts):
        it.verdicts[m] = v


def pick(ctx: Context, it: Item, refusal: bool) -> str | None:
    """A seeded choice among the pool models whose answer is (not) a refusal."""
    models = sorted(m for m, v in it.verdicts.items() if v.refusal == refusal and it.answers[m])
    if not models:
        return None
    return random.Random(f"{ctx.cfg.seed}:{it.prompt}").choice(models)


def row(it: Item, model: str | None, verdict: str | None = None) -> dict:
    v = it.verdicts.get(model) if model else None
    return {
        "prompt": it.prompt,
        "response": it.answers.get(model, "") if model else "",
        "category": it.category,
        "source_model": model or "",
        "judge_verdict": verdict or (v.label if v else ""),
        "judge_reason": v.reason if v else "",
        "prompt_source": it.prompt_source,
        "kind": it.kind,
    }


def select_refusals(ctx: Context, items: list[Item]) -> list[dict]:
    rows, dropped = [], Counter()
    for it in items:
        m = pick(ctx, it, refusal=True)
        if m is None:
            dropped["no_model_refused"] += 1
        else:
            rows.append(row(it, m))
    ctx.ledger.add("refusals (one per prompt)", len(items), len(rows), dropped)
    return rows


def select_benign(ctx: Context, items: list[Item]) -> list[dict]:
    """Every benign prompt is kept (over-refusal needs the hard ones too); the response is a
    seeded pick among the answers that are not refusals, or empty when every model refused."""
    rows, refused = [], 0
    for it in items:
        m = pick(ctx, it, refusal=False)
        refused += m is None
        rows.append(row(it, m, None if m else "refused_by_all"))
    ctx.ledger.add("benign answers (prompts kept even if all refused)", len(items), len(rows))
    if refused:
        print(f"[synth] {refused} benign prompts were refused by every pool model", file=sys.stderr)
    return rows


# ---- 3. domain exam questions and expert answers ------------------------------------------------


def expert_examples(expert: ExpertSpec) -> list[str]:
    examples = list(expert.examples)
    if expert.examples_file:
        p = Path(expert.examples_file)
        if p.suffix == ".json":
            loaded = json.loads(p.read_text())
            examples += [e if isinstance(e, str) else e["question"] for e in loaded]
        else:
            examples += [r["prompt"] for r in read_prompt_file(p)]
    return examples


def domain_for_expert(ctx: Context, expert: ExpertSpec, target: int) -> list[dict]:
    cfg, t = ctx.cfg, ctx.templates
    m = ref(expert)
    if expert.questions_file:
        items = prompts_from_file(ctx, expert.questions_file, "domain", expert.topic)
        return expert_rows(ctx, expert, items, target)
    examples = expert_examples(expert)
    rng = random.Random(request_seed(cfg.seed, f"domain-examples:{m.label}", 0))
    n = cfg.questions_per_request
    requests = []
    for i in range(math.ceil(target * cfg.oversample / n)):
        # 3 in-context examples per request, drawn at random (as in the paper): a small model
        # tends to copy the first example it sees, so every request shows different ones
        shown = "\n".join(
            f'Example {j}: [{{"Question": {json.dumps(q)}}}]'
            for j, q in enumerate(rng.sample(examples, min(3, len(examples))), 1)
        )
        system = t.render("domain_system.txt", topic=expert.topic, examples=shown)
        msgs, prefill, regex = with_prefill(
            ctx,
            [{"role": "system", "content": system}, {"role": "user", "content": t.render("domain_user.txt")}],
            "domain",
        )
        seed = request_seed(cfg.seed, f"domain:{m.label}", i)
        requests.append(Request(msgs, sampling(cfg.question_sampling, seed, n, regex)))
    outs = run_cached(
        ctx.slot,
        m,
        requests,
        ctx.cache,
        f"{m.label}: exam questions",
        keep=lambda o: parse_question(prefill + o)[0] is not None,
    )
    ex_index = DedupIndex(cfg.near_dup_threshold)
    for e in examples:
        ex_index.add(e)
    texts = [(prefill + o, expert.topic, m.label) for out in outs for o in out]
    items = parse_and_dedup(ctx, f"domain questions ({m.label})", texts, extra=ex_index)
    for it in items:
        it.kind = "domain"
    return expert_rows(ctx, expert, items, target)


def expert_rows(ctx: Context, expert: ExpertSpec, items: list[Item], target: int) -> list[dict]:
    """The expert's own answers to its exam questions; refusals and empty answers dropped."""
    cfg, m = ctx.cfg, ref(expert)
    answer(ctx, expert, items, "answers to its questions")
    judge_all(ctx, RefusalJudge(), items)
    rows, dropped = [], Counter()
    for it in items:
        v = it.verdicts[m.label]
        if not it.answers[m.label]:
            dropped["empty_answer"] += 1
        elif cfg.drop_domain_refusals and v.refusal:
            dropped["expert_refused"] += 1
        else:
            rows.append(row(it, m.label))
    ctx.ledger.add(f"domain answers ({m.label})", len(items), len(rows), dropped)
    return cut(ctx, f"domain ({m.label})", rows, target)


# ---- splits --------------------------------------------------------------------------------------


def cut(ctx: Context, name: str, rows: list[dict], n: int) -> list[dict]:
    """A seeded shuffle, cut to `n` rows."""
    rows = list(rows)
    random.Random(request_seed(ctx.cfg.seed, f"cut:{name}", 0)).shuffle(rows)
    kept = rows[:n]
    ctx.ledger.add(f"{name}: cut to target {n}", len(rows), len(kept), {"over_target": len(rows) - len(kept)})
    if len(kept) < n:
        print(
            f"[synth] WARNING {name}: {len(kept)} rows, fewer than the {n} asked for (the lines "
            "above say which step dropped them: give more prompts in the file, or raise `oversample` "
            "when the generator writes them)",
            file=sys.stderr,
        )
    return kept


def split(rows: list[dict], test_fraction: float) -> tuple[list[dict], list[dict]]:
    """(search, test): disjoint by construction, as every prompt appears once in `rows`."""
    n_test = round(len(rows) * test_fraction) if len(rows) > 1 else 0
    return rows[n_test:], rows[:n_test]
