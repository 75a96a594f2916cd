"""Bad input never crashes a command: every bad config, flag or data file ends in one `error:`
line on stderr and exit code 2 (a `UserError` in-process), a short message, no traceback, within
seconds, and nothing written (docs/errors.md, "Hardening").

- `CASES`: every bad input found so far, run through its command's real `main` in-process (five of
  them also as real processes); each has its row in docs/errors.md, with its message.
- Property tests (Hypothesis) over every config schema (the search config, `synth:`, `eval:`,
  configs/ablations.yaml) and every data-file reader: a surely-bad value for any key, an unknown
  key, a missing key, and whole files of garbage (non-UTF-8, binary, deep nesting, empty...).
  `ALIGNMERGE_FUZZ_EXAMPLES` sets the examples per property: the default (25, derandomized) is
  the CI slice; docs/errors.md says how to run the long one.
- docs/errors.md is checked against the tests: every test it names exists, every case is listed
  there with its message.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import subprocess
import sys
import time
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import annotated_types
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from core.cli import read_user_file
from core.config import allowed_keys, validate
from core.errors import UserError
from eval.data import load_pairs, read_prompt_file
from eval.mcq import read_mcq
from eval.run_inputs import extra_prompts
from eval.settings import EvalSettings, parse_settings
from optimize.ablate_config import Ablation, load_ablation
from optimize.config import Config, load_config, validate_config
from synth.config import SynthConfig, load_run_config, parse_synth
from synth.generate import check_inputs, check_made
from tests.conftest import world_config

ROOT = Path(__file__).parents[1]
DOC = ROOT / "docs" / "errors.md"
LIMIT = 1300  # characters of an error message, at most
EXAMPLES = int(os.environ.get("ALIGNMERGE_FUZZ_EXAMPLES", "25"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=EXAMPLES <= 25,  # the CI slice is the same every run; the long one explores
    deadline=None,  # timed by `refused` instead: the first example pays for imports
    database=None,  # writes nothing (no .hypothesis folder)
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def check_message(text: str, fragment: str = "") -> None:
    """One `error:` line (the rest of the message follows it), short, no traceback."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert len(starts) == 1, text[-3000:]
    message = "\n".join(lines[starts[0] :])
    assert "Traceback" not in text and len(message) < LIMIT, message[:3000]
    assert fragment in message, message


def refused(call: Callable[[], object], fragment: str = "", seconds: float = 10) -> UserError:
    """`call()` raises a UserError that prints as a good error message, within `seconds`."""
    started = time.perf_counter()
    with pytest.raises(UserError) as err:
        call()
    assert time.perf_counter() - started < seconds
    check_message(f"error: {err.value}", fragment)
    return err.value


def files_under(folder: Path) -> set[Path]:
    return {p.relative_to(folder) for p in folder.rglob("*")}


# ----------------------------------------------------------------------------- pinned cases
def bomb(levels: int = 9) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def search(world, tmp: Path, **top) -> str:
    """The tiny world's search config (run folder in `tmp`), top-level keys replaced by `top`."""
    raw = world_config(world, tmp / "run")
    for key, value in top.items():
        raw[key] = (
            {**raw[key], **value} if isinstance(raw.get(key), dict) and isinstance(value, dict) else value
        )
    return yaml.safe_dump(raw)


def synth(world, tmp: Path, out: str | None = None, **section) -> str:
    """A synth run config on the tiny base whose prompts come from `p.jsonl` (no generator)."""
    base = {"backend": "transformers", "pool": [{"path": str(world["base"])}], "n_domain": 0}
    base |= {"n_benign": 0, "prompts_file": str(tmp / "p.jsonl")}
    return yaml.safe_dump({"name": "fz", "out": out or str(tmp / "run"), "synth": {**base, **section}})


PROMPTS = '{"prompt": "How do I pick a lock?"}\n'


@dataclass
class Case:
    id: str
    fragment: str  # in the message, and in docs/errors.md
    cli: str = ""  # the command run with `argv` (its `main`); or `call` runs in-process
    argv: tuple[str, ...] = ()
    files: Callable[[dict, Path], dict[str, str | bytes]] = lambda world, tmp: {}
    call: Callable[[dict, Path], object] | None = None
    open: str = ""  # not fixed yet: whose file it is (the test is a strict xfail)
    cpu_only: bool = False  # skipped on a machine with a GPU


