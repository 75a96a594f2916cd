"""`python -m optimize.ablate --config configs/ablations.yaml [--out DIR] [--quick]`: the paper's
Table 1 (papers.md §1.8) on any world, with one loaded context and the same data for every row.

Every row is *picked* on the search splits and *measured* on the test splits:

  references        the base and each source alone
  task_arithmetic   theta = base + w sum_t tau_t with one uniform w: nothing is picked
  ties, dare_ties   grid over w x d (one weight and one density for every source, the paper's
                    grid); the point with the lowest L_align + alpha L_domain on the search splits
  slerp             grid over t (two sources; t = 0 is the first source), picked the same way
  mergealign        grid over lambda: theta = base + lambda tau_domain + (1 - lambda) tau_align
  lm_cocktail       theta = sum_t lambda_t theta_t, lambda = softmax(-CE / T) over the sources,
                    CE_t = source t's mean response CE on D_domain, then on D_domain u D_safety
  searches          the search config's Optuna search on the domain loss alone (the paper's EvoMM
                    baseline) and on L_align + alpha L_domain (alignmerge)
  samplers          each sampler at the same trial budget over several seeds: the best objective
                    after N trials (mean and spread) and best-so-far curves

Measured for each row on the test splits (optimize.demo.evaluate): share of test harmful prompts
refused, domain and alignment test loss, share of benign prompts wrongly refused (greedy answers,
rule-based refusal judge). Studies live in the run folder's SQLite and every other result in its
cache.json, so running the same command again skips finished work.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import optuna
import yaml
from pydantic import Field
from scipy.special import softmax

from eval import plots
from eval.data import load_pairs
from eval.loss import Scorer
from optimize.cli import run_cli
from optimize.config import Config, ConfigError, Strict, load_config, validate, validate_config
from optimize.demo import domain_only, evaluate, merged, references, uniform, variant
from optimize.export import write_text_atomic
from optimize.methods import Candidate, DareTies, Linear, MergeAlign, MergeMethod, Slerp, TaskArithmetic, Ties
from optimize.search import (
    FINISHED,
    Context,
    check_inputs,
    default_storage,
    load_data,
    n_finished,
    prepare,
    run,
)
from optimize.storage import open_storage, redact

ROWS = (
    "references",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "slerp",
    "mergealign",
    "lm_cocktail",
    "searches",
    "samplers",
)
COMPARED = ("tpe", "cmaes", "gp", "random", "nsga2")
Share = Annotated[float, Field(gt=0, le=1)]
Unit = Annotated[float, Field(ge=0, le=1)]


# ----------------------------------------------------------------------------- config
class Grids(Strict):
    weights: list[float] = Field([0.25, 0.5, 1.0], min_length=1)  # TIES / DARE-TIES, N = 2
    densities: list[Share] = Field([0.25, 0.5, 1.0], min_length=1)
    normalize: bool = False  # TIES / DARE-TIES; the paper's genome used false
    slerp_t: list[Unit] = Field([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], min_length=1)
    mergealign_lambda: list[Unit] = Field([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], min_length=1)


class Searches(Strict):
    n_trials: int = Field(16, ge=1)  # each of the two searches


class Samplers(Strict):
    names: list[Literal[COMPARED]] = Field(["tpe", "cmaes", "random", "gp"], min_length=1)
    seeds: list[int] = Field([0, 1, 2], min_length=3)
    n_trials: int = Field(16, ge=2)  # per study
    # Scored on the first N search examples of each set (null: as many as the searches).
    n_alignment: int | None = Field(12, ge=1)
    n_domain: int | None = Field(12, ge=1)


class Evaluation(Strict):
    max_new_tokens: int = Field(32, ge=1)
    limit: int | None = Field(None, ge=1)  # first N rows of each test split and of benign


class SearchData(Strict):
    # Search-split examples for every row (null: the search config's data.n_alignment / n_domain).
    n_alignment: int | None = Field(None, ge=1)
    n_domain: int | None = Field(None, ge=1)


class Ablation(Strict):
    name: str = Field("ablation", pattern=r"^[A-Za-z0-9_.-]+$")
    out: str | None = None  # run folder; null -> runs/<name>
    search_config: str  # base, sources, data, method, search space; relative to this file
    rows: list[Literal[ROWS]] = Field(list(ROWS), min_length=1)
    uniform_weight: float = 1.0  # task arithmetic row
    cocktail_temperature: float = Field(1.0, gt=0)  # the paper's script: 1.0 (LM-Cocktail's: 5.0)
    grids: Grids = Grids()
    searches: Searches = Searches()
    samplers: Samplers = Samplers()
    evaluation: Evaluation = Evaluation()
    data: SearchData = SearchData()
    quick: dict[str, Any] | None = None  # --quick: these keys replace the ones above


def _overlay(raw: dict, over: dict) -> dict:
    out = dict(raw)
    for k, v in over.items():
        out[k] = _overlay(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_ablation(path: str | Path, quick: bool = False, out: str | None = None) -> tuple[Ablation, Config]:
    """The validated ablation config and the search config it runs on; no model is loaded."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) if path.is_file() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: not found, or its top level is not a mapping of keys")
    abl = validate(Ablation, raw, str(path))
    fast = validate(Ablation, _overlay(raw, abl.quick or {}), f"{path} with its quick section")
    abl = fast if quick else abl
    abl = abl.model_copy(update={"out": out}) if out else abl
    return abl, search_config(abl, path.parent)


