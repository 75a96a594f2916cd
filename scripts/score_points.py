"""Score hand-picked merges of a config's sources on its search data, each domain apart: is a goal
reachable by any merge of the family at all, before searching for one?

    python scripts/score_points.py --config configs/demo.yaml --set data.dir=runs/demo/data \\
        --point aligned=1,math=1 --point aligned=1,medical=0.5,math=1 [--density 1]

A point gives each named source one weight in every layer (unnamed sources: 0), merged by the
config's method (TIES in the demo) with every density `--density`. Prints, per point, the mean
response loss on the alignment, helpfulness and each domain's rows of the domain split (by its
`domain` or `category` column) and the mean refusal-opening mass on the harmful and benign prompts
(`eval.loss`), as a Markdown table.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np

from core.cli import run_cli
from core.config import parse_sets
from core.errors import ConfigError
from eval.loss import means
from optimize.config import load_config
from optimize.context import prepare
from optimize.registry import MERGE_METHODS


def parse_point(text: str, names: list[str]) -> dict[str, float]:
    point = {}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if name not in names:
            raise ConfigError(
                f"--point {text!r}: no source {name!r} in the config (sources: {', '.join(names)})"
            )
        try:
            point[name] = float(value)
        except ValueError:
            raise ConfigError(
                f"--point {text!r}: {value!r} is not a number (write source=weight,...)"
            ) from None
        if not math.isfinite(point[name]) or abs(point[name]) > 1e4:
            raise ConfigError(f"--point {text!r}: weights must be finite and within +-1e4")
    return point


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python scripts/score_points.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--point", action="append", required=True, help="source=weight,... (repeatable)")
    ap.add_argument("--density", type=float, default=1.0, help="every source's density (TIES, DARE)")
    args = ap.parse_args(argv)
    if not 0 < args.density <= 1:
        raise ConfigError(f"--density {args.density}: a density is a share of the entries kept, in (0, 1]")
    cfg = load_config(args.config, parse_sets(args.set))
    if "weight" not in MERGE_METHODS[cfg.merge.method].searched:
        raise ConfigError(
            f"merge.method {cfg.merge.method} interpolates between sources, with no weight per source to "
            "pick: score points of a method with weights (--set merge.method=ties, task_arithmetic, ...)"
        )
    names = [s.name for s in cfg.sources]
    points = [parse_point(p, names) for p in args.point]
    ctx = prepare(cfg)
    domains: dict[str, list[dict]] = {}
    for row in ctx.rows["domain"]:
        domains.setdefault(str(row.get("domain") or row.get("category") or "domain"), []).append(row)
    sets = {k: ctx.rows[k] for k in ("alignment", "helpfulness") if k in ctx.rows}
    scorer = ctx.scorer_for(sets | {f"domain: {d}": rows for d, rows in domains.items()})
    table: list[str] = []
    for point in points:
        candidate = ctx.merger.uniform(0)
        for i, name in enumerate(names):
            candidate.weight[i] = point.get(name, 0.0)
        candidate.density = np.full_like(candidate.weight, args.density)
        losses, masses = (means(x) for x in scorer.score(ctx.merger.apply(candidate)))
        cells = {f"L {k}": f"{v:.3f}" for k, v in losses.items()}
        cells |= {f"refusal mass {k}": f"{v:.3f}" for k, v in masses.items()}
        if not table:
            table += ["| point | " + " | ".join(cells) + " |", "|---|" + "---|" * len(cells)]
        label = ", ".join(f"{k} {v:g}" for k, v in point.items()) or "base"
        table.append(f"| {label} | " + " | ".join(cells.values()) + " |")
        print(table[-1], file=sys.stderr, flush=True)  # progress: a point takes seconds to minutes
    ctx.generation.close()
    return "\n".join(table)


if __name__ == "__main__":
    sys.exit(run_cli(main))
