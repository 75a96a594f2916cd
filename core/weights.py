"""What a model folder's files say about each other, checked before any weight loads.

`core.models.model_format` runs these on every model path (base, sources, eval, synth):
every file it or transformers will open is a regular file (a named pipe would block the reader
forever); the safetensors files are exactly the ones transformers loads (`model.safetensors`, or
the shards its index names, inside the folder); their headers are readable; and config.json
describes those tensors: the same layers, and (built on the meta device, which allocates nothing)
every parameter present with the same shape. A config.json that disagrees would make
transformers initialise the missing tensors at random, or allocate what the config claims.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import re
import signal
import stat
import threading
import time
from pathlib import Path

import torch

from core.config import cut
from core.errors import ModelLoadError

INDEX = "model.safetensors.index.json"
LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers")
MODULE_COUNTS = LAYER_COUNTS + ("num_local_experts", "num_experts", "n_routed_experts")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# What transformers reads beside a .gguf file (its folder may be /tmp, full of sockets)
BESIDE_GGUF = ("tokenizer", "special_tokens", "added_tokens", "config", "generation_config", "chat_template")


def check_regular(path: Path, prefixes: tuple[str, ...] | None = None) -> None:
    """Refuse `path` (a file, or every entry of a folder whose name starts with one of `prefixes`)
    when it is neither a regular file nor a folder: a named pipe or a device would block or never
    end the read. Nothing is opened."""
    entries = (
        [p for p in path.iterdir() if not prefixes or p.name.startswith(prefixes)]
        if path.is_dir()
        else [path]
    )
    for p in entries:
        try:
            mode = os.stat(p).st_mode  # follows symbolic links (an HF cache snapshot is made of them)
        except OSError:  # a broken link: the reader names it when it tries
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise ModelLoadError(
                f"{p} is not a regular file (a named pipe, device or socket); replace it with the file itself"
            )


def read_json_object(path: Path) -> dict | None:
    """A model folder's JSON file (config, adapter config) as a dict; None when it is missing."""
    check_regular(path)  # a named pipe would block read_text forever
    try:
        meta = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):  # (a .gguf file's "adapter_config.json")
        return None
    except (OSError, ValueError) as err:  # UnicodeDecodeError is a ValueError
        raise ModelLoadError(f"{path} cannot be read as JSON ({cut(str(err), 120)}); copy it again") from None
    if not isinstance(meta, dict):
        raise ModelLoadError(f"{path} is not a JSON object; copy it again")
    return meta


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors' names; fp8 needs its quantizer's scales


def check_safetensors(files: list[Path]) -> None:
    """Read every safetensors header (cheap: no tensor data), so a truncated or corrupt file is
    refused before any model loads."""
    header_shapes(files)


def header_shapes(files: list[Path], dtypes: bool = False) -> dict[str, tuple]:
    """Tensor name -> shape (or (shape, dtype name)) from the safetensors headers; a tensor in two
    files is refused (which one would load is a matter of order)."""
    from safetensors import safe_open

    shapes, where = {}, {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as st:
                for k in st.keys():
                    if k in where:
                        raise ModelLoadError(
                            f"{f} and {where[k]} both hold tensor {k}; remove the stale copy of the weights"
                        )
                    sl, where[k] = st.get_slice(k), f
                    shapes[k] = (tuple(sl.get_shape()), sl.get_dtype()) if dtypes else tuple(sl.get_shape())
        except ModelLoadError:
            raise
        except Exception as err:  # safetensors raises its own error type
            msg = f"{f} cannot be read ({err}); the file is truncated or corrupt"
            raise ModelLoadError(f"{msg}: copy it again") from None
    return shapes


@functools.lru_cache(maxsize=32)
def check_gguf(path: Path, stamp: tuple[int, int]) -> None:
    """Read the GGUF header and tensor index (memory-mapped: no tensor data), so a truncated or
    corrupt file is refused before any model loads. ~2 s for the default model (its vocabulary is
    parsed entry by entry), so once per version of a file: `stamp` is its size and mtime."""
    import gguf

    try:
        gguf.GGUFReader(path)
    except Exception as err:  # gguf raises ValueError, struct.error, IndexError...
        msg = f"{path} cannot be read as GGUF ({cut(str(err), 120)}); the file is truncated or corrupt"
        raise ModelLoadError(f"{msg}: copy it again") from None


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files transformers loads from `folder`: `model.safetensors`, else the
    shards `model.safetensors.index.json` names. Every other `*.safetensors` in the folder is
    refused: the header checks, the memory estimate, the fingerprint and the task vectors read
    the folder's files, and they must be the ones that load."""
    present = sorted(folder.glob("*.safetensors"))
    if (folder / "model.safetensors").exists():
        files = [folder / "model.safetensors"]
    elif (folder / INDEX).exists():
        files = _index_shards(folder)
    else:
        raise ModelLoadError(
            f"{folder}: its weights are not named model.safetensors and there is no {INDEX}; "
            "rename the file to model.safetensors, or save the model again with save_pretrained"
        )
    # Mistral's repos ship its own format's copy beside the HF weights; transformers ignores it
    extra = [f.name for f in present if f not in files and not f.name.startswith("consolidated")]
    if extra:
        raise ModelLoadError(
            f"{folder / extra[0]} is not part of the model (transformers loads {files[0].name}"
            f"{' and the shards its index names' if len(files) > 1 else ''}); remove it"
        )
    return files


def _index_shards(folder: Path) -> list[Path]:
    index = read_json_object(folder / INDEX)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"{folder / INDEX} has no weight_map of tensor names to files; copy it again")
    files = []
    for name in sorted(set(weight_map.values()), key=str):
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
            raise ModelLoadError(
                f"{folder / INDEX} names {name!r} as a shard: a shard must be a file name inside "
                f"{folder}; the index is corrupt or points elsewhere: copy the model again"
            )
        if not (folder / name).is_file():
            raise ModelLoadError(
                f"{folder / name} is missing (named in {INDEX}); the model is incomplete: copy it again"
            )
        files.append(folder / name)
    return files


