"""The rows of an ablation (`optimize.ablate`): how each contender is picked on the search
splits, and how every contender is measured on the test splits. Results are cached by content
in the run folder, so a rerun skips finished work."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
from tqdm.auto import tqdm

from core.files import write_text_atomic
from optimize.ablate_config import Ablation
from optimize.compare import DOMAIN_ONLY, PAPER_OBJECTIVE, cocktail, evaluate, variant
from optimize.config import Config
from optimize.context import Context, load_data, model_fingerprints, scored_sets
from optimize.methods import Candidate, DareTies, Linear, MergeAlign, MergeMethod, Slerp, Ties
from optimize.objective import describe, describe_weighted, weighted_loss
from optimize.registry import MERGE_METHODS
from optimize.report import load_best
from optimize.search import run
from optimize.storage import open_storage
from optimize.study import ranked
from optimize.workers import FINISHED, n_finished


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
    weights = model_fingerprints(cfg)  # a model retrained at the same path invalidates the cache
    return _digest(
        [cfg.model_dump(mode="json", include=set(keep)), weights, abl.evaluation.model_dump(), rows, test]
    )


def key(kind: str, method: MergeMethod, c: Candidate) -> str:
    arrays = [None if a is None else np.round(a, 6).tolist() for a in (c.weight, c.density, c.t)]
    m = method
    return f"{kind}:{_digest([m.name, m.normalize, m.lambda_, m.seed, m.roles, arrays])}"


def search_losses(ctx: Context, cache: Cache, method: MergeMethod, c: Candidate) -> dict[str, list[float]]:
    """Per-example response CE of the merge on the search splits."""

    def compute():
        with ctx.merger.applied(c, method) as model:
            return ctx.scorer.example_losses(model)

    return cache.get(key("search", method, c), compute)


def grid_row(ctx, cache, label, method, points: dict[str, Candidate]) -> tuple[Row, list[dict]]:
    """The grid point with the lowest objective (the search config's weighted loss) on the
    search splits."""
    search = ctx.cfg.search
    records = []
    for setting, c in tqdm(points.items(), desc=label, unit="point", leave=False):
        losses = {k: float(np.mean(v)) for k, v in search_losses(ctx, cache, method, c).items()}
        records.append(
            {
                "merge": method.name,
                "setting": setting,
                "alignment_loss_search": losses["alignment"],
                "domain_loss_search": losses["domain"],
                "objective_search": weighted_loss(search, losses),
            }
        )
    best = min(records, key=lambda r: r["objective_search"])
    for r in records:
        r["chosen"] = r is best
    row = Row(
        label,
        method.name,
        f"grid search ({len(points)} points)",
        f"{' ∪ '.join(SPLIT_NAMES[k] for k in scored_sets(search))} search splits: lowest "
        + describe_weighted(search),
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
        c = ctx.merger.uniform(w)
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
    """LM-Cocktail (docs/method.md §6.3) on D_domain, then on D_domain u D_safety."""
    names = [s.name for s in ctx.cfg.sources]
    rows = []
    for data, sets in (("D_domain", ["domain"]), ("D_domain ∪ D_safety", ["domain", "alignment"])):
        cand, ce = cocktail(ctx, sets, temperature, lambda m, c: search_losses(ctx, cache, m, c))
        lam = cand.weight[:, 0]
        rows.append(
            Row(
                f"LM-Cocktail, {data}",
                "linear",
                f"LM-Cocktail (T = {temperature:g})",
                f"{data} search split{'s' if len(sets) > 1 else ''}: CE of each source",
                ", ".join(f"{n} {w:.3f}" for n, w in zip(names, lam)),
                Linear(normalize=True),
                cand,
                {"ce": dict(zip(names, ce.tolist())), "weights": dict(zip(names, lam.tolist()))},
            )
        )
    return rows


class Stopped(RuntimeError):
    """A study ended before its trial budget (timed out, or failing trials; Ctrl-C goes on up to run_cli)."""


def run_study(cfg: Config, storage: str, ctx: Context) -> optuna.Study:
    run(cfg, storage=storage, ctx=ctx, reraise_interrupt=True)  # Ctrl-C: exit 130 (run_cli)
    study = optuna.load_study(study_name=cfg.study_name, storage=open_storage(storage, 0))
    if n_finished(study) < cfg.search.n_trials:
        raise Stopped(
            f"study {cfg.study_name!r} has {n_finished(study)}/{cfg.search.n_trials} finished "
            f"trials (see {cfg.run_dir / 'trials.csv'}); run the same command again to resume"
        )
    return study


def search_rows(ctx: Context, abl: Ablation, storage: str) -> list[Row]:
    """The domain-only (EvoMM) search, the paper's safety-aware objective (L_align + alpha
    L_domain, lowest value) and this project's (the search config's: + beta L_help, verified
    pick) when it differs, with the same budget."""
    cfg, n = ctx.cfg, abl.searches.n_trials
    searches = [(variant(cfg, "search_domain", {"n_trials": n, **DOMAIN_ONLY}), "domain-only search (EvoMM)")]
    if cfg.search.beta or cfg.search.verify.top_k:  # the config's objective is not the paper's
        searches.append((variant(cfg, "search_paper", {"n_trials": n, **PAPER_OBJECTIVE}), PAPER_ROW))
    searches.append((variant(cfg, "search_safety", {"n_trials": n}), SAFE_ROW))
    how = f"Optuna {cfg.search.sampler}, {n} trials"
    rows = []
    for c, label in searches:
        sets = scored_sets(c.search)
        run_study(
            c, storage, dataclasses.replace(ctx, cfg=c, scorer=ctx.scorer_for({k: ctx.rows[k] for k in sets}))
        )
        best = load_best(c.run_dir)
        s = {k.removesuffix("_loss_search"): v for k, v in best["scores"].items() if k.endswith("_search")}
        picked_on = f"{' ∪ '.join(SPLIT_NAMES[k] for k in sets)} search splits: {describe(c.search)}"
        if c.search.verify.top_k:
            picked_on += ", verified by generation on the search prompts"
            if c.search.verify.restore_steps:
                picked_on += " (restored toward the alignment source when none met the targets)"
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
                    "alignment_loss_search": s["alignment"],
                    "domain_loss_search": s["domain"],
                    "objective_search": weighted_loss(cfg.search, s),
                },
            )
        )
    return rows


SAFE_ROW = "safety-aware search (alignmerge)"
PAPER_ROW = "safety-aware search, paper objective"
SPLIT_NAMES = {"alignment": "D_safety", "domain": "D_domain", "helpfulness": "D_help"}
TEST_SETS = {"alignment": "alignment", "domain": "domain", "helpfulness": "benign"}  # load_test's keys


def best_so_far(study: optuna.Study, n: int) -> list[float]:
    """Best objective after each of the first n finished trials (nan before the first value)."""
    finished = sorted(study.get_trials(deepcopy=False, states=FINISHED), key=lambda t: t.number)[:n]
    out, best = [], np.inf
    for t in finished:
        if t.state == optuna.trial.TrialState.COMPLETE:
            best = min(best, t.value)
        out.append(best if np.isfinite(best) else np.nan)
    return out


def compare_samplers(
    ctx: Context, abl: Ablation, storage: str, test: dict[str, list[dict]]
) -> dict[str, dict]:
    """{sampler: {seed: best-so-far curve}, ...} plus seconds per study, one study per (sampler, seed),
    and the objective of each study's pick on the test splits (many coefficients can over-fit the
    search split: the two side by side show it)."""
    s = abl.samplers
    subset = {k: v for k, v in (("n_alignment", s.n_alignment), ("n_domain", s.n_domain)) if v}
    data_cfg = variant(ctx.cfg, "", data=subset)
    rows = load_data(data_cfg)
    scorer = ctx.scorer_for({k: rows[k] for k in scored_sets(data_cfg.search)})
    test_scorer = ctx.scorer_for({k: test[TEST_SETS[k]] for k in scored_sets(data_cfg.search)})
    out = {}
    for name in s.names:
        if name == "gradient" and MERGE_METHODS[ctx.cfg.merge.method].grad_field is None:
            print(
                f"[ablate] samplers: no gradient run, {ctx.cfg.merge.method} has no gradient", file=sys.stderr
            )
            continue
        for seed in s.seeds[:1] if name == "gradient" else s.seeds:  # deterministic: one run
            # the samplers are compared on the objective alone: no verified pick
            search = {"sampler": name, "seed": seed, "n_trials": s.n_trials, "verify": {"top_k": 0}}
            c = variant(data_cfg, f"samplers/{name}_seed{seed}", search, plots=False)
            study = run_study(c, storage, dataclasses.replace(ctx, cfg=c, rows=rows, scorer=scorer))
            used = sorted(study.get_trials(deepcopy=False, states=FINISHED), key=lambda t: t.number)
            seconds = sum(  # with the gradient's minibatch steps, which run between its trials
                (t.datetime_complete - t.datetime_start).total_seconds() + t.user_attrs.get("steps_s", 0)
                for t in used[: s.n_trials]
            )
            pick = ranked(study, c.search)[0]
            test_losses = test_scorer.losses(ctx.merger.apply(ctx.space.decode(pick.params)))
            out.setdefault(name, {})[seed] = {
                "curve": best_so_far(study, s.n_trials),
                "seconds": seconds,
                "test_objective": weighted_loss(c.search, test_losses),
            }
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
                "std": float(np.std(final, ddof=1)) if len(final) > 1 else None,
                "min": float(np.min(final)),
                "max": float(np.max(final)),
                "seconds": float(np.mean([run["seconds"] for run in seeds.values()])),
                "test_mean": float(np.mean([run["test_objective"] for run in seeds.values()])),
            }
        )
    return sorted(out, key=lambda r: r["mean"])


def evaluate_rows(
    ctx: Context, cache: Cache, contenders: list[Row], test: dict, max_new_tokens: int, suites=None
) -> dict:
    scorer = ctx.scorer_for({k: test[k] for k in ("alignment", "domain")})
    harmful, benign = [r["prompt"] for r in test["alignment"]], [r["prompt"] for r in test["benign"]]
    results = {}
    for row in contenders:
        t0 = time.perf_counter()
        results[row.label] = cache.get(
            key("test", row.method, row.candidate),
            lambda row=row: evaluate(
                ctx, row.method, row.candidate, scorer, harmful, benign, max_new_tokens, suites
            ),
        )
        r = results[row.label]
        print(
            f"[ablate] {row.label}: refused {r['refused_harmful']:.0%}, L_domain {r['domain_loss']:.4f}, "
            f"over-refusal {r['refused_benign']:.0%} ({time.perf_counter() - t0:.0f} s)",
            file=sys.stderr,
        )
    return results
