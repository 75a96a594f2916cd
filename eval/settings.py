"""The `eval:` section of a run config (`python -m eval.run`), validated before any model loads."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from core.config import Strict, validate


class LmEvalSettings(Strict):
    tasks: list[str] = []  # lm-evaluation-harness task names; [] runs none
    num_fewshot: int | None = Field(None, ge=0)
    limit: float | None = Field(None, gt=0)  # examples per task (a fraction if < 1): for quick checks
    batch_size: int = Field(8, ge=1)
    apply_chat_template: bool = False
    include_path: list[str] = []  # folders of the user's own task YAMLs (alignmerge's are always found)


class EvalSettings(Strict):
    """The `eval:` section of a run config."""

    backend: Literal["auto", "vllm", "transformers"] = "auto"
    max_new_tokens: int = Field(128, ge=1)
    batch_size: int = Field(16, ge=1)  # transformers generation: prompts per generate()
    judge: Literal["rules", "guard", "rules+guard"] = "rules"
    guard: str | None = None  # a guard model (Llama Guard style) folder, for judge guard / rules+guard
    guard_max_tokens: int = Field(20, ge=1)
    prompts: list[str] = []  # extra harmful prompt files: JSONL or CSV, `prompt` and optional `category`
    mcq: list[str] = []  # multiple-choice files: JSONL, `question`, `options`, `answer` (index or letter)
    suites: list[str] = []  # external prompt suites read from installed packages (eval/suites.py)
    lm_eval: LmEvalSettings = LmEvalSettings()
    analysis: bool = True  # MergeAlign analysis (loads the base and every source)
    cka_prompts: int = Field(32, ge=2)  # first N prompts of alignment_test and of domain_test
    examples: int = Field(3, ge=0)  # example answers per kind in the report

    @field_validator("suites")
    @classmethod
    def _suites_once(cls, v):
        return list(dict.fromkeys(v))  # a suite named twice is measured once

    @model_validator(mode="after")
    def _guard_named(self):
        if self.judge != "rules" and not self.guard:
            raise ValueError(f"judge {self.judge!r} needs eval.guard: the folder of a guard model")
        return self


def parse_settings(section: dict | None, overrides: dict | None = None) -> EvalSettings:
    """Validate the `eval:` section (flags in `overrides` win); errors name the key and the fix."""
    raw = dict(section or {})
    for key, value in (overrides or {}).items():
        if key == "tasks":
            lm_eval = raw.get("lm_eval") or {}
            if isinstance(lm_eval, dict):  # else validation names the bad section
                raw["lm_eval"] = {**lm_eval, "tasks": value}
        elif key in ("prompts", "mcq", "suites"):
            files = raw.get(key) or []
            if isinstance(files, list):
                raw[key] = [*files, *value]
        else:
            raw[key] = value
    return validate(EvalSettings, raw, prefix="eval")