def check_hf_folder(folder: Path) -> dict[str, tuple]:
    """The weight files' headers, checked against config.json; the tensor shapes."""
    files = weight_files(folder)
    shapes = header_shapes(files)
    stamp = tuple((f.name, (s := f.stat()).st_size, s.st_mtime_ns) for f in [folder / "config.json", *files])
    _check_config(folder, stamp)
    return shapes


@functools.lru_cache(maxsize=32)
def _check_config(folder: Path, stamp: tuple) -> None:
    """Once per version of the files (`stamp`): ~0.1 s, for 8B as for 135M."""
    stored = header_shapes(weight_files(folder), dtypes=True)
    shapes = {k: shape for k, (shape, _) in stored.items()}
    meta = read_json_object(folder / "config.json")
    sections = [meta] + ([meta["text_config"]] if isinstance(meta.get("text_config"), dict) else [])
    layers = {int(m.group(1)) for k in shapes if (m := _LAYER.search(k))}
    for section in sections:  # first, before anything that scales with the config's sizes
        for key in MODULE_COUNTS:
            n = section.get(key)
            if n is None:
                continue
            least = 1 if key in LAYER_COUNTS else 0  # 0 experts: a dense model (Granite-4.0-H)
            if not isinstance(n, int) or isinstance(n, bool) or n < least or n > len(shapes):
                raise _disagree(folder, f"{key}: {n!r}", f"{len(shapes)} tensors")
            extra = section.get("num_nextn_predict_layers")  # DeepSeek's multi-token prediction layers
            extra = extra if isinstance(extra, int) else 0
            if key in LAYER_COUNTS and layers and len(layers) not in (n, n + extra):
                raise _disagree(
                    folder, f"{key}: {n}", f"{len(layers)} layers (layers.N. in the tensor names)"
                )
    dtype = meta.get("dtype") or meta.get("torch_dtype")
    if dtype not in (None, "auto") and not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise ModelLoadError(
            f"{folder / 'config.json'}: dtype {dtype!r} is not a torch dtype; fix or remove it"
        )
    if "auto_map" in meta:  # its own code (trust_remote_code): building it would run that code here
        return
    skeleton = _skeleton(folder)
    if skeleton is not None:
        _compare(folder, skeleton, stored)


def _disagree(folder: Path, said: str, held: str) -> ModelLoadError:
    return ModelLoadError(
        f"{folder / 'config.json'} declares {said} but the weights hold {held}; the folder is "
        "incomplete or its config.json is wrong: copy the model again"
    )