def search_config(abl: Ablation, folder: Path) -> Config:
    """The search config moved into the ablation's run folder, with the safety-aware objective."""
    path = Path(abl.search_config)
    path = path if path.is_absolute() else folder / path
    cfg = load_config(path)
    raw = cfg.model_dump(by_alias=True)
    raw.update(name=abl.name, out=abl.out or f"runs/{abl.name}", study_name=None)
    raw["search"].update(objective="weighted", score="both")
    raw["data"].update({k: v for k, v in abl.data.model_dump().items() if v is not None})
    raw["output"].update(save_model=False, mergekit=False, references=False, test_splits=False)
    cfg = validate_config(raw, f"{path} (the ablation's search config)")
    if "slerp" in abl.rows and len(cfg.sources) != 2:
        raise ConfigError(f"rows: slerp needs exactly 2 sources, {path} has {len(cfg.sources)}")
    if "mergealign" in abl.rows and sorted(s.role for s in cfg.sources) != ["alignment", "domain"]:
        raise ConfigError(f"rows: mergealign needs one alignment and one domain source ({path})")
    return cfg


# ----------------------------------------------------------------------------- rows
@dataclass
class Row:
    label: str
    merge: str
    weighting: str
    picked_on: str  # the data the choice was made on
    setting: str
    method: MergeMethod
    candidate: Candidate
    details: dict = field(default_factory=dict)  # search-split losses, CE and weights, ...


class Cache:
    """Results computed by an earlier run with the same models, data and settings."""

    def __init__(self, path: Path, signature: str):
        self.path, self.signature = path, signature
        old = json.loads(path.read_text()) if path.exists() else {}
        self.entries = old.get("entries", {}) if old.get("signature") == signature else {}

    def get(self, key: str, compute):
        if key not in self.entries:
            self.entries[key] = compute()
            write_text_atomic(self.path, json.dumps({"signature": self.signature, "entries": self.entries}))
        return self.entries[key]


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def signature(abl: Ablation, cfg: Config, rows: dict, test: dict) -> str:
    keep = ("base", "sources", "data", "runtime")
    return _digest([cfg.model_dump(mode="json", include=set(keep)), abl.evaluation.model_dump(), rows, test])


def key(kind: str, method: MergeMethod, c: Candidate) -> str:
    arrays = [None if a is None else np.round(a, 6).tolist() for a in (c.weight, c.density, c.t)]
    m = method
    return f"{kind}:{_digest([m.name, m.normalize, m.lambda_, m.seed, m.roles, arrays])}"


