"""Issue "alignment includes helpfulness", measured: the paper's objective (L_align + alpha L_domain,
lowest value chosen) vs this project's (+ beta L_help) chosen by the lowest value vs the same study's
pick verified by generation vs a study with the refusal masses as constraints (search.constrain),
over several sampler seeds, same budget, every pick measured on the test splits and on the external
suites' prompts (written by others).

    HF_HUB_OFFLINE=1 python bench/bench_objectives.py --config configs/demo.yaml \
        --data runs/demo/data --seeds 0 1 2 --out runs/objectives

Per seed: one study with beta 0 and no verification, one with the config's beta and verification
(its lowest-value trial is the "+ beta" row, its verified pick the next row), both without
constraints, and one with the config's settings and search.constrain on; then the beta study's
outputs are written again with `search.verify.restore_steps` (--restore-steps, default 4): the
verified pick moved toward the alignment source until it meets the targets, when none does (its
time is its own verification and restore against the beta study's search). The models load once.
Studies are resumable (rerun the command); rows already in <out>/objectives.json are not measured
again. Writes <out>/objectives.md and .json.
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
from optimize.storage import sqlite_url  # noqa: E402
from optimize.study import ranked  # noqa: E402

# row -> (study, which trial): `best` is the run's chosen trial, `lowest` its study's lowest value
PICKS = {
    "paper objective": ("paper", "best"),
    "+ beta L_help, lowest value": ("beta", "lowest"),
    "+ beta L_help, verified pick": ("beta", "best"),
    "+ beta L_help, constrained, verified pick": ("constrained", "best"),
    # the same study as the verified pick, its outputs written again with search.verify.restore_steps
    "+ beta L_help, verified pick, restored": ("restored", "best"),
}
ROWS = tuple(PICKS)


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
    ap.add_argument(
        "--restore-steps", type=int, default=4, help="search.verify.restore_steps of the last row"
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
        have = {r["row"] for r in results if r["seed"] == seed}
        missing = [row for row in ROWS if row not in have]
        if not missing:
            continue
        verify = {**cfg.search.verify.model_dump(), "restore_steps": 0}
        unconstrained = {"seed": seed, "constrain": {"enabled": False}, "verify": verify}
        studies = {
            "paper": variant(cfg, f"paper-s{seed}", {**PAPER_OBJECTIVE, "seed": seed}),
            "beta": variant(cfg, f"beta-s{seed}", unconstrained),
            "constrained": variant(
                cfg, f"con-s{seed}", {"seed": seed, "constrain": {"enabled": True}, "verify": verify}
            ),
        }
        verify = verify | {"restore_steps": args.restore_steps}
        studies["restored"] = variant(cfg, f"restored-s{seed}", unconstrained | {"verify": verify})
        own = "constrained" if cfg.search.constrain.enabled else "beta"  # the config's own study
        run_dirs = {k: reuse.get(seed, c.run_dir) if k == own else c.run_dir for k, c in studies.items()}
        for key in dict.fromkeys(PICKS[row][0] for row in missing):
            if key == "restored":  # the beta study, resumed (no trial left to run): only its outputs
                beta = yaml.safe_load((run_dirs["beta"] / "run.yaml").read_text())
                if beta["config"]["search"]["verify"].get("restore_steps"):
                    sys.exit(
                        f"{run_dirs['beta']}: its verified pick is already restored; rerun it with "
                        "--set search.verify.restore_steps=0, or leave out --reuse"
                    )
                url = sqlite_url(run_dirs["beta"] / "study.db")
                same = studies[key].model_copy(update={"study_name": beta["study_name"]})
                run(same, storage=url, ctx=for_variant(ctx, same))
            elif not (key == own and seed in reuse):
                run(studies[key], ctx=for_variant(ctx, studies[key]))
        done: dict[tuple, dict] = {}  # the verified pick is often the lowest-value trial itself
        for row in missing:
            key, which = PICKS[row]
            run_dir = run_dirs[key]
            if which == "lowest":
                url = sqlite_url(run_dir / "study.db")
                name = yaml.safe_load((run_dir / "run.yaml").read_text())["study_name"]
                study = optuna.load_study(study_name=name, storage=url)
                params = ranked(study, studies[key].search)[0].params  # a restored point left out
            else:
                params = load_best(run_dir)["params"]
            t = yaml.safe_load((run_dir / "run.yaml").read_text()).get("timings_s", {})
            if key == "restored":  # its search is the beta study's
                searched = yaml.safe_load((run_dirs["beta"] / "run.yaml").read_text())["timings_s"]
                t["search_s"] = searched["search_s"]
            cand_key = tuple(sorted(params.items()))
            if cand_key not in done:
                cand = ctx.space.decode(params)
                done[cand_key] = evaluate(ctx, None, cand, test, harmful, benign, args.max_new_tokens, suites)
                done[cand_key].pop("examples")
            r = done[cand_key]
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
    for row in ROWS[2:]:
        verify = [r["verify_s"] / r["search_s"] for r in results if r["row"] == row and r.get("verify_s")]
        if verify:
            times = ", ".join(f"{v:.0%}" for v in verify)
            lines += ["", f"{row}: verification / search wall time {times} (per seed)."]
    write_text_atomic(out / "objectives.md", "\n".join(lines) + "\n")
    print(out / "objectives.md")


if __name__ == "__main__":
    main()