def _skeleton(folder: Path):
    """The model config.json describes, built on the meta device (no memory); None for a
    quantized checkpoint (its tensors are packed: only its quantizer can tell their shapes)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)
        if getattr(config, "quantization_config", None):
            _check_quantizer(folder, config)
            return None
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except ModelLoadError:
        raise
    except Exception as err:  # ValueError (no model_type), ImportError (attention), ZeroDivisionError...
        raise ModelLoadError(
            f"{folder / 'config.json'} does not describe a model transformers can build "
            f"({type(err).__name__}: {cut(str(err), 200)}); fix config.json or copy the model again"
        ) from None


def _check_quantizer(folder: Path, config) -> None:
    from transformers.quantizers import AutoHfQuantizer

    try:
        quantizer = AutoHfQuantizer.from_config(config.quantization_config, pre_quantized=True)
        quantizer.validate_environment(dtype=None, device_map=None, weights_only=True)
    except Exception as err:  # ImportError: bitsandbytes, optimum, ... not installed
        raise ModelLoadError(
            f"{folder}: quantization_config in config.json cannot be used here "
            f"({type(err).__name__}: {cut(str(err), 200)}); install what it names, or use an unquantized "
            "model"
        ) from None


def _compare(folder: Path, skeleton, stored: dict[str, tuple]) -> None:
    """Every parameter of the skeleton is in the weights (after transformers' own renames), with
    its shape and a floating-point dtype (integers there are a quantized checkpoint that lost its
    quantization_config: transformers would cast them to floats, a model of noise); a tied lm_head
    shares the embeddings."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = copy.deepcopy(get_model_conversion_mapping(skeleton))
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    expected = skeleton.state_dict()
    loaded = {}  # model name -> shape in the weights (None: converted by transformers, e.g. fused)
    for key, (shape, dtype) in stored.items():
        name, converted = rename_source_key(key, renamings, converters, skeleton.base_model_prefix, expected)
        loaded[name] = None if converted else shape
        if name in expected and expected[name].is_floating_point() and dtype not in FLOAT_DTYPES:
            raise ModelLoadError(
                f"{folder}: {key} is stored as {dtype}, not floating point, and config.json has no "
                "quantization_config (a quantized checkpoint missing it, or a corrupt one); use the "
                "unquantized weights or the complete quantized folder"
            )
    tied = getattr(skeleton.config.get_text_config(), "tie_word_embeddings", False)
    tied_pair = {n for n, p in skeleton.named_parameters() if p is skeleton.get_input_embeddings().weight}
    tied_pair |= {n for n in loaded if n.endswith("lm_head.weight")}
    for name, p in skeleton.named_parameters():  # a tied lm_head is listed once, as the embeddings
        if name not in loaded:
            if tied and (name.endswith("lm_head.weight") or (name in tied_pair and len(tied_pair) > 1)):
                continue  # either name of the tied pair holds both
            raise ModelLoadError(
                f"{folder}: {name} is in config.json's model but not in the weights (it would be "
                "random); the folder is incomplete or its config.json is wrong: copy the model again"
            )
        if loaded[name] is not None and loaded[name] != tuple(p.shape):
            raise _disagree(folder, f"{name} of shape {tuple(p.shape)}", f"{loaded[name]}")


TEMPLATE_SECONDS = 10.0  # to render two short messages; a template running longer loops


class _TemplateTimeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise _TemplateTimeout in this block after `seconds` (a SIGALRM timer: the main thread of a
    Unix process only; elsewhere no limit)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(*_):
        raise _TemplateTimeout

    previous, started = signal.signal(signal.SIGALRM, expire), time.monotonic()
    pending, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if pending:  # someone else's timer (a test runner's): re-armed with what was left of it
            signal.setitimer(signal.ITIMER_REAL, max(1e-3, pending - (time.monotonic() - started)))


def check_chat_template(tokenizer, folder: Path) -> None:
    """Render a plain conversation as the scorer does (`eval.loss.encode`): a template that
    raises, does not parse, or runs for TEMPLATE_SECONDS (nested loops) is refused once, here, not
    on the first example."""
    if not getattr(tokenizer, "chat_template", None):
        return
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}]
    try:
        with _time_limit(TEMPLATE_SECONDS):
            tokenizer.apply_chat_template(messages, tokenize=False)
            tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    except _TemplateTimeout:
        raise ModelLoadError(
            f"{folder}: its chat template ran for {TEMPLATE_SECONDS:g} s on a two-message conversation "
            "without finishing (a loop?); fix chat_template in its tokenizer files"
        ) from None
    except Exception as err:  # jinja2's TemplateError, SecurityError, UndefinedError...
        raise ModelLoadError(
            f"{folder}: its chat template fails on a plain user/assistant conversation "
            f"({type(err).__name__}: {cut(str(err), 160)}); fix chat_template in its tokenizer files"
        ) from None
