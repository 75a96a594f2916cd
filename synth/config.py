"""The `synth:` section of a run config, validated before any model loads.

    name: medbio                       # top-level keys read by synth: name, out (run folder)
    synth:
      backend: auto                    # auto | vllm | transformers
      seed: 0
      generator: {path: default}       # writes harmful and benign-but-risky prompts
      pool: [{path: default, name: base}, {path: runs/experts/med-lora, name: medical}]
      experts:
        - {path: runs/experts/med-lora, name: medical, topic: medicine, examples: [...]}
      n_safety: 200                    # rows in alignment_search + alignment_test
      n_domain: 200
      n_benign: 50
      test_fraction: 0.2
      judge: {kind: rules}             # rules | guard | rules+guard (guard: {path: ...})

Every key is optional except `pool` (and `experts` when `n_domain > 0`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from core.config import Name, Seed, Strict, UserPath, apply_overrides, clip, read_yaml_mapping, validate
from core.errors import ConfigError
from synth.taxonomy import HARM_CATEGORIES

# Upper bounds of n_* and oversample: every request is built (~0.1 ms each) before the first model
# loads; 10^5 rows x oversample 100 is 10^7 requests, days of generation already.
MAX_ROWS = 100_000


class ModelSpec(Strict):
    path: str = Field(description="HF folder, .gguf file, LoRA adapter folder, or `default`")
    name: str = ""
    base: str | None = Field(None, description="base model of a LoRA adapter")


class ExpertSpec(ModelSpec):
    topic: str = Field(min_length=1)
    examples: list[str] = Field(default_factory=list, description="in-context exam questions")
    examples_file: str | None = Field(None, description="JSON list or JSONL/CSV with `question`")
    questions_file: str | None = Field(
        None,
        description="exam questions (JSONL/CSV `question`/`prompt`) the expert answers instead of "
        "writing its own: for experts too small to write good questions",
    )

    @model_validator(mode="after")
    def _has_examples(self):
        if not self.examples and not self.examples_file and not self.questions_file:
            who = self.name or self.path
            raise ValueError(f"expert {who!r}: give `examples`, `examples_file` or `questions_file`")
        return self


class SamplingSpec(Strict):
    temperature: float = Field(0.0, ge=0)
    max_tokens: int = Field(512, ge=1)
    top_p: float = Field(1.0, gt=0, le=1)


class JudgeSpec(Strict):
    kind: Literal["rules", "guard", "rules+guard"] = "rules"
    guard: ModelSpec | None = Field(None, description="guard model, e.g. a Llama Guard folder")
    guard_max_tokens: int = Field(20, ge=1)

    @model_validator(mode="after")
    def _guard_named(self):
        if self.kind != "rules" and self.guard is None:
            raise ValueError(f"judge.kind is {self.kind!r}: set judge.guard.path to a local model")
        return self


class EngineSpec(Strict):
    # auto: bfloat16 where the device computes it natively (GPUs, AVX512-BF16/AMX CPUs), else
    # float32 (vLLM on an AVX2 CPU in bfloat16 generates ~24 tokens/s for SmolLM2-135M)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_model_len: int = Field(2048, ge=64)
    batch_size: int = Field(8, ge=1, description="transformers backend: prompts per generate()")
    chunk_size: int = Field(256, ge=1, description="requests per engine call between cache writes")
    enforce_eager: bool | None = None
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    tensor_parallel_size: int = Field(1, ge=1)
    kv_cache_gb: int = Field(2, ge=1, description="vLLM on CPU: KV cache (GiB)")
    cpu_all_cores: bool = Field(True, description="vLLM on CPU: no core reserved for the frontend")
    # vLLM and a LoRA pool model: served as an adapter (Punica kernels), or merged into the base's
    # weights, which are replaced in place for each adapter. auto: merged on CPU, where vLLM's LoRA
    # kernels are slow (110 answers unfinished after 6 min vs ~1 min merged), adapter on GPU.
    lora: Literal["auto", "adapter", "merged"] = "auto"
    cache_dir: str | None = None
    # The loader policy; load_run_config takes it from the run's `runtime:` section, so one run
    # YAML has one policy for synth, the search and eval.
    allow_pickle: bool = False
    trust_remote_code: bool = False


class SynthConfig(Strict):
    backend: Literal["auto", "vllm", "transformers"] = "auto"
    seed: Seed = 0
    generator: ModelSpec = Field(default_factory=lambda: ModelSpec(path="default"))
    pool: list[ModelSpec] = Field(min_length=1, description="models whose refusals are kept")
    experts: list[ExpertSpec] = Field(default_factory=list)
    prompts_file: str | None = Field(
        None, description="your harmful prompts (JSONL or CSV, column `prompt`): skips generation"
    )
    benign_file: str | None = Field(
        None, description="your benign prompts (JSONL or CSV, column `prompt`): skips generation"
    )
    categories: list[str] = Field(default_factory=lambda: list(HARM_CATEGORIES))
    n_safety: int = Field(200, ge=0, le=MAX_ROWS)
    n_domain: int = Field(200, ge=0, le=MAX_ROWS)
    n_benign: int = Field(50, ge=0, le=MAX_ROWS)
    # 0: every row is a search row (the test splits live elsewhere, e.g. data.test_dir)
    test_fraction: float = Field(0.2, ge=0, lt=1)
    oversample: float = Field(
        2.0, ge=1, le=100, description="prompts requested per row wanted; at most 100 (1% of them usable)"
    )
    questions_per_request: int = Field(4, ge=1, description="`n` of each question request")
    near_dup_threshold: float = Field(0.7, gt=0, le=1, description="word 3-gram Jaccard")
    structured_output: Literal["auto", "off"] = Field(
        "auto", description="auto: regex-constrained JSON on vLLM (no JSON-schema whitespace loop)"
    )
    prompt_sampling: SamplingSpec = SamplingSpec(temperature=0.8, max_tokens=128)
    question_sampling: SamplingSpec = SamplingSpec(temperature=0.8, max_tokens=128)
    answer_sampling: SamplingSpec = SamplingSpec(temperature=0.0, max_tokens=512)
    judge: JudgeSpec = JudgeSpec()
    drop_domain_refusals: bool = True
    templates_dir: str | None = Field(None, description="folder overriding packaged templates")
    benign_seeds: list[str] | None = None
    engine: EngineSpec = EngineSpec()

    @field_validator("categories")
    @classmethod
    def _known_categories(cls, v: list[str]) -> list[str]:
        unknown = [c for c in v if c not in HARM_CATEGORIES]
        if unknown or not v:
            raise ValueError(f"unknown harm categories {clip(unknown)}; allowed: {list(HARM_CATEGORIES)}")
        return v

    @model_validator(mode="after")
    def _experts_for_domain(self):
        if self.n_domain > 0 and not self.experts:
            raise ValueError("n_domain > 0 needs at least one entry in `experts` (or n_domain: 0)")
        return self


def parse_synth(section: dict | None, prefix: str = "synth") -> SynthConfig:
    return validate(SynthConfig, section or {}, prefix=prefix)


class RunPlace(Strict):
    """The top-level keys synth reads besides `synth:`: where the run folder is."""

    name: Name
    out: UserPath | None = None  # ~ expanded, as the search reads it


def load_run_config(path: str | Path, overrides: dict | None = None) -> tuple[SynthConfig, str, Path]:
    """(synth config, run name, run folder) from a whole run YAML (with dotted `overrides`, as
    `--set` gives them); other top-level keys belong to other parts of the project and are
    ignored here."""
    path = Path(path)
    raw = apply_overrides(read_yaml_mapping(path), overrides)
    if "synth" not in raw:
        raise ConfigError(f"{path}: no `synth:` section")
    given = {k: raw[k] for k in ("name", "out") if raw.get(k) is not None}
    place = validate(RunPlace, {"name": path.stem, **given}, str(path))
    synth = raw["synth"]
    runtime = raw.get("runtime")
    if isinstance(synth, dict) and isinstance(runtime, dict):
        policy = {k: runtime[k] for k in ("allow_pickle", "trust_remote_code") if k in runtime}
        engine = synth.get("engine") if isinstance(synth.get("engine"), dict) else {}
        synth = {**synth, "engine": {**policy, **engine}} if policy else synth
    return parse_synth(synth), place.name, Path(place.out or Path("runs") / place.name)


def to_jsonable(cfg: SynthConfig) -> dict:
    return json.loads(cfg.model_dump_json())
