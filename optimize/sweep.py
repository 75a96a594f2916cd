"""`python -m optimize.sweep --config X --grid search.alpha=0.1,0.3,1 merge.method=ties,dare_ties`:
a sweep over the search's own settings.

Every point of the grid (the product of the `--grid` keys' values) is a search of its own
(`optimize.search.run`) in its own run folder `<out>/<label>` and its own study `<name>[<label>]`,
on the config's data (`data.dir`, else what synth wrote in the config's run folder), all in one
Optuna storage (default: SQLite `<out>/sweep.db`; `--storage postgresql://...` or a journal file
lets many workers share the sweep: each runs the same command and takes the trials still missing,
point by point). Running the command again resumes every unfinished point. Points
that differ only in how candidates are scored or sampled (alpha, beta, sampler, seed, ...) reuse
the loaded models.

The summary (`sweep.md`, `sweep.json`, `sweep.png`: L_align against L_domain on the search splits,
one labelled point per grid point) is rewritten atomically after every point, from the points'
own best.yaml. Choose among the points on the search-split columns; the test-split columns are
shown beside them to judge over-fitting, not to pick.
"""

from __future__ import annotations

import csv
import gc
import itertools
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from core.cli import ArgumentParser, run_cli
from core.config import clip, load_yaml_text, parse_sets
from core.errors import ConfigError, OutputError, UserError
from core.files import write_text_atomic
from eval import plots
from optimize.compare import for_variant
from optimize.config import Config, load_config
from optimize.context import Context, check_inputs, prepare, scored_sets
from optimize.report import load_best
from optimize.search import overrides, run
from optimize.storage import claim_and_open, sqlite_url
from optimize.workers import RESTORED

# Search keys that change how candidates are sampled or scored, not what is loaded: points that
# differ only in these share one context (the models stay in memory). Not init_weight (the space's
# initial point), and the sampler only between non-grid samplers (grid has its own densities).
SCORING_KEYS = {
    "alpha",
    "beta",
    "n_trials",
    "sampler",
    "objective",
    "score",
    "seed",
    "pruner",
    "verify",
    "targets",
    "gradient",
    "pareto_rule",
    "timeout_s",
    "enqueue_initial",
}


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """`KEY=V1,V2,...` -> {KEY: [V1, V2, ...]}; each value is read as YAML (`search.grid=[0.5,1],[1]`
    is two lists)."""
    grid = {}
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not re.fullmatch(r"[\w-]+(\.[\w-]+)*", key) or not text.strip():
            raise ConfigError(
                f"--grid {clip(item, 80)}: expected KEY=V1,V2,... with a dotted key, e.g. "
                "--grid search.alpha=0.1,0.3,1"
            )
        try:
            values = load_yaml_text(f"[{text}]", f"--grid {clip(key, 60)}")  # 1e-3 is a number, as in --set
            json.dumps(values, default=str)  # a YAML alias inside itself (`&a [*a]`) is circular
        except (yaml.YAMLError, ValueError):
            raise ConfigError(
                f"--grid {clip(item, 80)}: the values are not a comma-separated list of plain values"
            ) from None
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice; list all its values in one --grid")
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
            raise ConfigError(f"--grid {clip(item, 80)}: a value is listed twice")
        grid[key] = values
    if not grid:
        raise ConfigError("--grid: give at least one KEY=V1,V2,... (e.g. --grid search.alpha=0.1,0.3,1)")
    return grid


def label_of(point: dict[str, Any]) -> str:
    """A point's folder and study label: `alpha=0.1,method=ties` (last part of each key)."""

    def show(v) -> str:
        return v if isinstance(v, str) else json.dumps(v, separators=(",", ":"), default=str)

    text = ",".join(f"{k.rsplit('.', 1)[-1]}={show(v)}" for k, v in point.items())
    return re.sub(r"[^\w.=,:+-]", "_", text)[:120]


def points_of(path: str, grid: dict[str, list], sets: dict, out: Path) -> list[tuple[dict, Config]]:
    """Every grid point's config, all validated before any model loads."""
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    labels = [label_of(p) for p in points]
    if len({label.casefold() for label in labels}) != len(labels):  # one folder on a case-blind disk
        raise ConfigError("--grid: two points get the same label; use values that differ in their text")
    configs = []
    base = load_config(path, sets)
    for point, label in zip(points, labels):
        fixed = {"out": str(out / label), "study_name": f"{base.name}[{label}]"}
        if base.data.dir is None and "data.dir" not in point:  # the config's own run folder's data
            fixed["data.dir"] = str(base.data_dir)
        if base.tracking.dir is None:  # trackio keeps its first folder for the whole process
            fixed["tracking.dir"] = str(out / "trackio")
        try:
            configs.append((point, load_config(path, sets | point | fixed)))
        except UserError as err:
            raise type(err)(f"sweep point {label}: {err}") from None
    # points that load the same models run one after another (they share one context)
    return sorted(configs, key=lambda pc: json.dumps(loaded_part(pc[1]), sort_keys=True))


def loaded_part(cfg: Config) -> dict:
    """What a context depends on: the config without its scoring keys, names and places."""
    raw = cfg.model_dump(mode="json", exclude={"name", "out", "study_name", "storage", "heartbeat_s"})
    raw["search"] = {k: v for k, v in raw["search"].items() if k not in SCORING_KEYS}
    raw["search"]["grid_densities"] = cfg.search.sampler == "grid"
    return raw


