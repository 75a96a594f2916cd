"""Generation backends with one interface: vLLM's offline engine, and transformers as a fallback.

    engine = open_engine(ModelRef(...), backend="auto", settings=EngineSettings())
    texts = engine.chat(conversations, [Sampling(...), ...])   # one list of n texts per request
    engine.close()

A conversation is a list of `{"role", "content"}` messages. When its last message is an
assistant message, the model *continues* it (a prefill such as `{"Question": "`); the returned
text is the continuation only. `run_cached` adds resumability on top: every result is appended
to a JSONL cache as soon as its chunk finishes, and a rerun generates only what is missing.
"""

from __future__ import annotations

import gc
import sys
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from core.errors import ModelLoadError
from core.models import (
    adapter_config,
    contiguous_head_input,
    dtype_name,
    load_model,
    load_tokenizer,
    model_format,
    resolve_device,
    resolve_dtype,
    resolve_model_path,
)
from core.vllm_env import (
    close_in_process_llm,
    cpu_env,
    in_process_llm,
    reload_weights,
    vllm_available,
    vllm_folder,
)

Conversation = list[dict[str, str]]


@dataclass(frozen=True)
class Sampling:
    """What `SamplingParams` takes: temperature 0 is greedy; `seed` makes sampling repeatable.
    `regex` constrains the output (vLLM structured outputs); the transformers backend ignores it."""

    temperature: float = 0.0
    max_tokens: int = 256
    n: int = 1
    seed: int | None = None
    top_p: float = 1.0
    regex: str | None = None


@dataclass(frozen=True)
class ModelRef:
    """A model to generate with: `path` is an HF folder, a .gguf file or `default`; for a LoRA
    adapter folder, `base` is the model it applies to (read from adapter_config.json if unset)."""

    path: str
    name: str = ""
    base: str | None = None

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.path == "default":
            return "SmolLM2-135M-Instruct"
        return Path(self.path).name or self.path


@dataclass(frozen=True)
class EngineSettings:
    dtype: str = "auto"  # auto: bfloat16 where native, else float32 (core.models.dtype_name)
    max_model_len: int = 2048
    batch_size: int = 8  # transformers backend: prompts per generate() call
    chunk_size: int = 256  # requests per engine call between two cache writes
    enforce_eager: bool | None = None  # None: True on CPU (no compile), vLLM's default on GPU
    gpu_memory_utilization: float = 0.85
    tensor_parallel_size: int = 1
    kv_cache_gb: int = 2  # VLLM_CPU_KVCACHE_SPACE when not set in the environment
    cpu_all_cores: bool = True  # vLLM on CPU: compute on every core instead of reserving one
    lora: str = "auto"  # vLLM and LoRA models: adapter | merged (in place) | auto (merged on CPU)
    cache_dir: str | None = None  # where GGUF models are materialized for vLLM
    allow_pickle: bool = False  # pickled .bin weights (models, adapters); core.models.model_format
    trust_remote_code: bool = False  # a model folder's own Python (auto_map)


def resolve_backend(backend: str) -> str:
    if backend == "auto":
        if vllm_available():
            return "vllm"
        warnings.warn(
            "vllm is not installed: using the (much slower) transformers backend. "
            "Install `vllm` (GPU) or `vllm-cpu` (CPU) for speed.",
            stacklevel=2,
        )
        return "transformers"
    if backend == "vllm" and not vllm_available():
        raise RuntimeError("backend: vllm, but `import vllm` fails; install vllm or vllm-cpu")
    return backend


def lora_base(ref: ModelRef) -> str | None:
    """The base model of a LoRA adapter folder, or None when `ref` is a full model. The adapter
    may be a Hub id in the local cache; its base is a path or a Hub id, resolved by
    `core.models.resolve_model_path` (the default model's Hub id is the packaged GGUF)."""
    p = resolve_model_path(ref.path)
    cfg = p / "adapter_config.json"
    if p.is_file() or not cfg.exists():
        return None
    if ref.base:
        return ref.base
    base = adapter_config(p).get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"{p}: adapter_config.json names no base model; set `base:` in the config")
    return base


def checked_base(ref: ModelRef, settings: EngineSettings) -> str | None:
    """The loader policy of every stage (pickled weights, remote code: `core.models.model_format`)
    on the model and, for a LoRA adapter, on its base, before anything loads. Returns the base."""
    model_format(resolve_model_path(ref.path), settings.allow_pickle, settings.trust_remote_code)
    if base := lora_base(ref):  # a name: checked by model_format (core.adapters)
        model_format(resolve_model_path(base), settings.allow_pickle, settings.trust_remote_code)
    return base


def merged_lora(base: str, ref: ModelRef, dtype, device: str, policy: tuple[bool, bool]):
    """The base with the LoRA adapter `ref` merged into its weights (peft), both loaded under the
    loader policy (checked by `checked_base` before)."""
    from peft import PeftModel

    model = load_model(base, dtype, device, *policy)
    return PeftModel.from_pretrained(model, str(resolve_model_path(ref.path))).merge_and_unload().eval()


