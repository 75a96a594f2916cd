"""`python -m eval.run --model <merged model folder | run folder>`: what a user needs to trust a merge.

- **Safety**: greedy answers to the held-out harmful prompts (`alignment_test`, plus any prompt
  file named in `eval.prompts`), judged by the refusal rules (or a guard model): share refused,
  overall and per harm category.
- **Over-refusal**: the same on the `benign` split (harmless prompts that look risky): share
  answered. Benign answers are always judged by the rules (a guard's `safe` is not an answer).
- **Domain**: alignment and domain test loss (`eval.loss.Scorer`), multiple-choice accuracy by
  option log-likelihood (`eval.mcq`), lm-evaluation-harness tasks (`eval.lm_eval.tasks`,
  `eval.harness`).
- **MergeAlign analysis** (`eval.analysis`): per layer group, cosine between task vectors,
  relative distance of the merged model to each source, linear CKA of hidden states, and each
  source's contribution.

Writes `report.md`, `metrics.json`, `answers.jsonl` and `plots/*.png` into --out (default
`<run>/eval`, or `runs/eval/<model name>`), atomically. See docs/eval.md.

This module is an application on the top floor: it puts the `eval` library to work on a merge
that it rebuilds with `optimize` and generates from with `synth`'s engines.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.cli import ArgumentParser, run_cli
from core.files import atomic_dir, write_text_atomic
from core.models import (
    dtype_name,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from core.vllm_env import vllm_available
from eval import analysis
from eval.behaviour import Generation, refusal_summary
from eval.harness import run_lm_eval
from eval.judge import BothJudge, GuardJudge, RefusalJudge
from eval.mcq import EXACT_TOKENS, exact_accuracy, graded_domains, mcq_scores, option_logprobs
from eval.run_inputs import Inputs, load_inputs
from eval.run_report import jsonable, make_plots, write_report
from eval.suites import SUITES
from optimize.context import Context, make_scorer, prepare
from optimize.deltas import DenseView
from optimize.merge import PLAIN, InMemoryMerger
from optimize.methods import Candidate
from optimize.report import versions
from optimize.sources import load_task_vector
from synth.engine import EngineSettings, ModelRef, Sampling
from synth.engine import open_engine as open_synth_engine


# ----------------------------------------------------------------------------- the merged model
@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    device: str
    how: str  # how the weights were obtained, for the report
    ctx: Context | None = None  # base + task vectors (for the analysis)
    merged_tau: dict | None = None  # theta_merged - theta_base


def load_merged(inp: Inputs) -> Loaded:
    cfg, t = inp.cfg, inp.target
    rt = cfg.runtime
    device = resolve_device(rt.device)
    if t.folder is not None and not inp.settings.analysis:
        model = load_model(
            t.folder, resolve_dtype(rt.dtype, device), device, rt.allow_pickle, rt.trust_remote_code
        )
        return Loaded(
            model, load_tokenizer(t.folder, rt.trust_remote_code), device, f"loaded from `{t.folder}`"
        )
    ctx = prepare(cfg, inp.test)
    if t.params is not None:
        candidate = ctx.space.decode(t.params)
        tau = ctx.merger.merged_delta(candidate)
        how = f"rebuilt in memory from `{t.run_dir / 'best.yaml'}` on the base `{cfg.base}`"
        model = ctx.merger.apply(candidate)
    else:
        tau = load_task_vector("merged model", str(t.folder), ctx.base, rt.allow_pickle, rt.trust_remote_code)
        ones = Candidate(weight=np.ones((1, ctx.base.groups.n)))
        model = InMemoryMerger(ctx.base, [tau], PLAIN).apply(ones)
        how = f"loaded from `{t.folder}` (as a delta on the base `{cfg.base}`)"
    return Loaded(model, ctx.base.tokenizer, device, how, ctx, tau)


# ----------------------------------------------------------------------------- generation + judging
def open_engine(path: str, backend: str, runtime):
    """A generation engine on `path` under the run's loader policy (`runtime` of the config)."""
    settings = EngineSettings(
        dtype=dtype_name(runtime.dtype, runtime.device),
        allow_pickle=runtime.allow_pickle,
        trust_remote_code=runtime.trust_remote_code,
    )
    return open_synth_engine(ModelRef(str(path)), backend, settings)


def engine_answers(engine, conversations: list[list[dict]], max_tokens: int) -> list[str]:
    outs = engine.chat(conversations, [Sampling(temperature=0.0, max_tokens=max_tokens)] * len(conversations))
    return [o[0].strip() for o in outs]


def generation_backend(inp: Inputs) -> str:
    """vllm (on the model folder), vllm in memory (a merge rebuilt from best.yaml, its weights
    loaded into an engine on the base: CPU only), or transformers."""
    wanted = inp.settings.backend
    if wanted == "transformers" or not (wanted == "vllm" or vllm_available()):
        return "transformers"
    if inp.target.folder is not None:
        return "vllm"
    return "vllm in memory" if resolve_device(inp.cfg.runtime.device) == "cpu" else "transformers"