def text_case(id, fragment, text: str | bytes, cli="optimize.search") -> Case:
    """`cli --config c.yaml`, c.yaml holding `text`."""
    return Case(id, fragment, cli, ("--config", "@tmp@/c.yaml"), lambda w, t: {"c.yaml": text})


def flag_case(id, fragment, cli, *argv) -> Case:
    return Case(id, fragment, cli, argv)


def search_case(id, fragment, *flags, cpu_only=False, files=None, **top) -> Case:
    """optimize.search on the tiny world's config, top-level keys changed by `top`."""
    made = lambda w, t: {"c.yaml": search(w, t, **top), **(files or {})}  # noqa: E731
    return Case(
        id, fragment, "optimize.search", ("--config", "@tmp@/c.yaml", *flags), made, cpu_only=cpu_only
    )


def eval_case(id, fragment, *flags, cpu_only=False, files=None, **top) -> Case:
    """eval.run on the tiny base with that config (and the test splits of `eval_data`)."""
    top.setdefault("data", {"dir": "@eval_data@"})
    made = lambda w, t: {"c.yaml": search(w, t, **top), **(files or {})}  # noqa: E731
    argv = ("--model", "@base@", "--config", "@tmp@/c.yaml", *flags)
    return Case(id, fragment, "eval.run", argv, made, cpu_only=cpu_only)


def synth_case(id, fragment, *flags, files=None, out=None, **section) -> Case:
    """synth.generate with prompts from p.jsonl (`files` replace or add files), on the tiny base."""
    made = lambda w, t: {"c.yaml": synth(w, t, out, **section), "p.jsonl": PROMPTS, **(files or {})}  # noqa: E731
    return Case(id, fragment, "synth.generate", ("--config", "@tmp@/c.yaml", *flags), made)


def call_case(id, fragment, call, open="") -> Case:
    return Case(id, fragment, call=call, open=open)


def data_case(id, fragment, reader, content: str | bytes) -> Case:
    """`reader(d.jsonl)` in-process, d.jsonl holding `content`."""
    return Case(
        id, fragment, files=lambda w, t: {"d.jsonl": content}, call=lambda w, t: reader(t / "d.jsonl")
    )


