"""Time to a good merge: the gradient search beside Optuna's black-box samplers (issue: exact
gradients for per-layer coefficients; docs/method.md §5.5).

    python bench/bench_gradient.py --config configs/demo.yaml --data runs/demo/data \
        --n 8 --trials 48 --seeds 0 1 2 --samplers tpe cmaes gp random --minibatches 1 4 \
        --parametrizations gradient:3 layerwise --json bench/results/gradient.json --plot docs/gradient.png

One process loads the models once; every (parametrization, sampler, seed) is its own study of
`--trials` trials in a temporary SQLite file (no pruning, so a black-box trial is one merge and one
forward pass; no verified pick). The gradient search runs once per parametrization and
`--minibatches` value ("gradient", "gradient-mb4"), after the black-box studies and for as long
as their median study took (search.timeout_s; at most `--trials` trials): it starts from the
initial point and does not depend on the seed. Recorded per study: the best objective so far
(search split) after each trial against wall-clock seconds and against forward-pass equivalents
(seconds / the median black-box trial's seconds in this run), and the final pick's figures on
the test splits: its objective and losses on the first `--n-test` rows of alignment_test,
domain_test and benign, and the shares of all the harmful and benign test prompts it refuses
(greedy answers, rule-based judge). Only the search splits are searched on. A rerun with the
same --json measures only the studies missing from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.files import write_text_atomic  # noqa: E402
from eval.data import load_pairs  # noqa: E402
from optimize.compare import evaluate, variant  # noqa: E402
from optimize.config import load_config  # noqa: E402
from optimize.context import TEST_SPLITS, check_inputs, prepare, scored_sets  # noqa: E402
from optimize.objective import objective_value  # noqa: E402
from optimize.search import run  # noqa: E402
from optimize.space import SearchSpace  # noqa: E402
from optimize.storage import sqlite_url  # noqa: E402

COMPLETE = optuna.trial.TrialState.COMPLETE


def study_curve(study: optuna.Study) -> list[dict]:
    """Per finished trial: seconds since the study's first trial started, best value so far."""
    trials = sorted(study.trials, key=lambda t: t.number)
    start, best, out = trials[0].datetime_start, np.inf, []
    for t in trials:
        if t.state == COMPLETE:
            best = min(best, t.value)
        out.append(
            {"trial": t.number, "seconds": (t.datetime_complete - start).total_seconds(), "best": best}
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--data", default="runs/demo/data", help="search data written by synth (the demo's)")
    ap.add_argument("--n", type=int, default=6, help="examples per search set")
    ap.add_argument("--n-test", type=int, default=40, help="rows per test split for the picks' test losses")
    ap.add_argument("--trials", type=int, default=48)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--samplers", nargs="+", default=["tpe", "cmaes", "gp", "random"])
    ap.add_argument("--parametrizations", nargs="+", default=["gradient:3", "layerwise"])
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--minibatches", type=int, nargs="+", default=[1, 4], help="gradient variants")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument(
        "--hybrid",
        type=int,
        default=0,
        metavar="K",
        help="also tpe for K trials, then the gradient search (last --minibatches value) on that study",
    )
    ap.add_argument("--json", default="bench/results/gradient.json")
    ap.add_argument("--plot", default="docs/gradient.png")
    ap.add_argument("--summary", metavar="JSON", help="only print the tables of a finished run's JSON")
    args = ap.parse_args()
    if args.summary:
        print(summary(json.loads(Path(args.summary).read_text())))
        return
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    tmp = Path(tempfile.mkdtemp(prefix="bench_gradient_"))
    n = {"n_alignment": args.n, "n_domain": args.n, "n_helpfulness": args.n}
    cfg = load_config(
        args.config, {"out": str(tmp), "data.dir": args.data, **{f"data.{k}": v for k, v in n.items()}}
    )
    ctx = prepare(cfg, check_inputs(cfg))
    test_rows = {k: load_pairs(cfg.test_dir, split, args.n_test) for k, split in TEST_SPLITS.items()}
    test_scorer = ctx.scorer_for({k: test_rows[k] for k in scored_sets(cfg.search)})
    storage = sqlite_url(tmp / "bench.db")
    quiet = {
        "plots": False,
        "save_model": False,
        "references": False,
        "test_splits": False,
        "mergekit": False,
    }
    harmful = [r["prompt"] for r in load_pairs(cfg.test_dir, "alignment_test")]
    benign = [r["prompt"] for r in load_pairs(cfg.test_dir, "benign")]
    settings = {
        "config": args.config,
        "data": args.data,
        "n": args.n,
        "n_test": args.n_test,
        "trials": args.trials,
    }
    previous = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else {}
    if previous.get("settings", settings) != settings:
        sys.exit(f"{args.json} was measured with {previous['settings']}, not {settings}: use another --json")
    earlier = previous.get("studies", [])
    studies = list(earlier)  # kept: a rerun adds the studies it is asked for and does not have
    done = {(s["parametrization"], s["sampler"], s["seed"]) for s in studies}
    lr = "" if args.lr == 0.05 else f"-lr{args.lr:g}"  # the default step size is left out of the names
    gradients = {("gradient" if m == 1 else f"gradient-mb{m}") + lr: m for m in args.minibatches}
    hybrids = (
        {f"tpe{args.hybrid}+gradient-mb{m}{lr}": m for m in args.minibatches[-1:]} if args.hybrid else {}
    )
    for param in args.parametrizations:
        for sampler in [*args.samplers, *gradients, *hybrids]:
            for seed in args.seeds[:1] if sampler in gradients else args.seeds:
                if (param, sampler, seed) in done:
                    continue
                common = {
                    "seed": seed,
                    "n_trials": args.trials,
                    "parametrization": param,
                    "pruner": "none",
                    "verify": {"top_k": 0},
                    "gradient": {"lr": args.lr, "minibatches": {**gradients, **hybrids}.get(sampler, 1)},
                }
                black_box = [  # seconds from a study's first trial's start to its last one's end
                    r["curve"][-1]["seconds"]
                    for r in studies
                    if r["parametrization"] == param and r["sampler"] in args.samplers
                ]
                budget = statistics.median(black_box) if black_box else None  # a black-box study's time
                if sampler in hybrids:  # tpe picks densities and a start, the descent refines on one study
                    phases = [{"sampler": "tpe", "n_trials": args.hybrid}, {"sampler": "gradient"}]
                else:
                    phases = [{"sampler": "gradient" if sampler in gradients else sampler}]
                t0 = time.perf_counter()
                for phase in phases:
                    search = common | phase
                    if search["sampler"] == "gradient" and budget:
                        search["timeout_s"] = max(1.0, budget - (time.perf_counter() - t0))
                    c = variant(cfg, f"{param.replace(':', '')}-{sampler}-{seed}", search, **quiet)
                    space = SearchSpace(c, ctx.base.groups, ctx.merger.method.searched)
                    run(c, storage=storage, ctx=dataclasses.replace(ctx, cfg=c, space=space))
                wall = time.perf_counter() - t0
                study = optuna.load_study(study_name=c.study_name, storage=storage)
                best = study.best_trial
                pick = evaluate(
                    ctx, None, space.decode(best.params), test_scorer, harmful, benign, args.max_new_tokens
                )
                losses = {
                    k.removesuffix("_loss"): v
                    for k, v in pick.items()
                    if isinstance(v, float) and not k.startswith("refused")
                }
                test = objective_value(c.search, losses)
                studies.append(
                    {
                        "parametrization": param,
                        "sampler": sampler,
                        "seed": seed,
                        "wall_s": wall,
                        "curve": study_curve(study),
                        "best_search": best.value,
                        "best_trial": best.number,
                        "test_objective": test,
                        "test_losses": losses,
                        "refused_harmful": pick["refused_harmful"],
                        "refused_benign": pick["refused_benign"],
                        "trial_s": statistics.median(
                            (t.datetime_complete - t.datetime_start).total_seconds() for t in study.trials
                        ),
                    }
                )
                print(
                    f"{param} {sampler} seed {seed}: best {best.value:.4f} (trial {best.number}), "
                    f"test {test:.4f}, refused {pick['refused_harmful']:.0%} / {pick['refused_benign']:.0%}, "
                    f"{wall:.0f} s",
                    file=sys.stderr,
                )
                write(args, studies)
    ctx.generation.close()
    write(args, studies)


def write(args, studies: list[dict]) -> None:
    """The results so far (written after every study, so a stopped run keeps what it measured)."""
    black_box = [s["trial_s"] for s in studies if "gradient" not in s["sampler"]]
    forward_s = statistics.median(black_box) if black_box else None
    for s in studies:
        for point in s["curve"]:
            point["forward_equivalents"] = point["seconds"] / forward_s if forward_s else None
    path = Path(args.json)
    earlier = json.loads(path.read_text()).get("commands", []) if path.exists() else []
    command = "python " + " ".join(sys.argv)
    doc = {
        "commands": earlier + [command] * (command not in earlier),  # a rerun adds studies: every run's
        "settings": {
            "config": args.config,
            "data": args.data,
            "n": args.n,
            "n_test": args.n_test,
            "trials": args.trials,
        },
        "examples_per_set": args.n,
        "test_rows_per_split": args.n_test,
        "median_black_box_trial_s": forward_s,
        "studies": studies,
    }
    write_text_atomic(path, json.dumps(doc, indent=1))
    if args.plot and forward_s:
        plot(doc, Path(args.plot))


def summary(doc: dict) -> str:
    """Markdown: per (parametrization, sampler) the best search objective after 24 and 48 trials,
    the pick's test objective, L_domain and refusal shares (mean, min-max over seeds), seconds per
    study and per trial (study seconds / trials: a descent's steps between trials included); then
    when each gradient search (each of its runs) first reached each black-box sampler's mean best
    after 48 trials."""
    lines = [
        "| parametrization | sampler | seeds | best after 24 trials | best at the end "
        "| test objective of the pick | its test L_domain | harmful refused | benign wrongly refused "
        "| s per study | s per trial |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def spread(values, fmt="{:.3f}"):
        if len(values) == 1:
            return fmt.format(values[0])
        return f"{fmt.format(statistics.mean(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"

    groups: dict[tuple, list] = {}
    for s in doc["studies"]:
        groups.setdefault((s["parametrization"], s["sampler"]), []).append(s)
    for (param, sampler), runs in groups.items():
        after_24 = [r["curve"][23]["best"] for r in runs if len(r["curve"]) >= 24]
        final = [r["curve"][-1]["best"] for r in runs]
        lines.append(
            f"| {param} | {sampler} | {len(runs)} | {spread(after_24) if after_24 else '–'} | "
            f"{spread(final)} | "
            f"{spread([r['test_objective'] for r in runs])} | "
            f"{spread([r['test_losses']['domain'] for r in runs])} | "
            f"{spread([r['refused_harmful'] for r in runs], '{:.0%}')} | "
            f"{spread([r['refused_benign'] for r in runs], '{:.0%}')} | "
            f"{statistics.median(r['curve'][-1]['seconds'] for r in runs):.0f} | "
            f"{statistics.median(r['curve'][-1]['seconds'] / len(r['curve']) for r in runs):.1f} |"
        )
    lines.append("")
    for (param, sampler), runs in groups.items():
        if "gradient" in sampler:
            continue
        target = statistics.mean(r["curve"][-1]["best"] for r in runs)
        wall = statistics.median(r["curve"][-1]["seconds"] for r in runs)
        for (p, descent_name), descent in groups.items():
            if p != param or "gradient" not in descent_name:
                continue
            reached = [next((pt for pt in r["curve"] if pt["best"] <= target), None) for r in descent]
            times = [
                f"after {pt['seconds']:.0f} s = {pt['seconds'] / wall:.0%} (trial {pt['trial'] + 1})"
                if pt
                else "never"
                for pt in reached
            ]
            lines.append(
                f"- {param}: {sampler}'s mean best after 48 trials ({target:.3f}, {wall:.0f} s per study): "
                f"{descent_name} reached it {', '.join(times)}"
            )
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = sorted({s["parametrization"] for s in doc["studies"]})
    fig, axes = plt.subplots(len(params), 2, figsize=(11, 4 * len(params)), squeeze=False)
    colors = {}
    for row, param in zip(axes, params):
        for s in (s for s in doc["studies"] if s["parametrization"] == param):
            color = colors.setdefault(s["sampler"], f"C{len(colors)}")
            label = (
                s["sampler"]
                if s["seed"] == min(x["seed"] for x in doc["studies"] if x["sampler"] == s["sampler"])
                else None
            )
            for ax, key in zip(row, ("seconds", "forward_equivalents")):
                ax.plot(
                    [p[key] for p in s["curve"]],
                    [p["best"] for p in s["curve"]],
                    color=color,
                    label=label,
                    alpha=0.8,
                )
        for ax, key in zip(row, ("wall-clock seconds", "forward-pass equivalents")):
            ax.set_xlabel(key)
            ax.set_ylabel("best objective so far (search split)")
            ax.set_title(param)
            ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    tmp.replace(path)


if __name__ == "__main__":
    main()
