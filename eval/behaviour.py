"""Generation-based behaviour of a model held in memory: does it refuse harmful prompts, does it
wrongly refuse benign ones. Greedy decoding of the search's working model as it is, with no
export: by transformers on left-padded batches, or by a vLLM engine in this process whose weights
are overwritten with the model's before each call (`VLLMGreedy`: 1.8x faster on the demo's
workload, BENCHMARKS.md)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from core.errors import ConfigError
from core.models import contiguous_head_input, dtype_name
from core.vllm_env import (
    close_in_process_llm,
    cpu_env,
    in_process_llm,
    reload_weights,
    vllm_available,
    vllm_folder,
)
from eval.judge import refusal_rate


@torch.inference_mode()
def greedy_answers(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64, batch_size: int = 16
) -> list[str]:
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad less
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = [""] * len(texts)
    device = next(model.parameters()).device
    try:
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc="generating", unit="batch", leave=False, disable=len(starts) < 2):
            idx = order[start : start + batch_size]
            enc = tokenizer(
                [texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(device)
            with contiguous_head_input(model):
                gen = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=pad,
                )
            decoded = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            for i, text in zip(idx, decoded):
                out[i] = text.strip()
    finally:
        tokenizer.padding_side = side
    return out


GREEDY_KV_CACHE_GB = 1  # VLLM_CPU_KVCACHE_SPACE unless set: 270 answers of 32 tokens use a fraction


class VLLMGreedy:
    """Greedy answers of in-memory models by one vLLM engine, started once on the base model's
    folder in this process: before each call the model's weights replace the engine's
    (`core.vllm_env.reload_weights`). CPU only for now: on a GPU the engine would reserve the
    memory the search uses."""

    def __init__(
        self, folder, dtype: torch.dtype, max_model_len: int | None = None, trust_remote_code: bool = False
    ):
        self.dtype = dtype
        with cpu_env(GREEDY_KV_CACHE_GB):
            self.llm = in_process_llm(
                model=str(folder),
                dtype=dtype_name(str(dtype).removeprefix("torch.")),
                max_model_len=max_model_len,
                enforce_eager=True,
                load_format="safetensors",
                trust_remote_code=trust_remote_code,
                seed=0,
            )

    def __call__(self, model, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        from vllm import SamplingParams

        reload_weights(self.llm, model)
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        convs = [[{"role": "user", "content": p}] for p in prompts]
        return [r.outputs[0].text.strip() for r in self.llm.chat(convs, params, use_tqdm=False)]

    def close(self) -> None:
        close_in_process_llm(self)


def vllm_generation(kind: str, device: str) -> bool:
    """Does `runtime.generation: kind` on `device` start an in-process vLLM engine?"""
    return kind == "vllm" or (kind == "auto" and device == "cpu" and vllm_available())


class Generation:
    """The greedy generator of a search, started on first use: `kind` auto (vLLM on CPU when it
    is installed, else transformers), vllm, or transformers (runtime.generation)."""

    def __init__(self, kind: str, base_path, device: str, trust_remote_code: bool = False):
        if kind == "vllm" and device != "cpu":
            raise ConfigError(
                f"runtime.generation: vllm runs on the CPU only (on {device} its engine would reserve the "
                "memory the search uses); set runtime.generation: auto or transformers"
            )
        self.kind, self.base_path, self.trust = kind, base_path, trust_remote_code
        self.uses_vllm = vllm_generation(kind, device)
        self.engine: VLLMGreedy | None = None

    def describe(self) -> str:
        if not self.uses_vllm:
            return "transformers generate"
        from vllm import __version__

        return f"vLLM {__version__} in this process, each merge's weights loaded in place"

    def answers(
        self, model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int
    ) -> list[str]:
        if not self.uses_vllm:
            return greedy_answers(model, tokenizer, prompts, max_new_tokens, batch_size)
        try:
            dtype = next(model.parameters()).dtype
            if self.engine is None or self.engine.dtype != dtype:
                self.close()
                print("[alignmerge] starting the vLLM engine for greedy answers (once)", file=sys.stderr)
                folder = vllm_folder(self.base_path, trust_remote_code=self.trust)
                self.engine = VLLMGreedy(folder, dtype, trust_remote_code=self.trust)
            return self.engine(model, prompts, max_new_tokens)
        except Exception as err:  # noqa: BLE001 - a broken vLLM install must not cost a finished search
            if self.kind == "vllm":
                raise
            print(
                f"[alignmerge] WARNING vLLM failed ({type(err).__name__}: {str(err)[:300]}); greedy answers "
                "by transformers from now on (runtime.generation: transformers skips vLLM)",
                file=sys.stderr,
            )
            self.close()
            self.uses_vllm = False
            return greedy_answers(model, tokenizer, prompts, max_new_tokens, batch_size)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def refusals(
    model,
    tokenizer,
    prompts: Sequence[str],
    judge,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    generation: Generation | None = None,
) -> dict:
    """Share of prompts the model refuses (by `judge`), with the answers and verdicts; the answers
    by `generation` when given, else by transformers."""
    return refusals_by_group(model, tokenizer, {"": prompts}, judge, max_new_tokens, batch_size, generation)[
        ""
    ]


def refusals_by_group(
    model,
    tokenizer,
    groups: dict[str, Sequence[str]],
    judge,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    generation: Generation | None = None,
) -> dict[str, dict]:
    """`refusals` of each named group of prompts, all answered in one generation call (a vLLM
    engine schedules them together and loads the model's weights once)."""
    prompts = [p for group in groups.values() for p in group]
    if generation is None:
        answers = greedy_answers(model, tokenizer, prompts, max_new_tokens, batch_size)
    else:
        answers = generation.answers(model, tokenizer, prompts, max_new_tokens, batch_size)
    verdicts = judge.judge(prompts, answers)
    out, start = {}, 0
    for name, group in groups.items():
        end = start + len(group)
        vs = verdicts[start:end]
        share = sum(v.refusal for v in vs) / len(vs) if vs else float("nan")
        out[name] = {"share": share, "answers": answers[start:end], "verdicts": [v.label for v in vs]}
        start = end
    return out


def _by(rows: list[dict], verdicts, key: str, answered: bool = False) -> dict:
    groups: dict[str, list] = {}
    for r, v in zip(rows, verdicts):
        groups.setdefault(r.get(key) or "unspecified", []).append(v)
    field = "answered" if answered else "refused"
    sign = (lambda x: 1 - x) if answered else (lambda x: x)
    return {k: {"n": len(vs), field: sign(refusal_rate(vs))} for k, vs in sorted(groups.items())}


def refusal_summary(rows: list[dict], verdicts, answered: bool = False) -> dict:
    """Share refused (or answered, for benign prompts) overall, per category and per prompt set."""
    share = refusal_rate(verdicts)
    out = {"n": len(verdicts), "refused": share}
    if answered:
        out["answered"] = 1 - share
    out["by_category"] = _by(rows, verdicts, "category", answered)
    if any("set" in r for r in rows):
        out["by_set"] = _by(rows, verdicts, "set", answered)
    return out
