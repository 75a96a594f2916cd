"""The dataset card (README.md in the data folder), written from the run record."""

from __future__ import annotations

import json

from synth.prompts import Templates

NOTICE = (
    "> **Content warning.** The `alignment_*` splits hold *harmful requests* (violence, abuse,\n"
    "> crime, self-harm, hate speech, sexual content, ...) written by a model on purpose, each\n"
    "> paired with a refusal. They exist to train and measure refusals. Do not use the prompts\n"
    "> for anything else, and do not publish them without review."
)


FILES = {"prompts_file": "harmful prompts", "benign_file": "benign prompts"}


def render_card(record: dict, templates: Templates) -> str:
    cfg = record["config"]
    lines = [
        "---",
        "tags: [synthetic, safety, refusals, not-for-all-audiences]",
        "configs:",
        *[f"  - {{split: {s}}}" for s in record["splits"]],
        "---",
        f"# Synthetic safety and domain data: {record['name']}",
        "",
        NOTICE,
        "",
        "Made by `synth.generate` (alignmerge) with the pipeline of Hammoud et al. 2024:",
        "harmful prompts answered by every pool model, one judged refusal kept per prompt;",
        "exam questions written and answered by each domain expert; benign-but-risky prompts",
        "answered helpfully by the pool (one non-refusal kept per prompt: the search's L_help and",
        "over-refusal checks). The `*_test` splits and `benign` (the benign test split) share no",
        "prompt with the `*_search` splits, and no prompt appears twice anywhere.",
        "",
        f"Command: `{record['command']}`",
        "",
        "## Splits",
        "",
        "| split | rows |",
        "|---|---|",
        *[f"| {s} | {n} |" for s, n in record["splits"].items()],
        "",
        "Columns: `prompt`, `response`, `category` (harm category, domain topic or `benign`),",
        "`source_model` (who wrote the response), `judge_verdict` and `judge_reason`,",
        "`prompt_source` (who wrote the prompt), `kind` (harmful | domain | benign).",
        "",
        "## Models",
        "",
        f"- backend: `{record['backend']}`",
        *(
            [f"- generator (harmful and benign prompts): `{cfg['generator']['path']}`"]
            if not (cfg["prompts_file"] and cfg["benign_file"])
            else []
        ),
        *[f"- {what} from the file `{cfg[k]}`" for k, what in FILES.items() if cfg.get(k)],
        *[f"- pool model `{m['name'] or m['path']}`: `{m['path']}`" for m in cfg["pool"]],
        *[
            f"- expert `{e['name'] or e['path']}` on *{e['topic']}*: `{e['path']}`"
            + (
                f", answering the exam questions of `{e['questions_file']}` (not its own)"
                if e.get("questions_file")
                else ""
            )
            for e in cfg["experts"]
        ],
        (
            f"- judge of the harmful answers: `{cfg['judge']['kind']}`"
            + (f" (guard `{cfg['judge']['guard']['path']}`)" if cfg["judge"]["guard"] else "")
        ),
        "- judge of the benign and domain answers: `rules` (built-in refusal rules, eval/judge.py)",
        "",
        "## Sampling and seeds",
        "",
        f"- seed: {cfg['seed']} (each request's seed derives from it, its stage and its index)",
        f"- prompt writing: {json.dumps(cfg['prompt_sampling'])}",
        (
            f"- exam questions: {json.dumps(cfg['question_sampling'])}, "
            f"n={cfg['questions_per_request']} per request"
        ),
        f"- answers (greedy): {json.dumps(cfg['answer_sampling'])}",
        f"- structured output: {record['structured_output']}",
        (
            f"- oversample: {cfg['oversample']}, near-duplicate threshold (word 3-gram Jaccard): "
            f"{cfg['near_dup_threshold']}, test fraction: {cfg['test_fraction']}"
        ),
        "",
        "## Kept and dropped, step by step",
        "",
        "| step | in | kept | dropped (why) |",
        "|---|---|---|---|",
    ]
    for s in record["steps"]:
        why = ", ".join(f"{k}: {v}" for k, v in s["dropped"].items() if v) or "-"
        lines.append(f"| {s['name']} | {s['n_in']} | {s['kept']} | {why} |")
    lines += [
        "",
        "Reasons: `invalid_json` (no parsable JSON object), `no_question` (JSON without a",
        "`Question` string), `too_short`, `exact_duplicate` / `near_duplicate` (of any prompt",
        "kept before, in any split), `in_context_example` (a copy of a prompt example),",
        "`no_model_refused` (every pool model complied), `expert_refused`, `empty_answer`,",
        "`over_target` (more rows than asked for).",
        "",
        "## Prompts",
        "",
    ]
    for name in (
        "harmful_system.txt",
        "harmful_user.txt",
        "harmful_prefill.txt",
        "domain_system.txt",
        "domain_user.txt",
        "domain_prefill.txt",
        "benign_system.txt",
        "benign_user.txt",
        "benign_prefill.txt",
    ):
        lines += [f"`{name}` ({templates.path(name)}):", "", "```", templates.raw(name), "```", ""]
    lines += [
        "## Run",
        "",
        f"- versions: {json.dumps(record['versions'])}",
        f"- timings (s): {json.dumps(record['timings'])}",
        "- full resolved config and counts: `synth_run.json` in this folder",
        "",
    ]
    return "\n".join(lines)
