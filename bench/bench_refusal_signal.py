"""How well the free over-refusal signal predicts the judged refusal rate, over the trials of a study.

    python bench/bench_refusal_signal.py --run runs/demo [more runs] [--max-new-tokens 32]
        [--json bench/results/refusal_signal.json]

Every complete trial of each finished search in `--run` (its run.yaml and study.db) is merged
again and answers the search splits' benign prompts (D_help) and harmful prompts (D_safety)
greedily; the rule-based judge reads the answers. Beside each trial's recorded refusal-opening
masses (`refusal_mass_helpfulness`, `refusal_mass_alignment`, docs/method.md §3) and losses, the
script reports Pearson and Spearman correlations with the judged shares, per run and pooled, and
what the verified pick (optimize/verify.py's rule) would choose with k = 1, 3, 6, 12 candidates.
Only search splits are used.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import optuna
import yaml
from scipy import stats

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.files import write_text_atomic  # noqa: E402
from eval.run_inputs import without_code_permissions  # noqa: E402
from optimize.config import validate_config  # noqa: E402
from optimize.context import check_inputs, prepare  # noqa: E402
from optimize.merge import PLAIN  # noqa: E402
from optimize.storage import sqlite_url  # noqa: E402
from optimize.verify import Bar, judged, pick, shortlist  # noqa: E402
from optimize.workers import searched_trials  # noqa: E402


def correlations(x: list[float], y: list[float]) -> dict:
    return {
        "pearson": float(stats.pearsonr(x, y)[0]),
        "spearman": float(stats.spearmanr(x, y)[0]),
    }


def measure(run_dir: Path, max_new_tokens: int) -> dict:
    run = yaml.safe_load((run_dir / "run.yaml").read_text())
    # a run folder grants no remote code, pickles or lm-eval tasks (eval.run_inputs)
    raw = without_code_permissions(run["config"], run_dir / "run.yaml") | {"storage": None}
    raw["search"]["verify"]["top_k"] = max(1, raw["search"]["verify"]["top_k"])  # loads D_help
    cfg = validate_config(raw)
    ctx = prepare(cfg, check_inputs(cfg))
    url = sqlite_url(run_dir / "study.db")
    study = optuna.load_study(study_name=run["study_name"], storage=url)
    harmful = [r["prompt"] for r in ctx.rows["alignment"]]
    benign = [r["prompt"] for r in ctx.rows["helpfulness"]]
    started = time.perf_counter()
    i = [s.role for s in cfg.sources].index("alignment")
    aligned_h, _ = judged(ctx, dict(ctx.merger.references())[i], PLAIN, harmful, benign, max_new_tokens)
    rows = []
    for t in searched_trials(study, (optuna.trial.TrialState.COMPLETE,)):  # not a restored point
        h, b = judged(ctx, ctx.space.decode(t.params), None, harmful, benign, max_new_tokens)
        a = t.user_attrs
        rows.append(
            {
                "trial": t.number,
                "objective": t.value,
                "mass_benign": a.get("refusal_mass_helpfulness"),
                "mass_harmful": a.get("refusal_mass_alignment"),
                "L_help": a.get("helpfulness_loss"),
                "L_align": a.get("alignment_loss"),
                "benign_refused": b,
                "harmful_refused": h,
            }
        )
        print(f"{run_dir} trial {t.number}: {rows[-1]}", file=sys.stderr)
    ctx.generation.close()
    tg = cfg.search.targets
    min_harmful = tg.min_harmful_refused if tg.min_harmful_refused is not None else aligned_h - tg.margin
    bar = Bar(min_harmful, tg.max_benign_refused, len(harmful), len(benign), tg.standard_errors)
    by_number = {r["trial"]: r for r in rows}
    picks = {}
    for k in (1, 3, 6, 12):
        ranked = [by_number[t.number] for t in shortlist(study, cfg.search, k)]
        chosen = pick(ranked, bar)
        picks[k] = {key: chosen[key] for key in ("trial", "objective", "harmful_refused", "benign_refused")}
        picks[k]["meets_targets"] = bar.shortfall(chosen["harmful_refused"], chosen["benign_refused"]) == 0
    return {
        "run": str(run_dir),
        "trials": len(rows),
        "seconds": round(time.perf_counter() - started, 1),
        "benign_prompts": len(benign),
        "harmful_prompts": len(harmful),
        "targets": bar.describe(),
        **summary(rows),
        "verified_pick_with_k": picks,
        "rows": rows,
    }


def summary(rows: list[dict]) -> dict:
    col = lambda k: [r[k] for r in rows]  # noqa: E731
    return {
        "benign_refused_vs": {
            k: correlations(col(k), col("benign_refused")) for k in ("mass_benign", "L_help")
        },
        "harmful_refused_vs": {
            k: correlations(col(k), col("harmful_refused")) for k in ("mass_harmful", "L_align", "objective")
        },
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", nargs="+", default=["runs/demo"], help="finished search run folders")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--json", default="bench/results/refusal_signal.json")
    args = ap.parse_args()
    runs = [measure(Path(r), args.max_new_tokens) for r in args.run]
    out = {
        "max_new_tokens": args.max_new_tokens,
        "pooled": {"trials": sum(r["trials"] for r in runs), **summary([x for r in runs for x in r["rows"]])},
        "runs": runs,
    }
    write_text_atomic(Path(args.json), json.dumps(out, indent=1))
    brief = {**out, "runs": [{k: v for k, v in r.items() if k != "rows"} for r in runs]}
    print(json.dumps(brief, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