def search_losses(ctx: Context, cache: Cache, method: MergeMethod, c: Candidate) -> dict[str, list[float]]:
    """Per-example response CE of the merge on the search splits."""

    def compute():
        with merged(ctx, method, c) as model:
            return ctx.scorer.example_losses(model)

    return cache.get(key("search", method, c), compute)


def grid_row(ctx, cache, label, method, points: dict[str, Candidate]) -> tuple[Row, list[dict]]:
    """The grid point with the lowest L_align + alpha L_domain on the search splits."""
    alpha = ctx.cfg.search.alpha
    records = []
    for setting, c in points.items():
        losses = {k: float(np.mean(v)) for k, v in search_losses(ctx, cache, method, c).items()}
        a, d = losses["alignment"], losses["domain"]
        records.append(
            {
                "merge": method.name,
                "setting": setting,
                "alignment_loss_search": a,
                "domain_loss_search": d,
                "objective_search": a + alpha * d,
            }
        )
    best = min(records, key=lambda r: r["objective_search"])
    for r in records:
        r["chosen"] = r is best
    row = Row(
        label,
        method.name,
        f"grid search ({len(points)} points)",
        f"D_safety ∪ D_domain search splits: lowest L_align + {alpha} L_domain",
        best["setting"],
        method,
        points[best["setting"]],
        {k: best[k] for k in ("alignment_loss_search", "domain_loss_search", "objective_search")},
    )
    return row, records


def grid_rows(ctx: Context, cache: Cache, abl: Ablation) -> tuple[list[Row], list[dict]]:
    g, grids, cfg = ctx.base.groups.n, abl.grids, ctx.cfg
    rows, records = [], []

    def sparse(w, d):
        c = uniform(ctx, w)
        c.density = np.full_like(c.weight, d)
        return c

    wd = {f"w={w:g}, d={d:g}": sparse(w, d) for w in grids.weights for d in grids.densities}
    kw = {"normalize": grids.normalize, "seed": cfg.merge.seed, "density_levels": tuple(grids.densities)}
    todo = {
        "ties": ("TIES, grid", Ties(**kw), wd),
        "dare_ties": ("DARE-TIES, grid", DareTies(**kw), wd),
        "slerp": (
            "SLERP, grid",
            Slerp(normalize=False),
            {f"t={t:g}": Candidate(t=np.full(g, t)) for t in grids.slerp_t},
        ),
        "mergealign": (
            "MergeAlign, grid",
            MergeAlign(normalize=False, roles=tuple(s.role for s in cfg.sources)),
            {f"lambda={x:g}": Candidate(t=np.full(g, x)) for x in grids.mergealign_lambda},
        ),
    }
    for name, (label, method, points) in todo.items():
        if name in abl.rows:
            row, recs = grid_row(ctx, cache, label, method, points)
            rows.append(row)
            records += recs
    return rows, records


def cocktail_rows(ctx: Context, cache: Cache, temperature: float) -> list[Row]:
    """LM-Cocktail (papers.md Eq. 3): lambda = softmax(-CE / T), theta = sum_t lambda_t theta_t."""
    names = [s.name for s in ctx.cfg.sources]
    alone = list(references(ctx).values())[1:]  # each source alone, in config order
    per_source = [search_losses(ctx, cache, method, c) for method, c in alone]
    rows = []
    for data, sets in (("D_domain", ["domain"]), ("D_domain ∪ D_safety", ["domain", "alignment"])):
        ce = np.array([np.mean([x for s in sets for x in losses[s]]) for losses in per_source])
        lam = softmax(-ce / temperature)
        rows.append(
            Row(
                f"LM-Cocktail, {data}",
                "linear",
                f"LM-Cocktail (T = {temperature:g})",
                f"{data} search split{'s' if len(sets) > 1 else ''}: CE of each source",
                ", ".join(f"{n} {w:.3f}" for n, w in zip(names, lam)),
                Linear(normalize=True),
                Candidate(weight=np.repeat(lam[:, None], ctx.base.groups.n, axis=1)),
                {"ce": dict(zip(names, ce.tolist())), "weights": dict(zip(names, lam.tolist()))},
            )
        )
    return rows