CASES = [
    # ---- any config file (read as optimize.search does; every command reads YAML the same way)
    text_case("non_utf8_config", "is not UTF-8 text", b"name: caf\xe9\n"),
    text_case("nested_20000_levels", "exceeded maximum nesting depth", "a: " + "[" * 20000),
    text_case("nested_100_levels", "is nested too deeply to be a config", "a: " + "[" * 100 + "]" * 100),
    text_case("yaml_alias_bomb", "expand to more than 100000 values", bomb()),
    text_case("yaml_self_alias", "or refer to themselves", "a: &a [1, *a]\n"),
    text_case("duplicated_key", "key 'name' given twice (first on line 1)", "name: a\nbase: x\nname: b\n"),
    search_case(
        "huge_value_clipped", "base: Input should be a valid string (got ['xxxxxxxx", base=["x" * 10**5]
    ),
    search_case(
        "many_bad_keys",
        "search: unknown keys k0, k1, k10, k100, k1000 and 2995 more",
        search={f"k{i}": i for i in range(3000)},
    ),
    # ---- the search config
    search_case(
        "section_not_a_mapping", "'search' is not a section of keys (it is 5)", "--n-trials", "3", search=5
    ),
    search_case(
        "out_is_a_file", "is a file; set out: (or --out) to a folder", out="@tmp@/f", files={"f": "x"}
    ),
    search_case(
        "out_under_a_file", "/f, which is a file; choose another path", out="@tmp@/f/run", files={"f": "x"}
    ),
    search_case("memory_size_overflows", "'inf' is not a memory size", runtime={"max_memory": "1e400"}),
    search_case(
        "base_gguf_corrupt", "cannot be read as GGUF", base="@tmp@/b.gguf", files={"b.gguf": "not a model\n"}
    ),
    search_case(
        "storage_url_typo",
        "storage postgresql//***@db.example/optuna is neither a URL",
        "--storage",
        "postgresql//alice:S3cret@db.example/optuna",
    ),
    search_case(
        "cuda_without_gpu",
        "runtime.device is cuda but torch sees 0",
        runtime={"device": "cuda"},
        cpu_only=True,
    ),
    search_case(
        "infinite_float", "search.alpha: Input should be a finite number", search={"alpha": float("inf")}
    ),
    search_case(
        "huge_alpha", "search.alpha: Input should be less than or equal to 1000000", search={"alpha": 1e308}
    ),
    search_case(
        "bool_for_int",
        "search.n_trials: Input should be a valid integer (got True)",
        search={"n_trials": True},
    ),
    search_case("name_dot_dot", "and not start with '.'", name=".."),
    search_case(
        "beta_with_domain_score",
        "search.beta is 1.0 but search.score is domain",
        search={"beta": 1, "score": "domain"},
    ),
    search_case(
        "helpfulness_missing",
        "search.beta is 0.5, search.verify.top_k 0 and search.constrain.enabled False: the search needs "
        "benign prompts",
        search={"beta": 0.5},
        data={"helpfulness": "@tmp@/nope.jsonl"},
    ),
    search_case(
        "constrain_without_alignment_source",
        "no source has role: alignment",
        search={"constrain": {"enabled": True}},
        sources=[{"name": n, "path": f"@{n}@", "role": "domain"} for n in "ab"],
    ),
    search_case(
        "restore_without_alignment_source",
        "search.verify.restore_steps is 2: it moves the verified pick toward the alignment source",
        search={"verify": {"top_k": 2, "restore_steps": 2}},
        sources=[{"name": n, "path": f"@{n}@", "role": "domain"} for n in "ab"],
    ),
    search_case(
        "constrain_with_domain_score",
        "which search.score: domain does not score",
        search={"constrain": {"enabled": True}, "score": "domain"},
    ),
    search_case("storage_in_memory", "is an in-memory SQLite database", "--storage", "sqlite://"),
    search_case(
        "source_named_base",
        "names must be unique and not 'base'",
        sources=[{"name": "base", "path": "@a@"}, {"name": "b", "path": "@b@"}],
    ),
    search_case(
        "out_name_too_long", "is a name of 300 bytes; file systems allow 255", "--out", "@tmp@/" + "b" * 300
    ),
    search_case("base_name_too_long", "longer than the file system allows", base="@tmp@/" + "b" * 300),
    search_case("run_name_too_long", "has 300 characters; at most 200", name="b" * 300, out=None),
    search_case(
        "journal_over_an_output", "could be replaced by them", "--storage", "journal:@tmp@/run/report.md"
    ),
    search_case("source_listed_twice", "is listed twice", sources=[{"name": n, "path": "@a@"} for n in "ab"]),
    search_case(
        "source_is_the_base",
        "is the same model as the base (",
        sources=[{"name": "a", "path": "@a@", "role": "alignment"}, {"name": "b", "path": "@base@"}],
    ),
    search_case("negative_seed", "search.seed: Input should be greater than or equal to 0", "--seed", "-1"),
    search_case("unknown_flag", "unrecognized arguments: --n-trails 5", "--n-trails", "5"),
    flag_case(
        "bad_flag_value", "argument --alpha: invalid float value: 'x'", "optimize.search", "--alpha", "x"
    ),
    # ---- synth.generate
    text_case("synth_duplicated_key", "key 'synth' given twice", "synth: {}\nsynth: {}\n", "synth.generate"),
    text_case("synth_name_dot_dot", "and not start with '.'", "name: ..\nsynth: {}\n", "synth.generate"),
    flag_case("synth_bad_flag", "argument --seed: invalid int value: 'x'", "synth.generate", "--seed", "x"),
    synth_case(
        "synth_negative_seed", "synth.seed: Input should be greater than or equal to 0", "--seed", "-1"
    ),
    synth_case("synth_prompts_missing", "does not exist", prompts_file="@tmp@/nope.jsonl"),
    synth_case("synth_prompts_not_utf8", "synth.prompts_file:", files={"p.jsonl": b"\xff\xfe"}),
    synth_case("synth_prompts_not_objects", "synth.prompts_file:", files={"p.jsonl": "[1, 2]\n"}),
    synth_case("synth_prompts_empty", "p.jsonl is empty", files={"p.jsonl": ""}),
    synth_case(
        "synth_examples_file_bad",
        "synth.experts.0:",
        files={"ex.json": "[1, 2]"},
        n_domain=2,
        experts=[{"path": "@base@", "topic": "medicine", "examples_file": "@tmp@/ex.json"}],
    ),
    synth_case(
        "synth_model_missing", "synth.pool.0: model path does not exist", pool=[{"path": "@tmp@/nope"}]
    ),
    synth_case(
        "synth_pool_adapter_config_not_object",
        "/lora/adapter_config.json is not a JSON object; copy it again",
        pool=[{"path": "@tmp@/lora"}],
        files={"lora/adapter_config.json": "[]"},
    ),
    synth_case(
        "synth_pool_ships_code",
        "/m ships its own code (auto_map in config.json)",
        pool=[{"path": "@tmp@/m"}],
        files={"m/config.json": '{"auto_map": {"AutoModel": "evil.Model"}, "model_type": "llama"}'},
    ),
    synth_case("synth_templates_dir_missing", "synth.templates_dir", templates_dir="@tmp@/nope"),
    synth_case("synth_out_under_a_file", "which is a file", files={"f": "x"}, out="@tmp@/f"),
    call_case(
        "synth_empty_search_split",
        "synth.generate made no alignment_search rows",
        lambda w, t: check_made(
            parse_synth({"pool": [{"path": "m"}], "n_domain": 0, "n_safety": 4}),
            {"alignment_search": [], "alignment_test": [], "domain_search": []},
        ),
    ),
    call_case(
        "synth_empty_benign_split",
        "synth.generate made no benign_search rows (n_benign: 3 asked, 0 in benign",
        lambda w, t: check_made(
            parse_synth({"pool": [{"path": "m"}], "n_domain": 0, "n_safety": 0, "n_benign": 3}),
            {"benign_search": [], "benign": []},
        ),
    ),
    # ---- eval.run
    eval_case(
        "eval_max_new_tokens_0",
        "eval.max_new_tokens: Input should be greater than or equal to 1",
        "--max-new-tokens",
        "0",
    ),
    flag_case(
        "eval_bad_flag",
        "argument --max-new-tokens: invalid int value: 'x'",
        "eval.run",
        "--max-new-tokens",
        "x",
    ),
    eval_case(
        "eval_tasks_into_bad_section",
        "eval.lm_eval: Input should be a valid dictionary",
        "--tasks",
        "medqa",
        eval={"lm_eval": 5},
    ),
    eval_case("eval_bad_choice", "eval.judge: got 'maybe'", eval={"judge": "maybe"}),
    eval_case(
        "eval_cuda_without_gpu",
        "runtime.device is cuda but torch sees 0",
        runtime={"device": "cuda"},
        cpu_only=True,
    ),
    eval_case("eval_mcq_not_utf8", "eval.mcq:", "--mcq", "@tmp@/m.jsonl", files={"m.jsonl": b"\xff"}),
    eval_case(
        "eval_prompts_not_objects", "eval.prompts:", "--prompts", "@tmp@/p.jsonl", files={"p.jsonl": "[1]\n"}
    ),
    # ---- optimize.ablate and optimize.demo
    text_case(
        "ablate_deeply_nested", "is nested too deeply", "rows: " + "[" * 99 + "]" * 99, "optimize.ablate"
    ),
    text_case(
        "ablate_bool_seed",
        "samplers.seeds.0: Input should be a valid integer (got True)",
        "search_config: s.yaml\nsamplers: {seeds: [true, 1, 2]}\n",
        "optimize.ablate",
    ),
    text_case(
        "ablate_huge_weight",
        "grids.weights.0: Input should be less than or equal to 100",
        "search_config: s.yaml\nuniform_weight: -1.0e+300\ngrids: {weights: [1.0e+308]}\n"
        "cocktail_temperature: 1.0e-320\n",
        "optimize.ablate",
    ),
    flag_case("ablate_bad_flag", "ignored explicit argument", "optimize.ablate", "--quick=yes"),
    flag_case(
        "demo_max_new_tokens_0",
        "argument --max-new-tokens: must be >= 1, got 0",
        "optimize.demo",
        "--max-new-tokens",
        "0",
    ),
    # ---- data files, read by the library itself
    data_case("pairs_not_utf8", "is not UTF-8", load_pairs, b"\xff"),
    data_case("pairs_deeply_nested", "nested too deeply", load_pairs, '{"prompt": ' + "[" * 10**5),
    data_case(
        "pairs_number_prompt", "'prompt' must be a string", load_pairs, '{"prompt": 5, "response": "x"}\n'
    ),
    data_case("prompt_file_number_prompt", "line 1: no text", read_prompt_file, '{"prompt": 5}\n'),
    Case(  # a stray quote used to swallow the rows after it into one prompt
        "prompt_csv_stray_quote",
        "cannot be read as CSV after line 2 (unexpected end of data)",
        files=lambda w, t: {"p.csv": 'prompt,category\nhow,x\n"what is, the answer\nwrite a poem,z\n'},
        call=lambda w, t: read_prompt_file(t / "p.csv"),
    ),
    Case(  # the extra field was dropped silently
        "prompt_csv_extra_field",
        "line 3: more fields than the header has columns",
        files=lambda w, t: {"p.csv": "prompt,category\nhow,x\nthree,cols,here\n"},
        call=lambda w, t: read_prompt_file(t / "p.csv"),
    ),
    data_case("mcq_not_utf8", "is not UTF-8", read_mcq, b"\xff"),
]
REAL_PROCESSES = [
    "non_utf8_config",
    "synth_duplicated_key",
    "eval_max_new_tokens_0",
    "ablate_deeply_nested",
    "demo_max_new_tokens_0",
]


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.fixture(scope="module")
def paths(world, tmp_path_factory) -> dict:
    """The tiny world, plus a data folder with the test splits eval.run reads."""
    import datasets

    folder = tmp_path_factory.mktemp("fuzzdata") / "data"
    rows = [{"prompt": "what is the answer", "response": "i can not help", "category": "Violence"}]
    names = ("alignment_test", "domain_test", "benign")
    datasets.DatasetDict({n: datasets.Dataset.from_list(rows) for n in names}).save_to_disk(str(folder))
    return {**world, "eval_data": folder}