class Engine:
    """Base class: `chat` returns, per conversation, its `n` generated texts."""

    ref: ModelRef
    backend: str = ""

    def chat(self, conversations: Sequence[Conversation], sampling: Sequence[Sampling]) -> list[list[str]]:
        raise NotImplementedError

    def serves(self, ref: ModelRef) -> bool:  # can it answer as `ref` without another load?
        return same_model(self.ref, ref)

    def use(self, ref: ModelRef) -> None:  # answer as `ref` from now on (it serves it)
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _continues(conv: Conversation) -> bool:
    return bool(conv) and conv[-1]["role"] == "assistant"


class TransformersEngine(Engine):
    """`model.generate` on left-padded batches. Sampling is seeded per batch (with the seed of the
    batch's first request), so sampled texts differ from vLLM's, greedy ones should not much."""

    backend = "transformers"

    def __init__(self, ref: ModelRef, settings: EngineSettings):
        self.ref, self.settings = ref, settings
        self.device = resolve_device("auto")
        dtype = resolve_dtype(settings.dtype)
        base = checked_base(ref, settings)
        policy = (settings.allow_pickle, settings.trust_remote_code)
        if base is None:
            self.model = load_model(ref.path, dtype, self.device, *policy)
            self.tokenizer = load_tokenizer(ref.path, settings.trust_remote_code)
        else:
            self.model = merged_lora(base, ref, dtype, self.device, policy)
            self.tokenizer = load_tokenizer(base, settings.trust_remote_code)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def _render(self, conv: Conversation) -> str:
        cont = _continues(conv)
        return self.tokenizer.apply_chat_template(
            conv, tokenize=False, add_generation_prompt=not cont, continue_final_message=cont
        )

    def chat(self, conversations, sampling):
        import torch

        texts = [self._render(c) for c in conversations]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths batch well
        out: list[list[str]] = [[] for _ in texts]
        bs = self.settings.batch_size
        for start in range(0, len(order), bs):
            idx = order[start : start + bs]
            groups: dict[Sampling, list[int]] = {}
            for i in idx:  # one generate() per distinct setting (seed aside) in the batch
                groups.setdefault(_without_seed(sampling[i]), []).append(i)
            for sp, ids in groups.items():
                seed = sampling[ids[0]].seed
                if seed is not None:
                    torch.manual_seed(seed)
                enc = self.tokenizer(
                    [texts[i] for i in ids],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=False,
                ).to(self.device)
                kwargs = {
                    "max_new_tokens": sp.max_tokens,
                    "num_return_sequences": sp.n,
                    "pad_token_id": self.tokenizer.pad_token_id,
                }
                if sp.temperature > 0:
                    # top_k=0: no top-k cut, like vLLM (transformers' default is 50)
                    kwargs.update(do_sample=True, temperature=sp.temperature, top_p=sp.top_p, top_k=0)
                else:
                    kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
                with torch.inference_mode(), contiguous_head_input(self.model):
                    gen = self.model.generate(**enc, **kwargs)
                new = gen[:, enc["input_ids"].shape[1] :]
                decoded = self.tokenizer.batch_decode(new, skip_special_tokens=True)
                for j, i in enumerate(ids):
                    out[i] = decoded[j * sp.n : (j + 1) * sp.n]
        return out

    def close(self) -> None:
        del self.model
        gc.collect()


def _without_seed(s: Sampling) -> Sampling:
    return Sampling(s.temperature, s.max_tokens, s.n, None, s.top_p, s.regex)


