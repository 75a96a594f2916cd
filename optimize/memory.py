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
from optimize.config import Config

PROCESS_BYTES = 0.7e9  # python + torch + transformers + tokenizers, measured on CPU (BENCHMARKS.md)
SPARSE = ("ties", "dare_ties", "dare_linear")  # sort a tensor's |tau| once: values + int64 indices
DARE = ("dare_ties", "dare_linear")  # int16 drop noise per entry of every task vector


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


@dataclass(frozen=True)
class Shapes:
    numel: int  # parameters (a tied lm_head counted once)
    largest: int  # entries of the largest tensor
    vocab: int


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
        files = sorted(p.glob("*.safetensors"))
        if not files:  # pickled weights: 4 bytes per parameter at most
            size = sum(f.stat().st_size for f in p.glob("*.bin"))
            return Shapes(size // 2, size // 8, 0)
        shapes = _safetensors_shapes(files)
        vocab_keys = [k for k in shapes if "embed_tokens" in k or "wte" in k]
    sizes = {k: math.prod(s) for k, s in shapes.items()}
    vocab = max((max(shapes[k]) for k in vocab_keys), default=0)
    return Shapes(sum(sizes.values()), max(sizes.values()), vocab)


def lora_sizes(path: Path, store_bytes: int) -> tuple[int, int]:
    """A LoRA source held factored (float32, as peft loads it; modules_to_save dense): its bytes,
    and the entries of the dense delta it stands for (what DARE's noise covers)."""
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
    dense = sum(out_dims[m] * in_dims.get(m, 0) for m in out_dims)
    return held, dense


@dataclass(frozen=True)
class Estimate:
    device: str
    parts: dict[str, int]  # what -> bytes
    limit: int | None  # bytes the search may use (None: unknown)
    limit_from: str

    @property
    def peak(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        parts = ", ".join(f"{k} {gb(v)}" for k, v in self.parts.items() if v)
        limit = f" of {gb(self.limit)} ({self.limit_from})" if self.limit else ""
        return f"memory estimate on {self.device}: {parts} -> peak ~{gb(self.peak)}{limit}"


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
    sources = 0
    for s in cfg.sources:
        p = resolve_model_path(s.path)
        if model_format(p, rt.allow_pickle, rt.trust_remote_code) == "lora":
            held, covered = lora_sizes(p, sbytes)
        else:
            held, covered = base.numel * sbytes, base.numel
        sources += held + (covered * 2 if method in DARE else 0)
    n = len(cfg.sources)
    scratch = base.largest * 4 * (n + 3) + (base.largest * 12 if method in SPARSE else 0)
    logits = cfg.data.batch_tokens * max(base.vocab, 1) * 4 * 3  # logits, log-softmax, gathered
    parts = {
        "working model": base.numel * wbytes,
        "base copy": base.numel * sbytes,
        "task vectors": sources,
        "merge scratch": scratch,
        "scoring": logits,
    }
    if device == "cpu":
        parts["process"] = int(PROCESS_BYTES)
    if rt.max_memory:
        limit, limit_from = parse_size(rt.max_memory), "runtime.max_memory"
    else:
        limit, limit_from = available(device)
    return Estimate(device, parts, limit, limit_from)


def check_memory(cfg: Config) -> Estimate:
    """The estimate, or a ConfigError naming what to change when it does not fit."""
    est = estimate(cfg)
    if est.limit and est.peak > est.limit:
        biggest = max(est.parts, key=est.parts.get)
        raise ConfigError(
            f"this search needs about {gb(est.peak)} but {gb(est.limit)} is {est.limit_from} "
            f"({est.describe()}); the largest part is {biggest}. Lower it: runtime.store_dtype "
            "bfloat16 (half of float32), runtime.dtype bfloat16, fewer dense sources (a LoRA "
            "source costs its factors only), or a device with more memory; raise "
            "runtime.max_memory if the estimate is wrong for your machine"
        )
    return est