def reusable(ctx: Context | None, cfg: Config) -> bool:
    """Whether `cfg` can run on the previous point's context: the same models and space, and the
    sets it scores already loaded."""
    return (
        ctx is not None
        and loaded_part(ctx.cfg) == loaded_part(cfg)
        and all(k in ctx.rows for k in scored_sets(cfg.search))
        and ("helpfulness" in ctx.rows or not cfg.search.verify.top_k)
    )


def summary_row(point: dict, cfg: Config) -> dict:
    row = {"point": label_of(point), **point}
    try:
        best = load_best(cfg.run_dir)
        with open(cfg.run_dir / "trials.csv", newline="") as f:
            finished = sum(
                r["state"] in ("COMPLETE", "PRUNED") and not r.get(f"user_attrs_{RESTORED}")
                for r in csv.DictReader(f)
            )
    except (OutputError, OSError, KeyError, csv.Error):
        return row | {"status": "not finished"}
    n = cfg.search.n_trials
    chosen = next((v for v in best.get("verified") or [] if v.get("chosen")), {})
    return row | {
        "status": "done" if finished >= n else f"interrupted ({finished}/{n} trials)",
        "trial": best["trial"],
        **{k: v for k, v in best["scores"].items()},
        **{
            f"verified_{k}": chosen[k]
            for k in ("harmful_refused", "benign_refused", "meets_targets")
            if k in chosen
        },
    }


def write_summary(out: Path, rows: list[dict], grid: dict) -> Path:
    write_text_atomic(out / "sweep.json", json.dumps(rows, indent=1, default=str) + "\n")
    done = [r for r in rows if r["status"] == "done"]
    if done:
        plots.labeled_points(
            {r["point"]: (r["domain_loss_search"], r["alignment_loss_search"]) for r in done},
            out / "sweep.png",
            xlabel="L_domain, search split (lower: more expertise)",
            ylabel="L_align, search split (lower: safer)",
            title=f"Sweep over {', '.join(grid)}: safety vs expertise (search splits)",
        )
    columns = ["point", "status", "trial", "objective"]
    columns += sorted({k for r in done for k in r if k.endswith("_search") or k.startswith("verified_")})
    columns += sorted({k for r in done for k in r if k.endswith("_test")})

    def cell(v):
        if isinstance(v, bool):
            return "yes" if v else "no"
        return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = [
        f"# Sweep over {', '.join(f'`{k}`' for k in grid)}",
        "",
        "Each point is a search of its own (its report in `<point>/report.md`). Choose on the search "
        "columns (`*_search`, `verified_*`: the search splits); the `*_test` columns show how well "
        "that choice holds on the held-out test splits.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows),
        "",
    ]
    if done:
        lines.append("![sweep](sweep.png)\n")
    return write_text_atomic(out / "sweep.md", "\n".join(lines))


def sweep(path: str, grid: dict[str, list], sets: dict, out: Path | None, storage: str | None) -> Path:
    base = load_config(path, sets)
    out = Path(out or f"runs/{base.name}-sweep")
    configs = points_of(path, grid, sets, out)
    for point, cfg in configs:  # paths and data of every point, before any model loads
        try:
            check_inputs(cfg, memory=False)
        except UserError as err:
            raise type(err)(f"sweep point {label_of(point)}: {err}") from None
    storage = storage or base.storage or sqlite_url(out / "sweep.db")
    claim_and_open(out, storage, base.heartbeat_s)  # an unreachable server fails before models load
    rows = [summary_row(p, c) for p, c in configs]
    ctx = None
    for i, (point, cfg) in enumerate(configs):
        print(f"[sweep] point {i + 1}/{len(configs)}: {label_of(point)}", file=sys.stderr)
        if reusable(ctx, cfg):
            ctx = for_variant(ctx, cfg)
        else:
            if ctx is not None:  # the previous point's models leave memory before the next ones load
                ctx.generation.close()
            ctx = None
            gc.collect()
            ctx = prepare(cfg, check_inputs(cfg))
        try:
            run(cfg, storage, ctx, reraise_interrupt=True)
        finally:  # also when interrupted: the summary shows the points finished so far
            rows[i] = summary_row(point, cfg)
            write_summary(out, rows, grid)
    ctx.generation.close()
    return out / "sweep.md"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m optimize.sweep",
        description="Run one search per point of a grid of config values (each its own resumable "
        "study in one storage) and write a summary table and plot.",
    )
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument(
        "--grid",
        nargs="+",
        required=True,
        metavar="KEY=V1,V2",
        help="config keys and their values, e.g. --grid search.alpha=0.1,0.3,1 merge.method=ties,dare_ties "
        "(every combination is a point; values are YAML)",
    )
    p.add_argument("--n-trials", type=int, help="finished trials wanted per point")
    p.add_argument("--out", help="sweep folder (default: runs/<name>-sweep); point P runs in <out>/P")
    p.add_argument(
        "--storage",
        help="Optuna storage URL for every point's study (default: sqlite <out>/sweep.db); "
        "postgresql://... or a journal file lets many workers share the sweep",
    )
    p.add_set_flag("search.n_trials=12", " at every point")
    return p


def main(argv: list[str] | None = None) -> int:
    def work() -> Path:
        args = build_parser().parse_args(argv)
        grid = parse_grid(args.grid)
        sets = parse_sets(args.set) | overrides(n_trials=args.n_trials)
        clash = sorted(set(grid) & (set(sets) | {"out", "study_name", "storage"}))
        if clash:
            raise ConfigError(
                f"{', '.join(clash)}: set by --grid and also by --set/--n-trials or by the sweep "
                "itself (out, study_name, storage); give each key once"
            )
        return sweep(args.config, grid, sets, args.out, args.storage)

    return run_cli(work, "the summary shows the finished points: run the same command again to resume")


if __name__ == "__main__":
    sys.exit(main())