class VLLMEngine(Engine):
    """vLLM's offline `LLM.chat`, all requests of a chunk in one call with per-request
    `SamplingParams`. GGUF models (and `default`) are first written as a safetensors folder."""

    backend = "vllm"

    def __init__(self, ref: ModelRef, settings: EngineSettings):
        import torch
        from vllm import LLM

        gpu = torch.cuda.is_available()
        env = nullcontext() if gpu else cpu_env(settings.kv_cache_gb, settings.cpu_all_cores)
        self.ref, self.settings = ref, settings
        base = checked_base(ref, settings)
        model_path = vllm_folder(base or ref.path, settings.cache_dir, settings.trust_remote_code)
        eager = not gpu if settings.enforce_eager is None else settings.enforce_eager
        kwargs = {
            "model": str(model_path),
            "dtype": dtype_name(settings.dtype),
            "max_model_len": settings.max_model_len,
            "enforce_eager": eager,
            "tensor_parallel_size": settings.tensor_parallel_size,
            "trust_remote_code": settings.trust_remote_code,
        }
        if not settings.allow_pickle:  # vLLM would fall back to *.bin weights
            kwargs["load_format"] = "safetensors"
        if gpu:
            kwargs["gpu_memory_utilization"] = settings.gpu_memory_utilization
        self.base, self.lora, self.max_rank, self.loras = base, None, 0, 0
        self.serving: ModelRef | None = None  # the adapter answering now
        lora_mode = settings.lora if settings.lora != "auto" else "adapter" if gpu else "merged"
        self.merged = base is not None and lora_mode == "merged"
        if self.merged:  # the engine holds the base; each adapter is merged into it in place (`use`)
            with env:
                self.llm = in_process_llm(**kwargs)
            self.use(ref)
            return
        if base is not None:  # with room for other adapters of the base: one engine serves them all
            self.max_rank = max(MAX_LORA_RANK, lora_rank(ref))
            kwargs.update(enable_lora=True, max_lora_rank=self.max_rank)
            self.use(ref)
        with env:
            self.llm = LLM(**kwargs)

    def serves(self, ref: ModelRef) -> bool:
        lora = self.base is not None and lora_base(ref) == self.base
        return same_model(self.ref, ref) or (lora and (self.merged or lora_rank(ref) <= self.max_rank))

    def use(self, ref: ModelRef) -> None:
        from vllm.lora.request import LoRARequest

        if self.base is None or (self.serving is not None and same_model(self.serving, ref)):
            return  # a full model, or this adapter already
        tqdm.write(f"[synth] {ref.label}: served by the loaded engine (a LoRA of its base)", file=sys.stderr)
        checked_base(ref, self.settings)  # the loader policy, on this adapter too
        self.ref = self.serving = ref
        if self.merged:
            policy = (self.settings.allow_pickle, self.settings.trust_remote_code)
            reload_weights(
                self.llm, merged_lora(self.base, ref, resolve_dtype(self.settings.dtype), "cpu", policy)
            )
            return
        self.loras += 1
        self.lora = LoRARequest(ref.label, self.loras, str(Path(resolve_model_path(ref.path)).resolve()))

    def chat(self, conversations, sampling):
        from vllm import SamplingParams

        params = []
        for s in sampling:
            extra = {}
            if s.regex:
                from vllm.sampling_params import StructuredOutputsParams

                extra["structured_outputs"] = StructuredOutputsParams(regex=s.regex)
            params.append(
                SamplingParams(
                    n=s.n,
                    temperature=s.temperature,
                    top_p=s.top_p,
                    seed=s.seed,
                    max_tokens=s.max_tokens,
                    **extra,
                )
            )
        out: list[list[str]] = [[] for _ in conversations]
        # vLLM renders one chat-template mode per call: split continuing / new-turn requests
        for cont in (False, True):
            idx = [i for i, c in enumerate(conversations) if _continues(c) == cont]
            if not idx:
                continue
            convs, sampled = [conversations[i] for i in idx], [params[i] for i in idx]
            modes = {"add_generation_prompt": not cont, "continue_final_message": cont}
            results = self.llm.chat(convs, sampled, use_tqdm=False, lora_request=self.lora, **modes)
            for i, r in zip(idx, results):
                out[i] = [o.text for o in r.outputs]
        return out

    def close(self) -> None:
        if self.merged:  # in this process: its weights are freed here
            return close_in_process_llm(self)
        try:  # stop the engine-core process now rather than at garbage collection
            self.llm.llm_engine.engine_core.shutdown()
        except Exception as e:  # noqa: BLE001 - the engine may already be gone
            warnings.warn(f"vLLM engine shutdown: {e}", stacklevel=2)
        del self.llm
        gc.collect()


MAX_LORA_RANK = 16  # vLLM's LoRA rank bound: any adapter up to it shares the engine


def lora_rank(ref: ModelRef) -> int:
    return int(adapter_config(resolve_model_path(ref.path)).get("r", 16))


def open_engine(ref: ModelRef, backend: str, settings: EngineSettings) -> Engine:
    backend = resolve_backend(backend)
    cls = VLLMEngine if backend == "vllm" else TransformersEngine
    return cls(ref, settings)


def same_model(a: ModelRef, b: ModelRef) -> bool:
    return (a.path, a.base) == (b.path, b.base)


class EngineSlot:
    """Holds at most one live engine: asking for another model releases the current one first,
    and nothing is loaded until a request actually needs generating (a cached rerun loads none)."""

    def __init__(self, backend: str, settings: EngineSettings):
        self.backend, self.settings = backend, settings
        self.engine: Engine | None = None
        self.loads: list[str] = []

    def get(self, ref: ModelRef) -> Engine:
        if self.engine is not None and self.engine.serves(ref):
            self.engine.use(ref)
            return self.engine
        self.close()
        tqdm.write(f"[synth] loading {ref.label} ({resolve_backend(self.backend)} backend)", file=sys.stderr)
        self.engine = open_engine(ref, self.backend, self.settings)
        self.loads.append(ref.label)
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