class Stopped(RuntimeError):
    """A study ended before its trial budget (interrupted, timed out, or failing trials)."""


def run_study(cfg: Config, storage: str, ctx: Context) -> optuna.Study:
    run(cfg, storage=storage, ctx=ctx)
    study = optuna.load_study(study_name=cfg.study_name, storage=open_storage(storage, 0))
    if n_finished(study) < cfg.search.n_trials:
        raise Stopped(
            f"study {cfg.study_name!r} has {n_finished(study)}/{cfg.search.n_trials} finished "
            f"trials (see {cfg.run_dir / 'trials.csv'}); run the same command again to resume"
        )
    return study


def search_rows(ctx: Context, abl: Ablation, storage: str) -> list[Row]:
    """The domain-only (EvoMM) and the safety-aware (alignmerge) searches, same budget."""
    cfg, n = ctx.cfg, abl.searches.n_trials
    dom = variant(cfg, "search_domain", {"n_trials": n, "score": "domain"})
    safe = variant(cfg, "search_safety", {"n_trials": n})
    run_study(dom, storage, domain_only(ctx, dom))
    run_study(safe, storage, dataclasses.replace(ctx, cfg=safe))
    how = f"Optuna {cfg.search.sampler}, {n} trials"
    rows = []
    for c, label, picked_on in (
        (dom, "domain-only search (EvoMM)", "D_domain search split: L_domain"),
        (
            safe,
            "safety-aware search (alignmerge)",
            f"D_safety ∪ D_domain search splits: L_align + {cfg.search.alpha} L_domain",
        ),
    ):
        best = yaml.safe_load((c.run_dir / "best.yaml").read_text())
        s = best["scores"]
        rows.append(
            Row(
                label,
                cfg.merge.method,
                how,
                picked_on,
                f"trial {best['trial']}, {ctx.space.n_params} parameters ({cfg.search.parametrization})",
                ctx.merger.method,
                ctx.space.decode(best["params"]),
                {
                    "alignment_loss_search": s["alignment_loss_search"],
                    "domain_loss_search": s["domain_loss_search"],
                    "objective_search": s["alignment_loss_search"]
                    + cfg.search.alpha * s["domain_loss_search"],
                },
            )
        )
    return rows


def best_so_far(study: optuna.Study, n: int) -> list[float]:
    """Best objective after each of the first n finished trials (nan before the first value)."""
    finished = sorted(study.get_trials(deepcopy=False, states=FINISHED), key=lambda t: t.number)[:n]
    out, best = [], np.inf
    for t in finished:
        if t.state == optuna.trial.TrialState.COMPLETE:
            best = min(best, t.value)
        out.append(best if np.isfinite(best) else np.nan)
    return out


def compare_samplers(ctx: Context, abl: Ablation, storage: str) -> dict[str, dict]:
    """{sampler: {seed: best-so-far curve}, ...} plus seconds per study, one study per (sampler, seed)."""
    s = abl.samplers
    subset = {k: v for k, v in (("n_alignment", s.n_alignment), ("n_domain", s.n_domain)) if v}
    data_cfg = variant(ctx.cfg, "", data=subset)
    rows = load_data(data_cfg)
    d = data_cfg.data
    scorer = Scorer(ctx.base.tokenizer, rows, d.max_length, d.batch_tokens, ctx.scorer.device)
    out = {}
    for name in s.names:
        for seed in s.seeds:
            search = {"sampler": name, "seed": seed, "n_trials": s.n_trials}
            c = variant(data_cfg, f"samplers/{name}_seed{seed}", search, plots=False)
            study = run_study(c, storage, dataclasses.replace(ctx, cfg=c, rows=rows, scorer=scorer))
            used = sorted(study.get_trials(deepcopy=False, states=FINISHED), key=lambda t: t.number)
            seconds = sum(
                (t.datetime_complete - t.datetime_start).total_seconds() for t in used[: s.n_trials]
            )
            out.setdefault(name, {})[seed] = {"curve": best_so_far(study, s.n_trials), "seconds": seconds}
    return {"examples": {k: len(v) for k, v in rows.items()}, "studies": out}