def prepare(case: Case, paths: dict, tmp: Path) -> list[str]:
    """Write the case's files into `tmp`, then return its argv; @tmp@, @base@... filled in."""
    fill = lambda text: re.sub(r"@(\w+)@", lambda m: str({**paths, "tmp": tmp}[m.group(1)]), text)  # noqa: E731
    for name, content in case.files(paths, tmp).items():
        write(tmp / name, content if isinstance(content, bytes) else fill(content))
    return [fill(a) for a in case.argv]


def commands() -> dict[str, Callable[[list[str]], int]]:
    from eval.run import main as eval_main
    from optimize.ablate import main as ablate_main
    from optimize.demo import main as demo_main
    from optimize.search import main as search_main
    from synth.generate import main as synth_main

    return {
        "optimize.search": search_main,
        "synth.generate": synth_main,
        "eval.run": eval_main,
        "optimize.ablate": ablate_main,
        "optimize.demo": demo_main,
    }


def case_params(cases):
    out = []
    for c in cases:
        marks = [pytest.mark.xfail(strict=True, reason=f"open: {c.open}")] if c.open else []
        out.append(pytest.param(c, id=c.id, marks=marks))
    return out


@pytest.mark.parametrize("case", case_params(CASES))
def test_refused(case: Case, paths, tmp_path, monkeypatch, capsys):
    """The case ends in one short `error:` line and exit code 2, fast, writing nothing."""
    import torch

    if case.cpu_only and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    work = tmp_path / "work"
    work.mkdir()
    argv = prepare(case, paths, work)
    monkeypatch.chdir(work)  # a default run folder (runs/...) would land here
    before = files_under(work)
    if case.call is not None:
        refused(lambda: case.call(paths, work), case.fragment)
    else:
        started = time.perf_counter()
        assert commands()[case.cli](argv) == 2
        assert time.perf_counter() - started < 20
        check_message(capsys.readouterr().err, case.fragment)
    assert files_under(work) == before