def judge_harmful(inp: Inputs, prompts: list[str], answers: list[str]):
    """Verdicts on the harmful answers and the judge's name (rules, guard, or both)."""
    s, rules = inp.settings, RefusalJudge()
    if s.judge == "rules":
        return rules.judge(prompts, answers), rules.name
    backend = "transformers" if s.backend == "transformers" else "auto"
    with open_engine(s.guard, backend, inp.cfg.runtime) as engine:
        guard = GuardJudge(lambda convs: engine_answers(engine, convs, s.guard_max_tokens), engine.ref.label)
        judge = guard if s.judge == "guard" else BothJudge(rules, guard)
        return judge.judge(prompts, answers), f"{judge.name} ({engine.ref.label})"


def suite_figures(name: str, answers: list[dict], judge: str) -> dict:
    """An external suite's shares of harmful and of benign prompts refused, apart from the rest."""
    mine = {
        kind: [a["refused"] for a in answers if a["set"] == name and a["kind"] == kind]
        for kind in ("harmful", "benign")
    }
    return SUITES[name].describe() | {
        "harmful_refused": float(np.mean(mine["harmful"])),
        "benign_refused": float(np.mean(mine["benign"])),
        "n_harmful": len(mine["harmful"]),
        "n_benign": len(mine["benign"]),
        "judge": f"{judge} (harmful), rules (benign)",
    }


# ----------------------------------------------------------------------------- analysis
def analyse(inp: Inputs, loaded: Loaded) -> dict:
    """Weight-space metrics, then CKA of the merged model against the base and each source alone
    (each written in turn into the working model: run it last)."""
    ctx, cfg = loaded.ctx, inp.cfg
    groups = list(ctx.base.groups.names)
    names = [s.name for s in cfg.sources]
    sources = dict(zip(names, map(DenseView, ctx.merger.task_vectors)))
    out = analysis.weight_metrics(sources, loaded.merged_tau, ctx.base.groups.of_param, len(groups))
    k = inp.settings.cka_prompts
    prompts = [r["prompt"] for r in inp.test["alignment"][:k] + inp.test["domain"][:k]]
    features = lambda model: analysis.hidden_states(  # noqa: E731
        model,
        analysis.prompt_batches(loaded.tokenizer, prompts, cfg.data.max_length),
        ctx.base.groups.layer_prefix,
    )
    merged = features(loaded.model)
    out["cka"] = {  # the base, then each source alone
        "base" if i is None else names[i]: analysis.cka_profile(
            merged, features(ctx.merger.apply(c, PLAIN)), groups
        )
        for i, c in ctx.merger.references()
    }
    out.update(groups=groups, cka_prompts=len(prompts), cka_tokens=len(merged["embed"]))
    return out


# ----------------------------------------------------------------------------- outputs
def write_outputs(inp: Inputs, m: dict, answers: list[dict]) -> Path:
    with atomic_dir(inp.out, kind="eval") as tmp:
        files = make_plots(m, tmp / "plots")
        write_text_atomic(tmp / "metrics.json", json.dumps(jsonable(m), indent=1))
        write_text_atomic(tmp / "answers.jsonl", "".join(json.dumps(a) + "\n" for a in answers))
        report = write_report(inp.cfg.name, inp.target.path, inp.data_dir, inp.settings, m, answers, files)
        write_text_atomic(tmp / "report.md", report)
    return inp.out / "report.md"


def exact_scores(graded: dict, texts: list[str]) -> dict[str, dict]:
    """Per graded domain: n and the share of answers with the right final number."""
    out, start = {}, 0
    for name, (questions, expected) in graded.items():
        answers = texts[start : start + len(questions)]
        out[name] = {"n": len(questions), "accuracy": exact_accuracy(answers, expected)}
        start += len(questions)
    return out


# ----------------------------------------------------------------------------- the run
def log(msg: str) -> None:
    print(f"[eval] {msg}", file=sys.stderr)


