"""How well the free over-refusal signal predicts the judged refusal rate, over the trials of a study.

    python bench/bench_refusal_signal.py --run runs/demo [--max-new-tokens 32]
        [--json bench/results/refusal_signal.json]

Every complete trial of the finished search in `--run` (its run.yaml and study.db) is merged again
and answers the search splits' benign prompts (D_help) and harmful prompts (D_safety) greedily; the
rule-based judge reads the answers. Beside each trial's recorded refusal-opening masses
(`refusal_mass_helpfulness`, `refusal_mass_alignment`, docs/method.md §3) and losses, the script
reports Pearson and Spearman correlations with the judged shares. Only search splits are used.
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
from optimize.config import validate_config  # noqa: E402
from optimize.context import check_inputs, prepare  # noqa: E402
from optimize.study import default_storage  # noqa: E402
from optimize.verify import judged  # noqa: E402


def correlations(x: list[float], y: list[float]) -> dict:
    return {
        "pearson": float(stats.pearsonr(x, y)[0]),
        "spearman": float(stats.spearmanr(x, y)[0]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--json", default="bench/results/refusal_signal.json")
    args = ap.parse_args()
    run = yaml.safe_load((Path(args.run) / "run.yaml").read_text())
    raw = run["config"] | {"storage": None}
    raw["search"]["verify"]["top_k"] = max(1, raw["search"]["verify"]["top_k"])  # loads D_help
    cfg = validate_config(raw)
    ctx = prepare(cfg, check_inputs(cfg))
    study = optuna.load_study(study_name=run["study_name"], storage=default_storage(cfg))
    harmful = [r["prompt"] for r in ctx.rows["alignment"]]
    benign = [r["prompt"] for r in ctx.rows["helpfulness"]]
    rows = []
    started = time.perf_counter()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        h, b = judged(ctx, ctx.space.decode(t.params), None, harmful, benign, args.max_new_tokens)
        a = t.user_attrs
        rows.append(
            {
                "trial": t.number,
                "mass_benign": a.get("refusal_mass_helpfulness"),
                "mass_harmful": a.get("refusal_mass_alignment"),
                "L_help": a.get("helpfulness_loss"),
                "L_align": a.get("alignment_loss"),
                "benign_refused": b,
                "harmful_refused": h,
            }
        )
        print(f"trial {t.number}: {rows[-1]}", file=sys.stderr)
    col = lambda k: [r[k] for r in rows]  # noqa: E731
    out = {
        "run": args.run,
        "trials": len(rows),
        "benign_prompts": len(benign),
        "harmful_prompts": len(harmful),
        "max_new_tokens": args.max_new_tokens,
        "seconds": round(time.perf_counter() - started, 1),
        "benign_refused_vs": {
            k: correlations(col(k), col("benign_refused")) for k in ("mass_benign", "L_help")
        },
        "harmful_refused_vs": {
            k: correlations(col(k), col("harmful_refused")) for k in ("mass_harmful", "L_align")
        },
        "rows": rows,
    }
    write_text_atomic(Path(args.json), json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
