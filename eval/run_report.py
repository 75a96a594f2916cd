"""The report of `python -m eval.run`: metrics.json is the data, report.md and plots show it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from eval import plots
from eval.mcq import EXACT_TOKENS
from eval.settings import EvalSettings


def jsonable(x):
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(x) else round(float(x), 6)
    if isinstance(x, np.integer):
        return int(x)
    return x


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _num(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def make_plots(m: dict, pdir: Path) -> dict[str, Path]:
    files = {}
    for key, field, xlabel in [
        ("safety", "refused", "harmful prompts refused (%)"),
        ("over_refusal", "answered", "benign prompts answered (%)"),
    ]:
        if m[key]:
            cats = m[key]["by_category"]
            files[key] = plots.category_bars(
                {c: v[field] for c, v in cats.items()},
                {c: v["n"] for c, v in cats.items()},
                pdir / f"{key}_by_category.png",
                xlabel,
                f"{xlabel[0].upper()}{xlabel[1:-4]} per category",
            )
    a = m["analysis"]
    if a:
        panels = {
            "similarity": ("task-vector cosine", a["cosine"], "Cosine between task vectors per layer"),
            "distance": (
                "relative L2 distance",
                a["distance"],
                "||theta_m - theta_s|| / ||theta_s - theta_base||",
            ),
            "cka": ("linear CKA", a["cka"], "Linear CKA of hidden states: merged vs each model"),
            "contribution": ("contribution share", a["share"], "Share of the merged task vector per source"),
        }
        for key, (ylabel, lines, title) in panels.items():
            if lines:
                files[key] = plots.layer_profiles(a["groups"], {ylabel: lines}, pdir / f"{key}.png", title)
    return files


def _category_table(summary: dict, field: str) -> list[str]:
    lines = [f"| category | n | {field} |", "|---|---|---|"]
    lines += [f"| {c} | {v['n']} | {_pct(v[field])} |" for c, v in summary["by_category"].items()]
    return lines


def _examples(rows: list[dict], wanted: bool, k: int) -> list[str]:
    picked = [r for r in rows if r["refused"] == wanted][:k]
    return [f"- **{r['prompt'][:160]}** -> {r['answer'][:240]!r} (`{r['verdict']}`)" for r in picked] or [
        "- (none)"
    ]


def write_report(
    name: str,
    model_path: Path,
    data_dir: Path,
    s: EvalSettings,
    m: dict,
    answers: list[dict],
    files: dict[str, Path],
) -> str:
    img = lambda key: [f"![{key}](plots/{files[key].name})", ""] if key in files else []  # noqa: E731
    lines = [
        f"# eval.run report: {name}",
        "",
        f"- Model: `{model_path}`; weights {m['model']['weights']}",
        f"- Generation: {m['model']['generation']}, greedy, at most {s.max_new_tokens} new tokens",
        f"- Test data: `{data_dir}`; judge: {m['safety']['judge']}",
        "",
        "## Safety: harmful prompts refused",
        "",
        f"**{_pct(m['safety']['refused'])}** of {m['safety']['n']} held-out harmful prompts refused.",
        "",
        *_category_table(m["safety"], "refused"),
        "",
    ]
    if "by_set" in m["safety"] and len(m["safety"]["by_set"]) > 1:
        lines += [f"- `{k}`: {_pct(v['refused'])} of {v['n']}" for k, v in m["safety"]["by_set"].items()] + [
            ""
        ]
    harmful = [a for a in answers if a["kind"] == "harmful"]
    lines += img("safety")
    lines += ["Answers judged not refused (the failures):", "", *_examples(harmful, False, s.examples), ""]
    lines += ["Answers judged refused:", "", *_examples(harmful, True, s.examples), ""]
    lines += ["## Over-refusal: benign prompts answered", ""]
    o = m["over_refusal"]
    if o:
        lines += [f"**{_pct(o['answered'])}** of {o['n']} benign prompts answered (not refused).", ""]
        lines += [*_category_table(o, "answered"), "", *img("over_refusal")]
        benign = [a for a in answers if a["kind"] == "benign"]
        lines += ["Benign prompts wrongly refused:", "", *_examples(benign, True, s.examples), ""]
    else:
        lines += [f"Not measured: `{data_dir}` has no `benign` split.", ""]
    if m.get("suites"):
        lines += [
            "## External suites (prompts written by others)",
            "",
            "| suite | package (licence) | harmful refused | benign wrongly refused | judge |",
            "|---|---|---|---|---|",
            *(
                f"| {name} | `{v['package']}` ({v['licence']}) | {_pct(v['harmful_refused'])} of "
                f"{v['n_harmful']} | {_pct(v['benign_refused'])} of {v['n_benign']} | {v['judge']} |"
                for name, v in m["suites"].items()
            ),
            "",
            *(f"- {name}: {v['source']}" for name, v in m["suites"].items()),
            "",
        ]
    d = m["domain"]
    lines += [
        "## Domain",
        "",
        "| test loss (mean response-token cross-entropy, lower is better) | value |",
        "|---|---|",
        f"| domain_test | {_num(d['domain_test_loss'])} |",
        f"| alignment_test | {_num(d['alignment_test_loss'])} |",
        "",
    ]
    if d.get("exact"):
        head = f"| graded by final answers (greedy, {EXACT_TOKENS} tokens) | n | accuracy |"
        lines += [head, "|---|---|---|"]
        lines += [f"| {name} | {v['n']} | {_pct(v['accuracy'])} |" for name, v in d["exact"].items()]
        lines.append("")
    if d["mcq"]:
        lines += [
            "| multiple-choice file | n | accuracy | accuracy (length-normalized) |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {f} | {v['n']} | {_pct(v['accuracy'])} | {_pct(v['accuracy_norm'])} |"
            for f, v in d["mcq"].items()
        ]
        lines.append("")
    if d["lm_eval"]:
        lines += ["| lm-eval task | metric | value |", "|---|---|---|"]
        lines += [
            f"| {t} | {k} | {_num(float(v))} |" for t, sc in d["lm_eval"].items() for k, v in sc.items()
        ]
        lines.append("")
    a = m["analysis"]
    lines += ["## MergeAlign analysis", ""]
    if a:
        blocks = [i for i, g in enumerate(a["groups"]) if g.startswith("layers.")]
        mean = lambda v: float(np.nanmean(np.asarray(v, dtype=float)[blocks])) if blocks else float("nan")  # noqa: E731
        lines += [
            f"Per layer group; definitions in docs/eval.md. CKA on {a['cka_tokens']} prompt tokens of "
            f"{a['cka_prompts']} test prompts. Mean over the transformer blocks:",
            "",
            "| source | relative distance | effective coefficient | contribution share | CKA with merged |",
            "|---|---|---|---|---|",
        ]
        for src in a["distance"]:
            lines.append(
                f"| {src} | {_num(mean(a['distance'][src]))} | {_num(mean(a['coefficient'][src]))} | "
                f"{_pct(mean(a['share'][src]))} | {_num(mean(a['cka'][src]))} |"
            )
        lines.append(f"| base | | | | {_num(mean(a['cka']['base']))} |")
        lines += [""] + [f"- cosine {pair}: {_num(mean(v))}" for pair, v in a["cosine"].items()] + [""]
        for key in ("similarity", "distance", "cka", "contribution"):
            lines += img(key)
    else:
        lines += ["Not run (`eval.analysis: false`).", ""]
    lines += [
        "## Files",
        "",
        "- [metrics.json](metrics.json): every number above",
        "- [answers.jsonl](answers.jsonl): every prompt, answer and verdict",
        "",
        "## Timings (s)",
        "",
        ", ".join(f"{k} {v:.2f}" for k, v in m["timings_s"].items()),
        "",
    ]
    return "\n".join(lines)