def sampler_summary(studies: dict[str, dict]) -> list[dict]:
    """Per sampler, the best objective after the full budget over seeds; best mean first."""
    out = []
    for name, seeds in studies.items():
        final = np.array([run["curve"][-1] for run in seeds.values()])
        out.append(
            {
                "sampler": name,
                "seeds": len(final),
                "mean": float(np.mean(final)),
                "std": float(np.std(final, ddof=1)),
                "min": float(np.min(final)),
                "max": float(np.max(final)),
                "seconds": float(np.mean([run["seconds"] for run in seeds.values()])),
            }
        )
    return sorted(out, key=lambda r: r["mean"])


# ----------------------------------------------------------------------------- run
def load_test(cfg: Config, limit: int | None) -> dict[str, list[dict]]:
    folder = cfg.data_dir
    return {
        "alignment": load_pairs(folder, "alignment_test", limit),
        "domain": load_pairs(folder, "domain_test", limit),
        "benign": load_pairs(folder, "benign", limit),
    }


@contextmanager
def timed(timings: dict, name: str):
    t0 = time.perf_counter()
    yield
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0


def ablate(abl: Ablation, cfg: Config, rows: dict, test: dict) -> Path:
    timings: dict[str, float] = {}
    started = time.perf_counter()
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    storage = cfg.storage or default_storage(cfg)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with timed(timings, "load"):
        ctx = prepare(cfg, rows)
    cache = Cache(cfg.run_dir / "cache.json", signature(abl, cfg, rows, test))
    contenders, grid = [], []
    if "references" in abl.rows:
        contenders += [Row(k, "—", "model alone", "—", "—", m, c) for k, (m, c) in references(ctx).items()]
    if "task_arithmetic" in abl.rows:
        w = abl.uniform_weight
        ta = TaskArithmetic(normalize=False)
        contenders.append(
            Row("task arithmetic, uniform", ta.name, "uniform weights", "—", f"w={w:g}", ta, uniform(ctx, w))
        )
    with timed(timings, "grids"):
        found, grid = grid_rows(ctx, cache, abl)
        contenders += found
    if "lm_cocktail" in abl.rows:
        with timed(timings, "lm_cocktail"):
            contenders += cocktail_rows(ctx, cache, abl.cocktail_temperature)
    if "searches" in abl.rows:
        with timed(timings, "searches"):
            contenders += search_rows(ctx, abl, storage)
    with timed(timings, "evaluation"):
        results = evaluate_rows(ctx, cache, contenders, test, abl.evaluation.max_new_tokens)
    report = Report(abl, cfg, storage, contenders, results, grid, test, timings, started)
    report.write()
    if "samplers" in abl.rows:
        with timed(timings, "samplers"):
            report.samplers = compare_samplers(ctx, abl, storage)
        report.write()
    return cfg.run_dir / "ablation.md"