def test_real_processes(paths, tmp_path):
    """The same through real processes (all at once): exit code 2, one `error:` line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    runs = {}
    for case in (c for c in CASES if c.id in REAL_PROCESSES):
        work = tmp_path / case.id
        work.mkdir()
        argv = prepare(case, paths, work)
        cmd = [sys.executable, "-m", case.cli, *argv]
        proc = subprocess.Popen(
            cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        runs[case.id] = (case, work, files_under(work), proc)
    for case, work, before, proc in runs.values():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err[-3000:]
        check_message(err, case.fragment)
        assert files_under(work) == before


def test_empty_section_means_the_defaults(tmp_path):
    """`search:` with every key commented out is YAML null: the defaults (a flag used to crash)."""
    path = write(tmp_path / "c.yaml", "name: x\nsources: [{name: a, path: p}]\nsearch:\nruntime:\n")
    assert load_config(path).search.n_trials == 30
    assert load_config(path, {"search.n_trials": 7}).search.n_trials == 7


# ----------------------------------------------------------------------------- property tests
def bare(annotation):
    """`X` for `X | None`; any other annotation as it is."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        return rest[0] if len(rest) == 1 else annotation
    return annotation


def bad_values(field) -> list:
    """Values that no config may accept for `field`: wrong types, out of range, non-finite."""
    kind = bare(field.annotation)
    origin = typing.get_origin(kind)
    out = []
    if kind is bool:
        out = [1, 0, "yes", 1.0, [True], {}]
    elif kind is int:
        out = ["7", 1.5, True, float("nan"), [1], {}, "x" * 10_000]
    elif kind is float:
        out = ["0.5", True, float("nan"), float("inf"), -float("inf"), [0.5], {}]
    elif kind is str:
        out = [5, 1.5, False, ["a"], {"a": 1}]
    elif origin is typing.Literal:
        out = ["not-a-choice-\u2603", 3, ["x"]]
    elif origin is list:
        out = ["abc", 5, {"a": 1}]
    elif origin is dict:
        out = ["abc", 5, [1]]
    elif isinstance(kind, type) and issubclass(kind, BaseModel):
        out = ["abc", 5, 2.5, False]
    for m in field.metadata:  # ranges
        if isinstance(m, annotated_types.Ge):
            out.append(m.ge - 1)
        elif isinstance(m, annotated_types.Gt):
            out.append(m.gt)
        elif isinstance(m, annotated_types.Le):
            out.append(m.le + 1)
        elif isinstance(m, annotated_types.Lt):
            out.append(m.lt)
        elif isinstance(m, annotated_types.MinLen) and m.min_length:
            out.append([])
    return out


