"""The end of a search: pick the model, score it, write every output of the run folder; and
`load_best`, the one reader of the chosen merge (best.yaml) for every later command."""

from __future__ import annotations

import importlib.metadata
import io
import platform
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import yaml

from core.cli import redact
from core.errors import OutputError
from core.files import write_text_atomic, write_yaml_atomic
from core.models import save_model_atomic
from eval import plots
from eval.loss import Scorer
from optimize.context import load_test_data
from optimize.export import (
    MERGEKIT_CONFIG,
    coefficient_table,
    merged_mergekit_config,
    mergekit_config,
    mergekit_header,
    mergekit_paths,
    model_card,
)
from optimize.merge import PLAIN
from optimize.methods import Candidate
from optimize.objective import describe
from optimize.study import choose, metric_names, trials_frame
from optimize.verify import verified_pick
from optimize.workers import searched_trials, written_stamp

COMPLETE = optuna.trial.TrialState.COMPLETE


BEST = "best.yaml"


def load_best(run_dir: str | Path) -> dict:
    """The chosen merge of a finished search: best.yaml (method, scores, coefficients, params),
    refused when it is not from the same write of the outputs as run.yaml (written last)."""
    path = Path(run_dir) / BEST
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise OutputError(
            f"{path} not found: the search of {run_dir} has not finished; run "
            "`python -m optimize.search --config ...` again (it resumes)"
        ) from None
    except (OSError, ValueError, yaml.YAMLError) as err:  # ValueError: not UTF-8 text
        raise OutputError(f"{path} cannot be read ({err}); run the search again to rewrite it") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("params"), dict):
        raise OutputError(f"{path} has no `params` mapping; run the search again to rewrite it")
    if doc.get("outputs_stamp") != written_stamp(Path(run_dir)):
        raise OutputError(incomplete(run_dir))
    return doc


def incomplete(run_dir: str | Path) -> str:
    return (
        f"the outputs in {run_dir} are not one complete set (their writing was interrupted, or they "
        "come from different runs): run the same search command again, it rewrites them from the study"
    )


