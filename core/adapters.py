"""A LoRA adapter's config and weights, checked against each other before peft loads it.

peft accepts adapters whose delta is not what alignmerge merges (B @ A * scaling): another
method (IA3, prefix tuning), LoRA on parameters or with a bias, trainable tokens; and it
initialises at random (or to zero) any module its config targets that the weights file does not
hold. Each is refused here, from adapter_config.json and the safetensors header, with the fix.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from core.config import clip
from core.errors import ModelLoadError
from core.weights import FLOAT_DTYPES, header_shapes, read_json_object

LORA_KEY = re.compile(r"^(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.\w+)?(?:\.weight)?$")


def _refuse(folder: Path, problem: str, fix: str) -> ModelLoadError:
    return ModelLoadError(f"{folder / 'adapter_config.json'}: {problem}; {fix}")


def _rank(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _alpha(value) -> bool:  # real adapters use 1-512; 1e300 would overflow the deltas
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= 1e6


def check_adapter(folder: Path) -> None:
    """The config is a plain LoRA alignmerge can merge, and the weights file holds float LoRA
    factors of the rank the config declares."""
    cfg = read_json_object(folder / "adapter_config.json") or {}
    kind = cfg.get("peft_type")
    if kind != "LORA":
        raise _refuse(folder, f"peft_type is {kind!r}, not 'LORA'", "only LoRA adapters can be merged")
    for key, what in (
        ("target_parameters", "LoRA on parameters (target_parameters)"),
        ("lora_bias", "a LoRA bias (lora_bias)"),
        ("trainable_token_indices", "trainable tokens (trainable_token_indices)"),
        ("layer_replication", "layer replication (layer_replication: peft rebuilds the base's layer stack)"),
    ):
        if cfg.get(key):
            raise _refuse(
                folder,
                f"{what} is not supported (its delta is not B @ A)",
                "merge the adapter into the model",
            )
    alphas = cfg.get("alpha_pattern") or {}
    if (
        not _alpha(cfg.get("lora_alpha", 8))
        or not isinstance(alphas, dict)
        or not all(map(_alpha, alphas.values()))
    ):
        raise _refuse(
            folder,
            f"lora_alpha must be a number of at most 1e6 (got {cfg.get('lora_alpha')!r}, "
            f"alpha_pattern {clip(alphas, 100)})",
            "copy the adapter again",
        )
    if not isinstance(cfg.get("base_model_name_or_path") or "", str):
        raise _refuse(
            folder,
            f"base_model_name_or_path is {clip(cfg['base_model_name_or_path'], 60)}, not a model name",
            "write the base model's name or path there",
        )
    ranks = cfg.get("rank_pattern") or {}
    if not _rank(cfg.get("r")) or not isinstance(ranks, dict) or not all(map(_rank, ranks.values())):
        raise _refuse(
            folder, f"r must be a positive integer (got {cfg.get('r')!r})", "copy the adapter again"
        )
    f = folder / "adapter_model.safetensors"
    if not f.exists():  # pickled adapter_model.bin, allowed by the loader policy: peft checks it
        return
    tensors = header_shapes([f], dtypes=True)
    factors = {k: v for k, v in tensors.items() if LORA_KEY.match(k)}
    if not factors:
        raise ModelLoadError(
            f"{f} holds no LoRA weights (lora_A / lora_B); peft would start them from scratch: copy it again"
        )
    for k, (_, dtype) in tensors.items():
        if dtype not in FLOAT_DTYPES:
            raise ModelLoadError(
                f"{f}: {k} is stored as {dtype}, not floating point; use an unquantized adapter"
            )
    declared = {cfg["r"], *ranks.values()}
    for k, (shape, _) in factors.items():
        part = LORA_KEY.match(k).group(2)
        r = shape[0] if part.endswith("A") else shape[1] if len(shape) > 1 else None  # B: (out, r, ...)
        if r not in declared and math.prod(shape):
            raise _refuse(
                folder,
                f"r is {cfg['r']} (rank_pattern {ranks}) but {k} has rank {r}",
                "fix r and rank_pattern or copy the adapter again",
            )


def unload_partial(model) -> None:
    """Take a half-injected adapter out of the working model again (peft failed midway)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    for module_name, module in list(model.named_modules()):
        if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
            parent, _, attr = module_name.rpartition(".")
            original = getattr(module, "original_module", None) or module.get_base_layer()
            setattr(model.get_submodule(parent), attr, original)