def evaluate_rows(ctx: Context, cache: Cache, contenders: list[Row], test: dict, max_new_tokens: int) -> dict:
    d = ctx.cfg.data
    sets = {k: test[k] for k in ("alignment", "domain")}
    scorer = Scorer(ctx.base.tokenizer, sets, d.max_length, d.batch_tokens, ctx.scorer.device)
    harmful, benign = [r["prompt"] for r in test["alignment"]], [r["prompt"] for r in test["benign"]]
    results = {}
    for row in contenders:
        t0 = time.perf_counter()
        results[row.label] = cache.get(
            key("test", row.method, row.candidate),
            lambda row=row: evaluate(ctx, row.method, row.candidate, scorer, harmful, benign, max_new_tokens),
        )
        r = results[row.label]
        print(
            f"[ablate] {row.label}: refused {r['refused_harmful']:.0%}, L_domain {r['domain_loss']:.4f}, "
            f"over-refusal {r['refused_benign']:.0%} ({time.perf_counter() - t0:.0f} s)",
            file=sys.stderr,
        )
    return results


# ----------------------------------------------------------------------------- outputs
COLUMNS = [
    "row",
    "merge",
    "weighting",
    "picked_on",
    "setting",
    "alignment_loss_search",
    "domain_loss_search",
    "objective_search",
    "refused_harmful",
    "domain_loss_test",
    "alignment_loss_test",
    "refused_benign",
]
GRID_COLUMNS = [
    "merge",
    "setting",
    "alignment_loss_search",
    "domain_loss_search",
    "objective_search",
    "chosen",
]


def _csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


