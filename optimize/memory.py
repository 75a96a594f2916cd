"""How much memory a search will hold, from the checkpoints' headers, before any weight loads.

A search keeps the working model, theta_base and every task vector for its whole life
(docs/memory.md): the estimate adds them up in the dtypes they will be held in, plus the merge's
float32 scratch for the largest tensor and the scoring batch's logits. A dense source is counted
as if every tensor differs from the base (true of a full fine-tune); a LoRA source as its factors.
The search refuses to start when the estimate exceeds `runtime.max_memory`, or the memory the
device has free now.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from core.config import parse_size
from core.errors import ConfigError
from core.models import (
    DTYPES,
    dtype_name,
    model_format,
    resolve_device,
    resolve_model_path,
    store_dtype_name,
)
from core.vllm_env import kv_cache_bytes
from core.weights import weight_files
from eval.behaviour import GREEDY_KV_CACHE_GB, vllm_generation
from eval.loss import HEAD_CHUNK
from optimize.config import Config
from optimize.kernels import BLOCK
from optimize.methods import METHODS

# vLLM's in-process engine beyond its weights and KV cache: the demo peaked at 5.31 GB with it and
# 2.92 GB without (BENCHMARKS.md, "The demo, end to end"), a 0.54 GB model and a 1 GiB cache
VLLM_RUNTIME_BYTES = 0.8e9
PROCESS_BYTES = 0.7e9  # python + torch + transformers + tokenizers, measured on CPU (BENCHMARKS.md)
SPARSE = ("ties", "dare_ties")  # their fused kernel's float32 result
DARE = ("dare_ties", "dare_linear")  # int16 drop noise per entry of every task vector


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


@dataclass(frozen=True)
class Shapes:
    numel: int  # parameters (a tied lm_head counted once)
    largest: int  # entries of the largest tensor
    vocab: int
    hidden: int


def _safetensors_shapes(files: list[Path]) -> dict[str, tuple]:
    from safetensors import safe_open

    shapes = {}
    for f in files:
        with safe_open(f, framework="pt", device="cpu") as st:
            shapes |= {k: tuple(st.get_slice(k).get_shape()) for k in st.keys()}
    return shapes


def model_shapes(path: str, allow_pickle: bool = False, trust_remote_code: bool = False) -> Shapes:
    """Parameter count of a full model, from its safetensors or GGUF header."""
    p = resolve_model_path(path)
    fmt = model_format(p, allow_pickle, trust_remote_code)
    if fmt == "gguf":
        import gguf

        shapes = {t.name: tuple(int(x) for x in t.shape) for t in gguf.GGUFReader(p).tensors}
        vocab_keys = [k for k in shapes if k.startswith("token_embd")]
    else:
        files = weight_files(p) if any(p.glob("*.safetensors")) else []
        if not files:  # pickled weights: 4 bytes per parameter at most
            size = sum(f.stat().st_size for f in p.glob("*.bin"))
            return Shapes(size // 2, size // 8, 0, 0)
        shapes = _safetensors_shapes(files)
        vocab_keys = [k for k in shapes if "embed_tokens" in k or "wte" in k]
    sizes = {k: math.prod(s) for k, s in shapes.items()}
    embedding = max((shapes[k] for k in vocab_keys), key=math.prod, default=(0, 0))
    return Shapes(sum(sizes.values()), max(sizes.values()), max(embedding), min(embedding))


def lora_sizes(path: Path, store_bytes: int) -> tuple[int, int, int]:
    """A LoRA source held factored (float32, as peft loads it; modules_to_save dense): its bytes,
    the entries of the dense delta it stands for (what DARE's noise covers), and of its largest
    dense tensor."""
    f = path / "adapter_model.safetensors"
    shapes = _safetensors_shapes([f]) if f.exists() else {}
    held, out_dims, in_dims = 0, {}, {}
    for k, s in shapes.items():
        n = math.prod(s)
        held += n * (4 if ".lora_" in k else store_bytes)
        module = k.split(".lora_")[0]
        if ".lora_A" in k or ".lora_embedding_A" in k:
            in_dims[module] = s[-1]
        elif ".lora_B" in k or ".lora_embedding_B" in k:
            out_dims[module] = s[0]
    dense = [out_dims[m] * in_dims.get(m, 0) for m in out_dims]
    saved = [math.prod(s) for k, s in shapes.items() if ".lora_" not in k]
    return held, sum(dense), max(dense + saved, default=0)


@dataclass(frozen=True)
class Estimate:
    device: str
    held: dict[str, int]  # what stays for the whole search -> bytes
    transient: dict[str, int]  # what comes and goes, one at a time -> bytes
    limit: int | None  # bytes the search may use (None: unknown)
    limit_from: str

    @property
    def peak(self) -> int:
        return sum(self.held.values()) + max(self.transient.values())

    def describe(self) -> str:
        held = ", ".join(f"{k} {gb(v)}" for k, v in self.held.items() if v)
        transient = " or ".join(f"{k} {gb(v)}" for k, v in self.transient.items() if v)
        limit = f" of {gb(self.limit)} ({self.limit_from})" if self.limit else ""
        peak = f"peak ~{gb(self.peak)}{limit}"
        return f"memory estimate on {self.device}: {held}, + at most one of {transient} -> {peak}"


def available(device: str) -> tuple[int | None, str]:
    """Bytes free on `device` now, and how that was found."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free, f"free on {device}"
    if device == "cpu":
        import psutil

        return psutil.virtual_memory().available, "available RAM"
    return None, "unknown"


def estimate(cfg: Config) -> Estimate:
    rt = cfg.runtime
    device = resolve_device(rt.device)
    working = DTYPES[dtype_name(rt.dtype, device)]
    store = DTYPES[store_dtype_name(rt.store_dtype, working, resolve_model_path(cfg.base))]
    wbytes, sbytes = working.itemsize, store.itemsize
    base = model_shapes(cfg.base, rt.allow_pickle, rt.trust_remote_code)
    method = cfg.merge.method
    sources = largest = lora_largest = n_lora = 0  # largest: entries of the largest tensor changed
    for s in cfg.sources:
        p = resolve_model_path(s.path)
        if model_format(p, rt.allow_pickle, rt.trust_remote_code) == "lora":
            held, covered, biggest = lora_sizes(p, sbytes)
            lora_largest, n_lora = max(lora_largest, biggest), n_lora + 1
        else:
            held, covered, biggest = base.numel * sbytes, base.numel, base.largest
        sources += held + (covered * 2 if method in DARE else 0)
        largest = max(largest, biggest)
    # merging one tensor: TIES's fused result (float32), a float32 buffer when a 16-bit model
    # cannot be written in place, each LoRA delta multiplied out; a block of rows at a time
    # for the methods that read deltas by rows
    by_rows = METHODS[method].reads_rows
    buffered = wbytes < 4 and not METHODS[method].rounds_once
    scratch = min(largest, BLOCK) * 4 * (method in SPARSE) + largest * 4 * buffered
    scratch += (min(lora_largest, BLOCK) if by_rows else lora_largest) * 4 * n_lora
    # scoring one batch: per-layer activations, and the head's logits HEAD_CHUNK positions at a time
    scoring = cfg.data.batch_tokens * base.hidden * 4 * 16 + HEAD_CHUNK * base.vocab * 4 * 3
    held = {"working model": base.numel * wbytes, "base copy": base.numel * sbytes, "task vectors": sources}
    if device == "cpu":
        held["process"] = int(PROCESS_BYTES)
    if cfg.search.verify.top_k and vllm_generation(rt.generation, device):  # the verified pick's engine
        kv = kv_cache_bytes(GREEDY_KV_CACHE_GB)
        held["vLLM engine"] = base.numel * wbytes + kv + int(VLLM_RUNTIME_BYTES)
    transient = {"merge scratch": scratch, "scoring": scoring}
    if model_format(resolve_model_path(cfg.base), rt.allow_pickle, rt.trust_remote_code) == "gguf":
        transient["loading the GGUF"] = base.numel * wbytes  # dequantized, then rebuilt as a plain model
    if rt.max_memory:
        limit, limit_from = parse_size(rt.max_memory), "runtime.max_memory"
    else:
        limit, limit_from = available(device)
    return Estimate(device, held, transient, limit, limit_from)


def check_memory(cfg: Config) -> Estimate:
    """The estimate, or a ConfigError naming what to change when it does not fit."""
    est = estimate(cfg)
    if est.limit and est.peak > est.limit:
        parts = est.held | est.transient
        biggest = max(parts, key=parts.get)
        raise ConfigError(
            f"this search needs about {gb(est.peak)} but {gb(est.limit)} is {est.limit_from} "
            f"({est.describe()}); the largest part is {biggest}. Lower it: runtime.store_dtype "
            "bfloat16 (half of float32), runtime.dtype bfloat16, fewer dense sources (a LoRA "
            "source costs its factors only), runtime.generation: transformers (no vLLM engine), "
            "or a device with more memory; raise "
            "runtime.max_memory if the estimate is wrong for your machine"
        )
    return est
