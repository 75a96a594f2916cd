"""Issue "alignment includes helpfulness", measured: the paper's objective (L_align + alpha L_domain,
lowest value chosen) vs this project's (+ beta L_help) chosen by the lowest value vs the same study's
pick verified by generation, over several sampler seeds, same budget, every pick measured on the
test splits and on the external suites' prompts (written by others).

    HF_HUB_OFFLINE=1 python bench/bench_objectives.py --config configs/demo.yaml \
        --data runs/demo/data --seeds 0 1 2 --out runs/objectives

Per seed: one study with beta 0 and no verification, one with the config's beta and verification
(its lowest-value trial is the "+ beta" row, its verified pick the last row). The models load
once. Studies are resumable (rerun the command); seeds already in <out>/objectives.json are not
measured again. Writes <out>/objectives.md and .json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import optuna  # noqa: E402
import yaml  # noqa: E402

from core.files import write_text_atomic  # noqa: E402
from eval.data import load_pairs  # noqa: E402
from eval.settings import parse_settings  # noqa: E402
from eval.suites import suite_prompts  # noqa: E402
from optimize.compare import PAPER_OBJECTIVE, evaluate, for_variant, variant  # noqa: E402
from optimize.config import load_config  # noqa: E402
from optimize.context import check_inputs, prepare  # noqa: E402
from optimize.demo import held_out_sets  # noqa: E402
from optimize.report import load_best  # noqa: E402
from optimize.search import run  # noqa: E402

ROWS = ("paper objective", "+ beta L_help, lowest value", "+ beta L_help, verified pick")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/demo.yaml"))
    ap.add_argument("--data", required=True, help="the search data (synth's output), e.g. runs/demo/data")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=str(ROOT / "runs/objectives"))
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument(
        "--reuse",
        nargs="*",
        default=[],
        metavar="SEED=RUN",
        help="a finished run of the config's own objective at that seed, on the same data (e.g. the "
        "demo's: 0=runs/demo): its study and verified pick are used instead of searching again",
    )
    args = ap.parse_args()
    reuse = {int(k): Path(v) for k, v in (item.split("=", 1) for item in args.reuse)}
    quiet = {
        "save_model": False,
        "mergekit": False,
        "plots": False,
        "references": False,
        "test_splits": False,
    }
    cfg = load_config(
        args.config, {"data.dir": args.data, "out": args.out} | {f"output.{k}": v for k, v in quiet.items()}
    )
    test_rows, _ = held_out_sets(cfg.test_dir)
    harmful = [r["prompt"] for r in load_pairs(cfg.test_dir, "alignment_test")]
    benign = [r["prompt"] for r in load_pairs(cfg.test_dir, "benign")]
    suites = suite_prompts(parse_settings(cfg.eval).suites)
    ctx = prepare(cfg, check_inputs(cfg))
    test = ctx.scorer_for(test_rows)
    done_json = Path(args.out, "objectives.json")
    earlier = json.loads(done_json.read_text()) if done_json.exists() else []
    results = [r for r in earlier if r["seed"] in args.seeds]  # a rerun measures only the missing seeds
    for seed in args.seeds:
        if {r["row"] for r in results if r["seed"] == seed} == set(ROWS):
            continue
        results = [r for r in results if r["seed"] != seed]
        paper = variant(cfg, f"paper-s{seed}", {**PAPER_OBJECTIVE, "seed": seed})
        ours = variant(cfg, f"beta-s{seed}", {"seed": seed})
        ours_dir = reuse.get(seed, ours.run_dir)
        for c in (paper,) if seed in reuse else (paper, ours):
            run(c, ctx=for_variant(ctx, c))
        url = f"sqlite:///{(ours_dir / 'study.db').resolve()}"
        (name,) = optuna.get_all_study_names(url)  # one study per run folder
        picks = {
            ROWS[0]: load_best(paper.run_dir)["params"],
            ROWS[1]: optuna.load_study(study_name=name, storage=url).best_trial.params,
            ROWS[2]: load_best(ours_dir)["params"],
        }
        t = yaml.safe_load((ours_dir / "run.yaml").read_text()).get("timings_s", {})
        done: dict[tuple, dict] = {}  # the verified pick is often the lowest-value trial itself
        for row, params in picks.items():
            key = tuple(sorted(params.items()))
            if key not in done:
                cand = ctx.space.decode(params)
                done[key] = evaluate(ctx, None, cand, test, harmful, benign, args.max_new_tokens, suites)
                done[key].pop("examples")
            r = done[key]
            results.append(
                {"seed": seed, "row": row, **r, "search_s": t.get("search_s"), "verify_s": t.get("verify_s")}
            )
            print(f"[objectives] seed {seed} {row}: {r}", file=sys.stderr)
        write_text_atomic(done_json, json.dumps(results, indent=1))
    ctx.generation.close()
    write_table(Path(args.out), results, suites)


def write_table(out: Path, results: list[dict], suites) -> None:
    cols = [
        ("refused_harmful", "harmful refused", "%"),
        ("refused_benign", "benign wrongly refused", "%"),
        ("domain:math", "L_math", "f"),
        ("domain:medical", "L_medical", "f"),
        ("domain_loss", "L_domain", "f"),
    ]
    for n in suites:
        cols += [(f"{n}:h", f"{n}: harmful refused", "%"), (f"{n}:b", f"{n}: benign wrongly refused", "%")]
    for r in results:
        for n, s in r.get("suites", {}).items():
            r[f"{n}:h"], r[f"{n}:b"] = s["refused_harmful"], s["refused_benign"]

    def fmt(v, kind):
        return f"{v:.0%}" if kind == "%" else f"{v:.3f}"

    lines = [
        "| pick (test splits) | seeds | " + " | ".join(c[1] for c in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for name in ROWS:
        rows = [r for r in results if r["row"] == name]
        cells = []
        for key, _, kind in cols:
            vals = [r[key] for r in rows if key in r]
            cells.append(
                f"{fmt(statistics.median(vals), kind)} ({', '.join(fmt(v, kind) for v in vals)})"
                if vals
                else "—"
            )
        lines.append(f"| {name} | {len(rows)} | " + " | ".join(cells) + " |")
    verify = [r["verify_s"] / r["search_s"] for r in results if r["row"] == ROWS[2] and r.get("verify_s")]
    if verify:
        lines += ["", f"Verification / search wall time: {', '.join(f'{v:.0%}' for v in verify)} (per seed)."]
    write_text_atomic(out / "objectives.md", "\n".join(lines) + "\n")
    print(out / "objectives.md")


if __name__ == "__main__":
    main()