@dataclass
class Report:
    abl: Ablation
    cfg: Config
    storage: str
    contenders: list[Row]
    results: dict
    grid: list[dict]
    test: dict
    timings: dict
    started: float
    samplers: dict | None = None

    def table(self) -> list[dict]:
        out = []
        for row in self.contenders:
            r = self.results[row.label]
            out.append(
                {
                    "row": row.label,
                    "merge": row.merge,
                    "weighting": row.weighting,
                    "picked_on": row.picked_on,
                    "setting": row.setting,
                    **{k: row.details.get(k, "") for k in COLUMNS[5:8]},
                    "refused_harmful": r["refused_harmful"],
                    "domain_loss_test": r["domain_loss"],
                    "alignment_loss_test": r["alignment_loss"],
                    "refused_benign": r["refused_benign"],
                }
            )
        return out

    def write(self) -> Path:
        run_dir, table = self.cfg.run_dir, self.table()
        write_text_atomic(run_dir / "ablation.csv", _csv(table, COLUMNS))
        if self.grid:
            write_text_atomic(run_dir / "grid.csv", _csv(self.grid, GRID_COLUMNS))
        figures = [
            plots.labeled_points(
                {r["row"]: (r["domain_loss_test"], 100 * r["refused_harmful"]) for r in table},
                run_dir / "plots" / "ablation.png",
                xlabel="domain test loss (lower: more expertise)",
                ylabel="test harmful prompts refused (%)",
                title="Every method on the test splits",
                highlight="safety-aware search (alignmerge)",
            )
        ]
        summary = []
        if self.samplers:
            studies = self.samplers["studies"]
            summary = sampler_summary(studies)
            curves = {name: [run["curve"] for run in seeds.values()] for name, seeds in studies.items()}
            figures.append(plots.best_so_far(curves, run_dir / "plots" / "samplers.png"))
            long = [
                {"sampler": name, "seed": seed, "trial": i + 1, "best_so_far": v}
                for name, seeds in studies.items()
                for seed, run in seeds.items()
                for i, v in enumerate(run["curve"])
            ]
            write_text_atomic(
                run_dir / "samplers.csv", _csv(long, ["sampler", "seed", "trial", "best_so_far"])
            )
        doc = {
            "ablation": self.abl.model_dump(),
            "search_config": self.cfg.model_dump(by_alias=True, mode="json"),
            "rows": [{**t, "details": row.details} for t, row in zip(table, self.contenders)],
            "grid": self.grid,
            "samplers": {"summary": summary, **(self.samplers or {})},
            "timings_s": {k: round(v, 1) for k, v in self.timings.items()},
        }
        write_text_atomic(run_dir / "ablation.json", json.dumps(doc, indent=1))
        return write_text_atomic(run_dir / "ablation.md", self.markdown(table, summary, figures))

    def markdown(self, table: list[dict], summary: list[dict], figures: list[Path]) -> str:
        abl, cfg, s = self.abl, self.cfg, self.cfg.search
        sources = ", ".join(f"`{x.name}` ({x.role})" for x in cfg.sources)
        n = {k: len(v) for k, v in self.test.items()}
        minutes = (time.perf_counter() - self.started) / 60
        lines = [
            f"# Ablation: {abl.name}",
            "",
            f"Base `{cfg.base}`, sources {sources}; search config `{abl.search_config}` (method "
            f"`{cfg.merge.method}`, {cfg.search.parametrization}, alpha {s.alpha}). Every row is "
            "**picked on the search splits** (the column *picked on*) and **measured on the test "
            f"splits**, which no choice ever sees: {n['alignment']} harmful prompts, "
            f"{n['domain']} domain examples, {n['benign']} benign prompts; greedy answers up to "
            f"{abl.evaluation.max_new_tokens} tokens judged by the rule-based refusal judge. "
            f"Run time so far: {minutes:.1f} min.",
            "",
            "| model | merge | task weighting | picked on | chosen setting | harmful refused (test) ↑ "
            "| L_domain test ↓ | L_align test ↓ | benign wrongly refused ↓ |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for t in table:
            lines.append(
                f"| {t['row']} | {t['merge']} | {t['weighting']} | {t['picked_on']} | {t['setting']} | "
                f"{_pct(t['refused_harmful'])} | {t['domain_loss_test']:.4f} | "
                f"{t['alignment_loss_test']:.4f} | {_pct(t['refused_benign'])} |"
            )
        lines += [
            "",
            "Grid rows: the paper reports the grid point with the best *test* accuracy; here the point "
            f"with the lowest L_align + {s.alpha} L_domain on the *search* splits is chosen, then "
            "measured on the test splits. Every grid point with its search-split losses: "
            "[grid.csv](grid.csv). All numbers: [ablation.csv](ablation.csv), "
            "[ablation.json](ablation.json).",
            "",
            f"![methods](plots/{figures[0].name})",
            "",
        ]
        if summary:
            sm = self.samplers
            ex = sm["examples"]
            lines += [
                f"## Samplers: best objective after {abl.samplers.n_trials} trials",
                "",
                f"Objective L_align + {s.alpha} L_domain on the first {ex['alignment']} alignment and "
                f"{ex['domain']} domain search examples, the search space of the search config "
                f"({cfg.search.parametrization}), pruner `{s.pruner}`; seeds {abl.samplers.seeds}. "
                "Lower is better; best mean first.",
                "",
                "| sampler | seeds | mean | std | min | max | time per study (s) |",
                "|---|---|---|---|---|---|---|",
            ]
            for r in summary:
                lines.append(
                    f"| {r['sampler']} | {r['seeds']} | {r['mean']:.4f} | {r['std']:.4f} | "
                    f"{r['min']:.4f} | {r['max']:.4f} | {r['seconds']:.0f} |"
                )
            lines += [
                "",
                f"![best so far](plots/{figures[1].name})",
                "",
                "Best-so-far values per trial: [samplers.csv](samplers.csv). Every study: "
                f"`optuna-dashboard {redact(self.storage)}`.",
                "",
            ]
        timings = ", ".join(f"{k} {v:.0f}" for k, v in self.timings.items())
        lines += ["## Timings (s)", "", timings, ""]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m optimize.ablate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/ablations.yaml")
    ap.add_argument("--out", help="run folder (default: runs/<name>)")
    ap.add_argument("--quick", action="store_true", help="the config's CI-sized `quick` budget")
    args = ap.parse_args(argv)

    def work():
        abl, cfg = load_ablation(args.config, args.quick, args.out)
        rows = check_inputs(cfg)
        return ablate(abl, cfg, rows, load_test(cfg, abl.evaluation.limit))

    try:
        return run_cli(work)
    except Stopped as err:
        print(f"stopped: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