def reference_losses(ctx, scorer: Scorer) -> dict[str, dict[str, float]]:
    """Base and each source alone, on the same sets: the numbers a merge is judged against."""
    names = [s.name for s in ctx.cfg.sources]
    return {
        "base" if i is None else f"source {names[i]}": scorer.losses(ctx.merger.apply(c, PLAIN))
        for i, c in ctx.merger.references()
    }


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("alignmerge", "torch", "transformers", "peft", "optuna", "datasets"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _fmt(x) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def write_outputs(
    ctx, study: optuna.Study, storage: str, interrupted: bool = False, stamp: str | None = None
) -> Path:
    cfg, run_dir = ctx.cfg, ctx.cfg.run_dir
    t0 = time.perf_counter()
    best, front, rule = choose(study, cfg)
    best, rule, verified = verified_pick(ctx, study, best, rule)
    candidate = ctx.space.decode(best.params)

    # Scores of the chosen model on both search sets (and the test splits, when present).
    search_scorer = ctx.scorer_for(ctx.rows)
    test_rows = load_test_data(cfg) if cfg.output.test_splits else {}
    test_scorer = ctx.scorer_for(test_rows) if test_rows else None
    refs = reference_losses(ctx, search_scorer) if cfg.output.references else {}
    refs_test = reference_losses(ctx, test_scorer) if test_scorer and cfg.output.references else {}
    if cfg.output.mergekit:  # before the candidate goes in: a GGUF base is saved from memory
        write_mergekit_yaml(ctx, candidate)
    model = ctx.merger.apply(candidate)
    search_losses = search_scorer.losses(model, progress=True)
    test_losses = test_scorer.losses(model, progress=True) if test_scorer else {}
    scores = {f"{k}_loss_search": round(v, 6) for k, v in search_losses.items()}
    scores.update({f"{k}_loss_test": round(v, 6) for k, v in test_losses.items()})
    if len(study.directions) == 1:
        scores["objective"] = round(best.value, 6)

    trials = study.trials
    complete = [t for t in trials if t.state == COMPLETE]
    best_doc = {
        "trial": best.number,
        "method": cfg.merge.method,
        "normalize": cfg.normalize,
        "lambda": cfg.merge.lambda_,
        "objective": cfg.search.objective,
        "score": cfg.search.score,
        "alpha": cfg.search.alpha,
        "beta": cfg.search.beta,
        "chosen_by": rule,
        "verified": verified,
        "scores": scores,
        "base": cfg.base,
        "sources": [{"name": s.name, "path": s.path, "role": s.role} for s in cfg.sources],
        "coefficients": coefficient_table(cfg, ctx.base.groups, candidate),
        "params": {k: float(v) for k, v in best.params.items()},
        "outputs_stamp": stamp,  # the same in run.yaml and merged/: the outputs are one set
    }
    write_yaml_atomic(run_dir / BEST, best_doc)

    df = trials_frame(study)
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    write_text_atomic(run_dir / "trials.csv", buf.getvalue())

    plot_files = []
    if cfg.output.plots and complete:
        plot_files = _plots(ctx, study, best, front, candidate, refs)

    if cfg.output.save_model:
        files = {"README.md": model_card(cfg, best_doc, [])}
        if cfg.output.mergekit:
            names = [n for n, _, _ in ctx.merger.params]
            recipe = merged_mergekit_config(cfg, ctx.base.groups, names, candidate, run_dir / "merged")
            files[MERGEKIT_CONFIG] = recipe
        save_model_atomic(model, ctx.base.tokenizer, run_dir / "merged", files, stamp)

    report = _report(ctx, study, best, front, rule, scores, refs, refs_test, plot_files, storage, interrupted)
    report += verification_section(verified, rule)
    write_text_atomic(run_dir / "report.md", report)
    ctx.timings["outputs_s"] = time.perf_counter() - t0
    # run.yaml last: its stamp is what readers trust (a kill before this leaves the old one, which
    # no longer matches the new best.yaml, so the half-written set is never read as whole)
    write_yaml_atomic(
        run_dir / "run.yaml",
        {
            "config": cfg.model_dump(by_alias=True, mode="json") | {"storage": redact(cfg.storage)},
            "storage": redact(storage),
            "study_name": study.study_name,
            "seeds": {"sampler": cfg.search.seed, "dare_masks": cfg.merge.seed},
            "versions": versions(),
            "timings_s": {k: round(v, 2) for k, v in ctx.timings.items()},
            "scoring_tokens": {**search_scorer.n_tokens, "padded_total": search_scorer.padded_tokens},
            "outputs_stamp": stamp,  # what these outputs were made of (config + finished trials)
        },
    )
    return run_dir / "report.md"


def verification_section(rows: list[dict], rule: str) -> str:
    """The verified candidates' judged figures beside their objective (docs/method.md §4.1)."""
    if not rows:
        return ""
    lines = [
        "## Verified by generation (search splits)",
        "",
        f"Chosen by {rule}. Refusal mass: the probability of a refusal's first token at the first "
        "answer position (mean over the prompts the trials score), from the trial's own forward pass.",
        "",
        "| candidate | objective | refusal mass, benign | refusal mass, harmful | harmful refused | "
        "benign wrongly refused | meets targets |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        obj = r.get("objective", "")
        obj = ", ".join(f"{v:.4f}" for v in obj) if isinstance(obj, list) else _fmt(obj)
        name = f"trial {r['trial']}" if isinstance(r["trial"], int) else r["trial"]
        meets = {True: "yes", False: "no", None: ""}[r.get("meets_targets")]
        lines.append(
            f"| {name}{' (chosen)' if r.get('chosen') else ''} | {obj} | "
            f"{_fmt(r.get('refusal_mass_helpfulness', ''))} | {_fmt(r.get('refusal_mass_alignment', ''))} | "
            f"{r['harmful_refused']:.0%} | {r['benign_refused']:.0%} | {meets} |"
        )
    return "\n".join(lines + [""]) + "\n"


def write_mergekit_yaml(ctx, candidate: Candidate) -> Path:
    cfg, run_dir = ctx.cfg, ctx.cfg.run_dir
    merger = ctx.merger
    base_model = lambda: merger.apply(merger.uniform(0), PLAIN)  # noqa: E731  the base, as held
    held = (base_model, next(merger.model.parameters()).dtype, ctx.base.tokenizer)
    base_path, source_paths = mergekit_paths(cfg, run_dir, base_in_memory=held)
    names = [n for n, _, _ in merger.params]
    mk = mergekit_config(cfg, ctx.base.groups, names, candidate, base_path, source_paths)
    text = mergekit_header(cfg, "mergekit.yaml") + yaml.safe_dump(mk, sort_keys=False)
    return write_text_atomic(run_dir / "mergekit.yaml", text)


def _plots(ctx, study, best, front, candidate, refs) -> list[Path]:
    cfg, pdir = ctx.cfg, ctx.cfg.run_dir / "plots"
    complete = [t for t in study.trials if t.state == COMPLETE]
    files = []
    if len(study.directions) == 1:
        searched = searched_trials(study, (COMPLETE,))  # the search's history: not a restored point
        files.append(
            plots.history([t.number for t in searched], [t.value for t in searched], pdir / "history.png")
        )
    with_both = [t for t in complete if "alignment_loss" in t.user_attrs and "domain_loss" in t.user_attrs]
    if with_both:
        index = {t.number: i for i, t in enumerate(with_both)}
        files.append(
            plots.loss_scatter(
                [t.user_attrs["alignment_loss"] for t in with_both],
                [t.user_attrs["domain_loss"] for t in with_both],
                pdir / ("pareto.png" if front else "losses.png"),
                front=[index[t.number] for t in front if t.number in index],
                chosen=index.get(best.number),
                references={k: (v["alignment"], v["domain"]) for k, v in refs.items()},
                title="Pareto front: alignment vs domain loss" if front else "Alignment vs domain loss",
            )
        )
    names = [s.name for s in cfg.sources]
    profiles = {}
    if candidate.t is not None:
        profiles["t"] = {"t": list(candidate.t)}
    if candidate.weight is not None:
        profiles["weight"] = {n: list(candidate.weight[i]) for i, n in enumerate(names)}
    if candidate.density is not None:
        profiles["density"] = {n: list(candidate.density[i]) for i, n in enumerate(names)}
    files.append(plots.coefficient_profile(list(ctx.base.groups.names), profiles, pdir / "coefficients.png"))
    return files


def _report(ctx, study, best, front, rule, scores, refs, refs_test, plot_files, storage, interrupted) -> str:
    cfg = ctx.cfg
    states = {}
    for t in searched_trials(study):
        states[t.state.name] = states.get(t.state.name, 0) + 1
    restored = len(study.trials) - sum(states.values())
    lines = [f"# alignmerge report: {cfg.name}", ""]
    if interrupted:
        lines += [
            "> The search was interrupted; this report covers the trials finished so far. "
            "Run the same command again to resume.",
            "",
        ]
    lines += [
        f"- Method: `{cfg.merge.method}` (normalize {cfg.normalize}, lambda {cfg.merge.lambda_}), "
        f"{len(cfg.sources)} sources on base `{cfg.base}`",
        f"- Search: sampler `{cfg.search.sampler}`, objective `{cfg.search.objective}` "
        f"({describe(cfg.search)}), "
        f"{ctx.space.n_params} parameters: {ctx.space.describe()}",
        f"- Trials: {', '.join(f'{v} {k.lower()}' for k, v in sorted(states.items()))} "
        f"(target {cfg.search.n_trials})"
        + (
            f", and {restored} restored point{'s' * (restored > 1)} (search.verify.restore_steps)"
            if restored
            else ""
        )
        + f"; study `{study.study_name}` in `{redact(storage)}`",
        f"- Chosen: trial {best.number}, by {rule}",
        "",
        "## Losses (mean response-token cross-entropy; lower is better)",
        "",
    ]
    sets = tuple(ctx.rows)  # alignment, domain[, helpfulness]
    header = "| model | " + " | ".join(f"L_{s} search" for s in sets)
    if refs_test:
        header += " | " + " | ".join(f"L_{s} test" for s in sets)
    lines += [header + " |", "|" + "---|" * (header.count("|"))]

    def row(name, search, test):
        cells = [_fmt(search.get(s, "")) for s in sets]
        if refs_test:
            cells += [_fmt(test.get(s, "")) for s in sets]
        return f"| {name} | " + " | ".join(cells) + " |"

    for name, v in refs.items():
        lines.append(row(name, v, refs_test.get(name, {})))
    lines.append(
        row(
            f"**merged (trial {best.number})**",
            {s: scores.get(f"{s}_loss_search") for s in sets},
            {s: scores.get(f"{s}_loss_test") for s in sets},
        )
    )
    lines.append("")
    if front:
        names = study.metric_names or metric_names(cfg.search)
        lines += ["## Pareto front", "", f"| trial | {' | '.join(names)} |", "|---|" + "---|" * len(names)]
        for t in sorted(front, key=lambda t: t.values[1]):
            mark = " (chosen)" if t.number == best.number else ""
            lines.append(f"| {t.number}{mark} | " + " | ".join(f"{v:.4f}" for v in t.values) + " |")
        lines.append("")
    lines += [
        "## Files",
        "",
        "- [best.yaml](best.yaml): method, per-layer coefficients, densities, scores",
        "- [mergekit.yaml](mergekit.yaml): `mergekit-yaml mergekit.yaml OUT` from this folder "
        "rebuilds the merged model",
        "- [trials.csv](trials.csv): every trial, its parameters and losses",
        "- [run.yaml](run.yaml): resolved config, seeds, package versions, timings",
    ]
    if cfg.output.save_model:
        lines.append(
            "- [merged/](merged/): the merged model (safetensors, tokenizer, chat template, model card)"
        )
    lines.append("")
    for f in plot_files:
        lines += [f"![{f.stem}](plots/{f.name})", ""]
    timings = ", ".join(f"{k} {v:.1f}" for k, v in ctx.timings.items())
    lines += ["## Timings (s)", "", timings, ""]
    complete = [t for t in study.trials if t.state == COMPLETE and "score_s" in t.user_attrs]
    if complete:
        merge_s = np.median([t.user_attrs["merge_s"] for t in complete])
        score_s = np.median([t.user_attrs["score_s"] for t in complete])
        lines += [f"Median per trial: merge {merge_s:.3f} s, scoring {score_s:.2f} s.", ""]
    lines += [
        "Losses are a proxy for behaviour. Check generation-based safety, over-refusal and "
        "domain quality with `python -m eval.run` before trusting the merged model.",
        "",
    ]
    return "\n".join(lines)
