"""`python -m optimize.ablate --config configs/ablations.yaml [--out DIR] [--quick]`: the paper's
Table 1 (Hammoud et al., arXiv 2406.14563; docs/method.md §6) on any world, with one loaded
context and the same data for every row.

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

Measured for each row on the test splits (optimize.compare.evaluate): share of test harmful prompts
refused, domain and alignment test loss, share of benign prompts wrongly refused (greedy answers,
rule-based refusal judge). Studies live in the run folder's SQLite and every other result in its
cache.json, so running the same command again skips finished work.
"""

from __future__ import annotations

import sys
import time
from contextlib import closing, contextmanager
from pathlib import Path

import optuna

from core.cli import ArgumentParser, command_line, run_cli
from core.files import claim_run_dir
from eval.suites import suite_prompts
from optimize.ablate_config import Ablation, load_ablation, load_test, search_config_path
from optimize.ablate_report import Report
from optimize.ablate_rows import (
    Cache,
    Row,
    Stopped,
    cocktail_rows,
    compare_samplers,
    evaluate_rows,
    grid_rows,
    search_rows,
    signature,
)
from optimize.compare import references
from optimize.config import Config
from optimize.context import check_setup, load_data, prepare
from optimize.merge import PLAIN
from optimize.storage import claim_and_open
from optimize.study import default_storage
from synth.generate import for_run


@contextmanager
def timed(timings: dict, name: str):
    t0 = time.perf_counter()
    yield
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0


def ablate(abl: Ablation, cfg: Config, rows: dict, test: dict) -> Path:
    timings: dict[str, float] = {}
    started = time.perf_counter()
    suites = suite_prompts(abl.evaluation.suites, abl.evaluation.limit)
    claim_run_dir(cfg.run_dir)
    storage = cfg.storage or default_storage(cfg)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with timed(timings, "load"):
        ctx = prepare(cfg, rows)
    with closing(ctx.generation):  # the vLLM engine, closed on Ctrl-C or an error too
        cache = Cache(cfg.run_dir / "cache.json", signature(abl, cfg, rows, test))
        contenders, grid = [], []
        if "references" in abl.rows:
            contenders += [
                Row(k, "—", "model alone", "—", "—", m, c) for k, (m, c) in references(ctx).items()
            ]
        if "task_arithmetic" in abl.rows:
            w = abl.uniform_weight
            contenders.append(
                Row(
                    "task arithmetic, uniform",
                    PLAIN.name,
                    "uniform weights",
                    "—",
                    f"w={w:g}",
                    PLAIN,
                    ctx.merger.uniform(w),
                )
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
            results = evaluate_rows(ctx, cache, contenders, test, abl.evaluation.max_new_tokens, suites)
        report = Report(abl, cfg, storage, contenders, results, grid, test, timings, started)
        report.write()
        if "samplers" in abl.rows:
            with timed(timings, "samplers"):
                report.samplers = compare_samplers(ctx, abl, storage, test)
            report.write()
        return cfg.run_dir / "ablation.md"


# ----------------------------------------------------------------------------- CLI
def build_parser() -> ArgumentParser:
    ap = ArgumentParser(prog="python -m optimize.ablate", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--config", default="configs/ablations.yaml", help="ablation config (configs/ablations.yaml)"
    )
    ap.add_argument("--out", help="run folder (default: runs/<name>)")
    ap.add_argument("--quick", action="store_true", help="the config's CI-sized `quick` budget")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()

    def work():
        args = ap.parse_args(argv)
        abl, cfg = load_ablation(args.config, args.quick, args.out)
        check_setup(cfg)  # before synth: the models, that they fit, and a storage server answers
        claim_and_open(cfg.run_dir, cfg.storage, cfg.heartbeat_s)
        command = command_line("optimize.ablate", argv)
        for_run(search_config_path(abl, Path(args.config).parent), cfg.data_dir, cfg.run_dir, command)
        rows = load_data(cfg)  # the rest was checked before synth (check_setup)
        return ablate(abl, cfg, rows, load_test(cfg, abl.evaluation.limit))

    try:
        return run_cli(work)
    except Stopped as err:
        print(f"stopped: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