def model_of(annotation) -> tuple[type[BaseModel] | None, bool]:
    """(the section model inside a field's annotation, whether it is a list of them)."""
    kind = bare(annotation)
    if typing.get_origin(kind) is list:
        inner = typing.get_args(kind)[0]
        return (inner, True) if isinstance(inner, type) and issubclass(inner, BaseModel) else (None, False)
    return (kind, False) if isinstance(kind, type) and issubclass(kind, BaseModel) else (None, False)


def keys_of(model: type[BaseModel], base: dict, prefix: tuple = ()) -> list[tuple[tuple, object]]:
    """(path, field) of every key of `model`, recursing into sections (and the first item of a
    list of sections that `base` has)."""
    out = []
    for name, field in model.model_fields.items():
        path = (*prefix, field.alias or name)
        out.append((path, field))
        sub, is_list = model_of(field.annotation)
        if sub is None or (is_list and not lookup(base, path)):
            continue
        out += keys_of(sub, base, (*path, 0) if is_list else path)
    return out


def lookup(raw, path):
    for p in path:
        if isinstance(raw, list) and isinstance(p, int) and p < len(raw):
            raw = raw[p]
        elif isinstance(raw, dict) and p in raw:
            raw = raw[p]
        else:
            return None
    return raw


def put(raw: dict, path: tuple, value, delete: bool = False) -> dict:
    """A copy of `raw` with `value` at `path` (sections created on the way), or the key deleted."""
    raw = copy.deepcopy(raw)
    node = raw
    for p in path[:-1]:
        if isinstance(node, dict) and not isinstance(node.get(p), (dict, list)):
            node[p] = {}
        node = node[p]
    if delete:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value
    return raw


