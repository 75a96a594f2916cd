"""The ablation's outputs: ablation.md / .csv / .json, grid.csv, samplers.csv and plots."""

from __future__ import annotations

import csv
import io
import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from core.cli import redact
from core.files import write_text_atomic
from eval import plots
from optimize.ablate_config import Ablation
from optimize.ablate_rows import Row, sampler_summary
from optimize.config import Config
from optimize.objective import describe_weighted
from optimize.storage import journal_path

COLUMNS = [
    "row",
    "merge",
    "weighting",
    "picked_on",
    "setting",
    "alignment_loss_search",
    "domain_loss_search",
    "objective_search",
    "refused_harmful",
    "domain_loss_test",
    "alignment_loss_test",
    "refused_benign",
]
GRID_COLUMNS = [
    "merge",
    "setting",
    "alignment_loss_search",
    "domain_loss_search",
    "objective_search",
    "chosen",
]


def _csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


@dataclass
class Report:
    abl: Ablation
    cfg: Config
    storage: str
    contenders: list[Row]
    results: dict
    grid: list[dict]
    test: dict
    timings: dict
    started: float
    samplers: dict | None = None

    def table(self) -> list[dict]:
        out = []
        for row in self.contenders:
            r = self.results[row.label]
            out.append(
                {
                    "row": row.label,
                    "merge": row.merge,
                    "weighting": row.weighting,
                    "picked_on": row.picked_on,
                    "setting": row.setting,
                    **{k: row.details.get(k, "") for k in COLUMNS[5:8]},
                    "refused_harmful": r["refused_harmful"],
                    "domain_loss_test": r["domain_loss"],
                    "alignment_loss_test": r["alignment_loss"],
                    "refused_benign": r["refused_benign"],
                    **{
                        f"{name}: {k}": v
                        for name, shares in r.get("suites", {}).items()
                        for k, v in shares.items()
                    },
                }
            )
        return out

    def suite_columns(self) -> list[str]:
        return [
            f"{n}: {k}" for n in self.abl.evaluation.suites for k in ("refused_harmful", "refused_benign")
        ]

    def write(self) -> Path:
        run_dir, table = self.cfg.run_dir, self.table()
        write_text_atomic(run_dir / "ablation.csv", _csv(table, COLUMNS + self.suite_columns()))
        if self.grid:
            write_text_atomic(run_dir / "grid.csv", _csv(self.grid, GRID_COLUMNS))
        figures = [
            plots.labeled_points(
                {r["row"]: (r["domain_loss_test"], 100 * r["refused_harmful"]) for r in table},
                run_dir / "plots" / "ablation.png",
                xlabel="domain test loss (lower: more expertise)",
                ylabel="test harmful prompts refused (%)",
                title="Every method on the test splits",
                highlight="safety-aware search (alignmerge)",
            )
        ]
        summary = []
        if self.samplers:
            studies = self.samplers["studies"]
            summary = sampler_summary(studies)
            curves = {name: [run["curve"] for run in seeds.values()] for name, seeds in studies.items()}
            figures.append(plots.best_so_far(curves, run_dir / "plots" / "samplers.png"))
            long = [
                {"sampler": name, "seed": seed, "trial": i + 1, "best_so_far": v}
                for name, seeds in studies.items()
                for seed, run in seeds.items()
                for i, v in enumerate(run["curve"])
            ]
            write_text_atomic(
                run_dir / "samplers.csv", _csv(long, ["sampler", "seed", "trial", "best_so_far"])
            )
        doc = {
            "ablation": self.abl.model_dump(),
            "search_config": self.cfg.model_dump(by_alias=True, mode="json")
            | {"storage": redact(self.cfg.storage)},
            "rows": [{**t, "details": row.details} for t, row in zip(table, self.contenders)],
            "grid": self.grid,
            "samplers": {"summary": summary, **(self.samplers or {})},
            "timings_s": {k: round(v, 1) for k, v in self.timings.items()},
        }
        write_text_atomic(run_dir / "ablation.json", json.dumps(doc, indent=1))
        return write_text_atomic(run_dir / "ablation.md", self.markdown(table, summary, figures))

    def markdown(self, table: list[dict], summary: list[dict], figures: list[Path]) -> str:
        abl, cfg, s = self.abl, self.cfg, self.cfg.search
        sources = ", ".join(f"`{x.name}` ({x.role})" for x in cfg.sources)
        n = {k: len(v) for k, v in self.test.items()}
        minutes = (time.perf_counter() - self.started) / 60
        lines = [
            f"# Ablation: {abl.name}",
            "",
            f"Base `{cfg.base}`, sources {sources}; search config `{abl.search_config}` (method "
            f"`{cfg.merge.method}`, {cfg.search.parametrization}, alpha {s.alpha}). Every row is "
            "**picked on the search splits** (the column *picked on*) and **measured on the test "
            f"splits**, which no choice ever sees: {n['alignment']} harmful prompts, "
            f"{n['domain']} domain examples, {n['benign']} benign prompts; greedy answers up to "
            f"{abl.evaluation.max_new_tokens} tokens judged by the rule-based refusal judge. "
            f"Run time so far: {minutes:.1f} min.",
            "",
            "| model | merge | task weighting | picked on | chosen setting | harmful refused (test) ↑ "
            "| L_domain test ↓ | L_align test ↓ | benign wrongly refused ↓ |"
            + "".join(
                f" {n}: harmful refused ↑ | {n}: benign wrongly refused ↓ |" for n in abl.evaluation.suites
            ),
            "|---|---|---|---|---|---|---|---|---|" + "---|" * len(self.suite_columns()),
        ]
        for t in table:
            lines.append(
                f"| {t['row']} | {t['merge']} | {t['weighting']} | {t['picked_on']} | {t['setting']} | "
                f"{_pct(t['refused_harmful'])} | {t['domain_loss_test']:.4f} | "
                f"{t['alignment_loss_test']:.4f} | {_pct(t['refused_benign'])} |"
                + "".join(f" {_pct(t[c])} |" for c in self.suite_columns())
            )
        lines += [
            "",
            "Grid rows: the paper reports the grid point with the best *test* accuracy; here the point "
            f"with the lowest {describe_weighted(s)} on the *search* splits is chosen, then "
            "measured on the test splits. Every grid point with its search-split losses: "
            "[grid.csv](grid.csv). All numbers: [ablation.csv](ablation.csv), "
            "[ablation.json](ablation.json).",
            "",
            f"![methods](plots/{figures[0].name})",
            "",
        ]
        if summary:
            sm = self.samplers
            ex = sm["examples"]
            lines += [
                f"## Samplers: best objective after {abl.samplers.n_trials} trials",
                "",
                f"Objective {describe_weighted(s)} on the first "
                f"{', '.join(f'{n} {k}' for k, n in ex.items())} search examples, the search space of "
                "the search config "
                f"({cfg.search.parametrization}), pruner `{s.pruner}`; seeds {abl.samplers.seeds}. "
                "Lower is better; best mean first. The pick's test objective is the same objective of each "
                "study's chosen trial on the test splits (human-written references: higher than on the "
                "search split for every sampler); compare it across samplers: many coefficients can "
                "over-fit the search split.",
                "",
                "| sampler | seeds | mean | std | min | max | test objective of the pick (mean) "
                "| time per study (s) |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for r in summary:
                lines.append(
                    f"| {r['sampler']} | {r['seeds']} | {r['mean']:.4f} | {_std(r['std'])} | "
                    f"{r['min']:.4f} | {r['max']:.4f} | {r['test_mean']:.4f} | {r['seconds']:.0f} |"
                )
            lines += [
                "",
                f"![best so far](plots/{figures[1].name})",
                "",
                "Best-so-far values per trial: [samplers.csv](samplers.csv). Every study: "
                f"`optuna-dashboard {shlex.quote(str(journal_path(self.storage) or redact(self.storage)))}`.",
                "",
            ]
        timings = ", ".join(f"{k} {v:.0f}" for k, v in self.timings.items())
        lines += ["## Timings (s)", "", timings, ""]
        return "\n".join(lines)


def _std(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"  # one seed: no spread