def run(inp: Inputs) -> Path:
    s, cfg = inp.settings, inp.cfg
    timings, clock = {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now

    rows = [{**r, "kind": "harmful"} for r in inp.harmful] + [{**r, "kind": "benign"} for r in inp.benign]
    prompts = [r["prompt"] for r in rows]
    graded = graded_domains(inp.test["domain"])
    exact_prompts = [p for questions, _ in graded.values() for p in questions]
    backend = generation_backend(inp)
    texts = None
    if backend == "vllm":  # before the model loads in transformers: one copy in memory at a time
        log(f"generating {len(prompts) + len(exact_prompts)} answers with vLLM")
        with open_engine(inp.target.folder, "vllm", cfg.runtime) as engine:
            ask = lambda ps, k: engine_answers(engine, [[{"role": "user", "content": p}] for p in ps], k)  # noqa: E731
            texts = ask(prompts, s.max_new_tokens)
            exact_texts = ask(exact_prompts, EXACT_TOKENS) if exact_prompts else []
        lap("generate_s")
    loaded = load_merged(inp)
    lap("load_s")
    if texts is None:
        log(f"generating {len(prompts) + len(exact_prompts)} answers with {backend}")
        rt = cfg.runtime
        kind = "vllm" if backend == "vllm in memory" else "transformers"
        with contextlib.closing(Generation(kind, cfg.base, loaded.device, rt.trust_remote_code)) as gen:
            ask = lambda ps, k: gen.answers(loaded.model, loaded.tokenizer, ps, k, s.batch_size)  # noqa: E731
            texts = ask(prompts, s.max_new_tokens)
            exact_texts = ask(exact_prompts, EXACT_TOKENS) if exact_prompts else []
        lap("generate_s")
    n_h = len(inp.harmful)
    verdicts, judge_name = judge_harmful(inp, prompts[:n_h], texts[:n_h])
    verdicts += RefusalJudge().judge(prompts[n_h:], texts[n_h:])
    lap("judge_s")
    answers = [
        {**r, "answer": t, "refused": v.refusal, "verdict": v.label, "reason": v.reason}
        for r, t, v in zip(rows, texts, verdicts)
    ]
    log("scoring test losses")
    d = cfg.data
    losses = make_scorer(cfg, loaded.tokenizer, inp.test, loaded.device).losses(loaded.model, progress=True)
    mcq = {
        name: mcq_scores(
            qs,
            *option_logprobs(loaded.model, loaded.tokenizer, qs, d.max_length, d.batch_tokens, loaded.device),
        )
        for name, qs in inp.mcq.items()
    }
    lm = (
        run_lm_eval(
            s.lm_eval,
            loaded.model,
            loaded.tokenizer,
            loaded.device,
            inp.target.folder,
            dtype_name(cfg.runtime.dtype, loaded.device),
        )
        if s.lm_eval.tasks
        else None
    )
    lap("domain_s")
    if loaded.ctx is not None:
        log("MergeAlign analysis")
    result = analyse(inp, loaded) if loaded.ctx is not None else None
    lap("analysis_s")
    generation = {
        "vllm": "vLLM on the model folder",
        "vllm in memory": "vLLM, its weights replaced by the merge rebuilt in memory (no merged/ folder)",
    }.get(backend, "transformers")
    if backend == "transformers" and inp.target.folder is None:
        generation += " on the merge rebuilt in memory (the run folder has no merged/)"
    metrics = {
        "model": {
            "path": str(inp.target.path),
            "folder": str(inp.target.folder) if inp.target.folder else None,
            "run_dir": str(inp.target.run_dir) if inp.target.run_dir else None,
            "weights": loaded.how,
            "generation": generation,
        },
        "config": cfg.name,
        "data_dir": str(inp.data_dir),
        "settings": s.model_dump(),
        "safety": {"judge": judge_name, **refusal_summary(answers[:n_h], verdicts[:n_h])},
        "over_refusal": refusal_summary(answers[n_h:], verdicts[n_h:], answered=True) if inp.benign else None,
        "suites": {name: suite_figures(name, answers, judge_name) for name in s.suites},
        "domain": {
            "domain_test_loss": losses["domain"],
            "alignment_test_loss": losses["alignment"],
            "mcq": mcq,
            "exact": exact_scores(graded, exact_texts),
            "lm_eval": lm,
        },
        "analysis": result,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "versions": versions(),
    }
    return write_outputs(inp, metrics, answers)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m eval.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="merged model folder, or run folder of optimize.search")
    p.add_argument("--config", help="run config (default: the run folder's run.yaml)")
    p.add_set_flag("eval.max_new_tokens=64")
    p.add_argument("--out", help="output folder (default: <run>/eval or runs/eval/<model name>)")
    p.add_argument("--backend", choices=("auto", "vllm", "transformers"), help="generation backend")
    p.add_argument("--max-new-tokens", type=int, help="tokens generated per answer (default 128)")
    p.add_argument("--prompts", action="append", help="extra harmful prompt file (JSONL/CSV); repeatable")
    p.add_argument("--mcq", action="append", help="multiple-choice JSONL file; repeatable")
    p.add_argument(
        "--suites",
        type=lambda v: [t for t in v.split(",") if t],
        help=f"external prompt suites, comma-separated (known: {', '.join(SUITES)})",
    )
    p.add_argument(
        "--tasks", type=lambda v: [t for t in v.split(",") if t], help="lm-eval tasks, comma-separated"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: run(load_inputs(build_parser().parse_args(argv))))


if __name__ == "__main__":
    sys.exit(main())