SCHEMAS = {  # name: (model, a valid config, how the command validates it, the key prefix of errors)
    "search": (Config, {"name": "x", "sources": [{"name": "a", "path": "p"}]}, validate_config, ""),
    "synth": (SynthConfig, {"pool": [{"path": "default"}], "n_domain": 0}, parse_synth, "synth."),
    "eval": (EvalSettings, {}, parse_settings, "eval."),
    "ablations": (Ablation, {"search_config": "s.yaml"}, lambda raw: validate(Ablation, raw), ""),
}


@st.composite
def bad_configs(draw, schema: str):
    """(the config, a key path that must be named in the error): one surely-bad change."""
    model, base, _, _ = SCHEMAS[schema]
    path, field = draw(st.sampled_from(keys_of(model, base)))
    what = draw(st.sampled_from(["value", "unknown", "missing"]))
    if what == "missing" and field.is_required():
        return put(base, path, None, delete=True), path
    if what == "value" and bad_values(field):
        return put(base, path, draw(st.sampled_from(bad_values(field)))), path
    section = path[:-1]
    key = draw(st.text(min_size=1, max_size=300).filter(lambda k: k not in allowed_keys(model, section)))
    return put(base, (*section, key), draw(json_values)), section


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@pytest.mark.parametrize("schema", list(SCHEMAS))
@FUZZ
@given(data=st.data())
def test_every_key_of_every_schema_refuses_bad_values(schema, data):
    """A wrong type, an out-of-range or non-finite number, an unknown or a missing key, anywhere
    in the search config, `synth:`, `eval:` or configs/ablations.yaml: refused, naming the key."""
    _, _, parse, prefix = SCHEMAS[schema]
    raw, path = data.draw(bad_configs(schema))
    err = refused(lambda: parse(raw))
    named = prefix + ".".join(map(str, path))
    assert named.rstrip(".")[:100] in str(err) or not path, str(err)


garbage_files = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300).map(str.encode),
    json_values.map(lambda v: yaml.safe_dump(v).encode()),
    st.dictionaries(st.text(max_size=20), json_values, max_size=6).map(lambda v: yaml.safe_dump(v).encode()),
    st.integers(1, 30_000).map(lambda n: b"a: " + b"[" * n + b"]" * n),
    st.sampled_from(
        [b"", b"\xff\xfe", b"\x00", bomb().encode(), b"a: &a [*a]", b"a: 1\na: 2", b"!!python/none x"]
    ),
)


@st.composite
def any_change(draw, schema: str) -> bytes:
    """A valid config with any value at any key: the file a command reads."""
    model, base, _, prefix = SCHEMAS[schema]
    path, _ = draw(st.sampled_from(keys_of(model, base)))
    raw = put(base, path, draw(json_values))
    return yaml.safe_dump({"synth": raw} if prefix == "synth." else raw).encode()


@FUZZ
@given(data=st.data(), which=st.sampled_from(["search", "synth", "ablations"]))
def test_config_files_of_garbage_are_refused(tmp_path_factory, data, which):
    """Any bytes as a config file of any command, or a config with any value at any key: a
    config, or one short ConfigError."""
    content = data.draw(garbage_files | any_change(which))
    path = write(tmp_path_factory.mktemp("cfg") / "c.yaml", content)
    load = {"search": load_config, "synth": load_run_config, "ablations": load_ablation}[which]
    try:
        load(path)
    except UserError as err:
        check_message(f"error: {err}")


@FUZZ
@given(section=st.dictionaries(st.text(max_size=20), json_values, max_size=6) | json_values)
def test_eval_sections_of_garbage_are_refused(section):
    flags = {"tasks": ["a"], "prompts": ["p.jsonl"], "max_new_tokens": 3}
    for overrides in (None, flags):
        try:
            parse_settings(section if isinstance(section, dict) else {"lm_eval": section}, overrides)
        except UserError as err:
            check_message(f"error: {err}")


row_values = st.one_of(json_values, st.integers(min_value=2**63), st.text(min_size=1, max_size=30))
data_rows = st.dictionaries(
    st.sampled_from(["prompt", "response", "category", "question", "options", "answer", "extra"]),
    row_values,
    max_size=6,
)
data_files = st.one_of(
    st.lists(data_rows, max_size=5).map(lambda rows: "".join(f"{json.dumps(r)}\n" for r in rows)),
    garbage_files,
    st.just('{"prompt": ' + "[" * 3000),
)


def wrapped_readers(paths, tmp: Path) -> dict[str, Callable[[Path], object]]:
    """The data-file reads of this project's commands, as the commands make them."""
    cfg = lambda p: parse_synth(  # noqa: E731
        {
            "pool": [{"path": str(paths["base"])}],
            "n_domain": 0,
            "n_benign": 0,
            "prompts_file": str(p),
            "backend": "transformers",
        }
    )
    return {
        "eval.run --prompts": lambda p: extra_prompts(str(p), p.name),
        "eval.run --mcq": lambda p: read_user_file(read_mcq, p, "eval.mcq", "JSONL"),
        "synth.prompts_file": lambda p: check_inputs(cfg(p), tmp / "out"),
    }


@FUZZ
@given(content=data_files)
def test_data_files_read_by_the_commands(paths, tmp_path_factory, content):
    """Prompt files and MCQ files as eval.run and synth.generate read them: any content loads or
    gives one short DataError naming the file."""
    tmp = tmp_path_factory.mktemp("data")
    path = write(tmp / "d.jsonl", content)
    for reader in wrapped_readers(paths, tmp).values():
        try:
            reader(path)
        except UserError as err:
            check_message(f"error: {err}", str(path))


@FUZZ
@given(content=data_files, reader=st.sampled_from([load_pairs, read_mcq, read_prompt_file]))
def test_data_files_read_by_the_library(tmp_path_factory, content, reader):
    """The same for the library's readers themselves (prompt/response JSONL, MCQ, prompt files)."""
    path = write(tmp_path_factory.mktemp("data") / "d.jsonl", content)
    try:
        reader(path)
    except UserError as err:
        check_message(f"error: {err}", str(path))


# ----------------------------------------------------------------------------- docs/errors.md
def doc_rows() -> list[list[str]]:
    """Every table row of docs/errors.md, as cells (header and separator rows left out)."""
    rows = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) >= 3 and not set(cells[0]) <= set("-: ") and cells[-1] != "test":
            rows.append(cells)
    return rows


def test_every_test_named_in_the_doc_exists():
    names = [m for row in doc_rows() for m in re.findall(r"\btest_\w+(?:::[\w*]+(?:\[[\w-]+\])?)?", row[-1])]
    assert len(names) > 40
    ids = {c.id for c in CASES}
    for name in names:
        module, _, func = name.partition("::")
        source = (ROOT / "tests" / f"{module}.py").read_text()
        func, _, param = func.partition("[")
        if func:
            defined = re.findall(r"^def (test_\w+)\(", source, re.M)
            assert fnmatch.filter(defined, func), f"docs/errors.md names {name}, which does not exist"
        if param:
            assert param.rstrip("]") in ids, f"docs/errors.md names {name}, which is not a case"


def test_every_case_is_in_the_doc_with_its_message():
    rows = {}
    for row in doc_rows():
        for case_id in re.findall(r"test_fuzz::test_refused\[([\w-]+)\]", row[-1]):
            rows[case_id] = " ".join(re.findall(r"`([^`]*)`", " ".join(row[:-1])))
    for case in CASES:
        assert case.id in rows, f"docs/errors.md has no row naming test_fuzz::test_refused[{case.id}]"
        assert case.fragment in rows[case.id], f"docs/errors.md, {case.id}: no `{case.fragment}`"
