"""Model sources and task vectors: tau_t = theta_t - theta_base (docs/method.md §1).

A source is an HF folder (safetensors, sharded or not), a GGUF file (dequantized) or a PEFT LoRA
adapter. Memory is what limits the size of a merge (docs/memory.md): theta_base and dense task
vectors are stored in `runtime.store_dtype` (by default the checkpoint's own 16-bit dtype, so the
base is kept exactly) and turned into float32 one tensor at a time, during the merge; a LoRA delta
stays factored (`optimize.deltas.LowRank`: A, B, scaling), multiplied out a block of rows at a
time during the merge.
Sources that do not match the base are refused with an error naming the first mismatch. Pickled
weights and remote code follow the loader policy of `core.models.model_format`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from core.adapters import LORA_KEY, unload_partial
from core.config import cut
from core.errors import ModelLoadError
from core.models import (
    load_model,
    load_tokenizer,
    model_format,
    release_freed_memory,
    resolve_model_path,
)
from core.weights import header_shapes, weight_files
from optimize.deltas import LowRank, TaskVector, check_finite


class SourceMismatchError(ModelLoadError):
    pass


# ----------------------------------------------------------------------------- layer groups
@dataclass(frozen=True)
class Groups:
    """Coefficient groups over the model's parameters: embeddings, each transformer block, the
    final norm (and any other non-block tensor), lm_head when it is not tied to the embeddings."""

    names: tuple[str, ...]  # group names in depth order
    of_param: dict[str, int]  # parameter name -> group index
    layer_prefix: str  # e.g. "model.layers." (for mergekit filters)

    @property
    def n(self) -> int:
        return len(self.names)

    def layer_groups(self) -> list[int]:
        return [i for i, g in enumerate(self.names) if g.startswith("layers.")]


_LAYER = re.compile(r"^(.*\.layers\.)(\d+)\.")


def layer_groups(param_names: list[str]) -> Groups:
    n_layers, prefix, kinds = 0, "model.layers.", {}
    for name in param_names:
        m = _LAYER.match(name)
        if m:
            prefix = m.group(1)
            n_layers = max(n_layers, int(m.group(2)) + 1)
            kinds[name] = f"layers.{int(m.group(2))}"
        elif "embed" in name or "wte" in name or "wpe" in name:
            kinds[name] = "embed"
        elif "lm_head" in name:
            kinds[name] = "lm_head"
        else:
            kinds[name] = "norm"
    order = ["embed"] + [f"layers.{i}" for i in range(n_layers)] + ["norm", "lm_head"]
    present = [g for g in order if g in set(kinds.values())]
    index = {g: i for i, g in enumerate(present)}
    return Groups(tuple(present), {n: index[k] for n, k in kinds.items()}, prefix)


# ----------------------------------------------------------------------------- the base
@dataclass
class Base:
    path: str
    model: torch.nn.Module  # the working model: every candidate is written into it in place
    tokenizer: object
    weights: dict[str, torch.Tensor]  # theta_base in the store dtype (same device as the model)
    groups: Groups
    info: dict = field(default_factory=dict)  # architecture, vocab, chat template


def architecture(config) -> str:
    """The causal-LM class name: a config read from GGUF names only its model_type (`llama`),
    an HF folder's names the class (`LlamaForCausalLM`); both are compared as the class."""
    named = getattr(config, "architectures", None)
    return named[0] if named else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, config.model_type)


def model_info(config, tokenizer) -> dict:
    return {
        "architecture": architecture(config),
        "vocab_size": config.vocab_size,
        **tokenizer_info(tokenizer),
    }


def tokenizer_info(tokenizer) -> dict:
    """What a source's own tokenizer must share with the base's (None: nothing to compare)."""
    try:
        tokens = tokenizer.get_vocab() if tokenizer is not None else None
    except NotImplementedError:  # a remote-code tokenizer may have none
        tokens = None
    return {"chat_template": getattr(tokenizer, "chat_template", None), "tokens": tokens}


def tokenizer_of(label: str, path, trust_remote_code: bool):
    """`load_tokenizer`, its errors named by the model's role (`base: ...`, `source 'x': ...`)."""
    try:
        return load_tokenizer(path, trust_remote_code)
    except ModelLoadError as err:
        raise ModelLoadError(f"{label}: {err}") from None


def load_base(
    path: str,
    dtype: torch.dtype,
    device: str,
    allow_pickle=False,
    trust_remote_code=False,
    store_dtype: torch.dtype = torch.float32,
) -> Base:
    tokenizer = tokenizer_of("base", path, trust_remote_code)  # first: a broken one fails before the weights
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(
            f"base {path} has no chat template; the scorer renders every example with it "
            "(use an instruct model, or add chat_template to its tokenizer_config.json)"
        )
    model = load_model(path, dtype, device, allow_pickle, trust_remote_code)
    for p in model.parameters():
        p.requires_grad_(False)
    # named_parameters() lists a tied lm_head once (as the embeddings), which is what we merge.
    weights = {n: p.detach().to(store_dtype, copy=True) for n, p in model.named_parameters()}
    check_finite(f"base {path}", weights)
    return Base(
        str(path), model, tokenizer, weights, layer_groups(list(weights)), model_info(model.config, tokenizer)
    )


# ----------------------------------------------------------------------------- task vectors
def _mismatch(source: str, what: str, base_value, source_value) -> SourceMismatchError:
    return SourceMismatchError(
        f"source {source!r} does not match the base: {what} differs "
        f"(base: {base_value!r}, source: {source_value!r}). Every source must be fine-tuned "
        "from the base model (same architecture, tensor names and shapes, vocab, chat template)."
    )


def check_compatible(name: str, base: Base, info: dict, shapes: dict[str, tuple]) -> None:
    """Raise on the first difference, in the order a user can act on."""
    if info["architecture"] != base.info["architecture"]:
        raise _mismatch(name, "architecture", base.info["architecture"], info["architecture"])
    base_shapes = {n: tuple(w.shape) for n, w in base.weights.items()}
    for n in base_shapes:
        if n not in shapes:
            raise _mismatch(name, "tensor names", n, "(missing)")
    for n in shapes:
        if n not in base_shapes and not n.endswith("lm_head.weight"):
            raise _mismatch(name, "tensor names", "(missing)", n)
    for n, s in base_shapes.items():
        if shapes[n] != s:
            vocab = ("embed" in n or "lm_head" in n) and shapes[n][0] != s[0]
            what = "vocab size" if vocab else f"shape of {n}"
            raise _mismatch(name, what, s, shapes[n])
    if info["vocab_size"] != base.info["vocab_size"]:
        raise _mismatch(name, "vocab size", base.info["vocab_size"], info["vocab_size"])
    check_tokenizer(name, base, info)


def check_tokenizer(name: str, base: Base, info: dict) -> None:
    """A source's own chat template and token ids are the base's (other ids would merge one token's
    rows into another's); tokens one side lacks (a GGUF tokenizer's padding) are not compared."""
    template = info.get("chat_template")
    if template is not None and template != base.info["chat_template"]:
        raise _mismatch(name, "chat template", cut(base.info["chat_template"], 60), cut(template, 60))
    ours, own = base.info["tokens"] or {}, info.get("tokens") or {}
    if moved := sorted(t for t in ours.keys() & own.keys() if ours[t] != own[t]):
        t = moved[0]
        raise _mismatch(name, f"id of token {cut(t, 60)!r} ({len(moved)} moved)", ours[t], own[t])


DELTA_CHUNK = 1 << 22  # tau is computed in float32 this many entries at a time


def _delta(name: str, source_weight: torch.Tensor, base_weight: torch.Tensor) -> torch.Tensor | None:
    """theta_t - theta_base in float32, stored in the base's dtype; None if it is all zero
    (untouched tensors cost no memory). In chunks: whole, an embedding's float32 temporaries
    would be 1.2 GB at 1.7B."""
    d = torch.empty(base_weight.shape, dtype=base_weight.dtype, device=base_weight.device)
    src, base, out = source_weight.reshape(-1), base_weight.reshape(-1), d.view(-1)
    for s in range(0, out.numel(), DELTA_CHUNK):
        c = slice(s, s + DELTA_CHUNK)
        out[c] = src[c].to(base.device, torch.float32) - base[c].float()
    return d if d.any() else None


def task_vector_hf(name: str, path: Path, base: Base, trust_remote_code: bool = False) -> TaskVector:
    from transformers import AutoConfig

    files = weight_files(path) if any(path.glob("*.safetensors")) else []  # what transformers loads
    if not files:  # pickled .bin weights, let through by model_format only with allow_pickle
        return task_vector_loaded(name, path, base, allow_pickle=True, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    own = any(path.glob("tokenizer*"))  # else the base's tokenizer is the source's
    info = model_info(config, tokenizer_of(f"source {name!r}", path, trust_remote_code) if own else None)
    where, shapes = {}, {}
    for f in files:
        with safe_open(f, framework="pt", device="cpu") as h:
            where |= dict.fromkeys(h.keys(), f)
            shapes |= {k: tuple(h.get_slice(k).get_shape()) for k in h.keys()}
    check_compatible(name, base, info, shapes)
    tv = {}
    for n, w in base.weights.items():
        # One tensor per opening: the file's pages read so far leave the process when it closes
        # (a file kept open keeps them resident: +3.4 GB for a 1.7B model in bf16).
        with safe_open(where[n], framework="pt", device="cpu") as h:
            d = _delta(n, h.get_tensor(n), w)
        if d is not None:
            tv[n] = d
        if w.numel() >= DELTA_CHUNK:  # the chunks' float32 temporaries, freed: back to the OS
            release_freed_memory()
    return tv


def task_vector_loaded(
    name: str, path: Path, base: Base, allow_pickle: bool = False, trust_remote_code: bool = False
) -> TaskVector:
    """A source loaded whole: GGUF (dequantized) or pickled .bin weights."""
    model = load_model(path, torch.float32, "cpu", allow_pickle, trust_remote_code)
    info = model_info(model.config, tokenizer_of(f"source {name!r}", path, trust_remote_code))
    state = dict(model.named_parameters())
    check_compatible(name, base, info, {n: tuple(p.shape) for n, p in state.items()})
    tv = {}
    for n, w in base.weights.items():
        d = _delta(n, state[n].detach(), w)
        if d is not None:
            tv[n] = d
    return tv


def task_vector_lora(name: str, path: Path, base: Base, trust_remote_code: bool = False) -> TaskVector:
    """Each adapted module's delta as peft computes it (rank/alpha patterns, rsLoRA and
    fan_in_fan_out included): factored (`LowRank`) for linear layers, dense (in the store dtype)
    for the rest. The adapter is injected into the working model, read, and unloaded again, which
    restores the base modules untouched (modules_to_save included, and with them tied weights)."""
    from peft import LoraConfig, PeftModel
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    try:  # model_format checked the config (core.adapters); what only peft sees is its to refuse
        cfg = LoraConfig.from_pretrained(path)  # JSON only: peft runs no code here, takes no such flag
    except Exception as err:
        raise _peft_error(name, path, err) from None
    if cfg.use_dora:  # generation merges it (peft), a merge of task vectors cannot: its delta is not B @ A
        raise ModelLoadError(
            f"source {name!r}: DoRA adapters cannot be merged; merge it into the model, give the folder"
        )
    if (path / "tokenizer_config.json").exists():
        check_tokenizer(name, base, tokenizer_info(tokenizer_of(f"source {name!r}", path, trust_remote_code)))
    shapes = _adapter_shapes(path)
    _check_lora_shapes(name, base, shapes)
    try:
        peft_model = PeftModel.from_pretrained(base.model, str(path), adapter_name="source")
    except Exception as err:  # NoMatchingPeftModuleError, a state dict that does not fit...
        unload_partial(base.model)
        raise _peft_error(name, path, err) from None
    held = {m.group(1) for k in shapes if (m := _LORA_KEY.match(k))}  # modules with weights in the file
    tv = {}
    # peft's unload leaves a modules_to_save copy in the model (untying tied weights): the base's go back
    wrappers = {n: m for n, m in base.model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    copies: list[torch.nn.Parameter] = []
    try:
        for module_name, module in peft_model.base_model.model.named_modules():
            if (
                isinstance(module, LoraLayer)
                and "source" in module.lora_A.keys() | module.lora_embedding_A.keys()
            ):
                if module_name not in held:
                    raise ModelLoadError(
                        f"source {name!r}: {path} targets {module_name} but holds no LoRA weights for it "
                        "(peft would start them from scratch); the adapter is incomplete: copy it again"
                    )
                if variant := module.lora_variant.get("source"):  # aLoRA, BD-LoRA...: peft's delta, not B @ A
                    what = f"a LoRA variant ({type(variant).__name__}) whose delta is not B @ A"
                    raise ModelLoadError(f"source {name!r}: {path} is {what}; merge it into the model")
                n, stored = f"{module_name}.weight", base.weights[f"{module_name}.weight"]
                if type(module) is LoraLinear and "source" in module.lora_A:
                    a, b = (m["source"].weight.detach() for m in (module.lora_A, module.lora_B))
                    scaling = float(module.scaling["source"])
                    tv[n] = LowRank(a.to(stored.device), b.to(stored.device), scaling, module.fan_in_fan_out)
                else:
                    tv[n] = module.get_delta_weight("source").to(stored.device, stored.dtype)
            elif isinstance(module, ModulesToSaveWrapper):
                for pname, p in module.modules_to_save["source"].named_parameters():
                    n = f"{module_name}.{pname}"
                    if any(p is q for q in copies):  # tied to a copy read already (ensure_weight_tying)
                        continue
                    copies.append(p)
                    if n not in base.weights:  # an alias: the base ties it to another weight
                        raise ModelLoadError(
                            f"source {name!r}: {path} trains its own {module_name} (modules_to_save), "
                            f"but the base ties {n} to another weight and a merge has one of them: use "
                            "an adapter trained without it in modules_to_save"
                        )
                    d = _delta(n, p.detach(), base.weights[n])
                    if d is not None:
                        tv[n] = d
    finally:
        peft_model.unload()
        for module_name, wrapper in wrappers.items():
            base.model.set_submodule(module_name, wrapper.original_module)
    return tv


def _peft_error(name: str, path: Path, err: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"source {name!r}: peft cannot load the LoRA adapter {path} into the base ({type(err).__name__}: "
        f"{cut(' '.join(str(err).split()), 200)}); fix its adapter_config.json or copy it again"
    )


def _adapter_shapes(path: Path) -> dict[str, tuple]:
    if (f := path / "adapter_model.safetensors").exists():
        return header_shapes([f])
    # adapter_model.bin: model_format lets it through only with allow_pickle
    state = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    return {k: tuple(v.shape) for k, v in state.items()}


_LORA_KEY = re.compile(r"^base_model\.model\." + LORA_KEY.pattern.removeprefix("^"))  # peft's prefix


def _check_lora_shapes(name: str, base: Base, shapes: dict[str, tuple]) -> None:
    """A LoRA for another base fails here, before peft sees it, with the module named."""
    for key, shape in shapes.items():
        m = _LORA_KEY.match(key)
        if not m:
            continue
        module, part = m.groups()
        target = f"{module}.weight"
        if target not in base.weights:
            raise _mismatch(name, "tensor names (LoRA target module)", "(missing)", target)
        out_f, in_f = base.weights[target].shape[:2]
        if part == "lora_A":
            ok, want = shape[1] == in_f, in_f
        elif part == "lora_B":
            ok, want = shape[0] == out_f, out_f
        elif part == "lora_embedding_A":  # (r, num_embeddings)
            ok, want = shape[1] == out_f, out_f
        else:  # lora_embedding_B: (embedding_dim, r)
            ok, want = shape[0] == in_f, in_f
        if not ok:
            raise _mismatch(name, f"LoRA shape for {target}", want, shape)


def load_task_vector(
    name: str, path: str, base: Base, allow_pickle: bool = False, trust_remote_code: bool = False
) -> TaskVector:
    p = resolve_model_path(path)
    fmt = model_format(p, allow_pickle, trust_remote_code)
    if fmt == "gguf":
        tv = task_vector_loaded(name, p, base, allow_pickle, trust_remote_code)
    else:
        tv = {"hf": task_vector_hf, "lora": task_vector_lora}[fmt](name, p, base, trust_remote_code)
    check_finite(f"source {name!r}", tv)
    return tv


def load_task_vectors(
    sources, base: Base, allow_pickle: bool = False, trust_remote_code: bool = False
) -> list[TaskVector]:
    """Once per run. Sources are checked one by one, so a bad source fails before the rest load.
    The heap pages each source's temporaries leave behind go back to the OS before the next one
    loads (measured at 1.7B: 0.85 GB per dense source otherwise)."""
    out = []
    for s in tqdm(sources, desc="task vectors", unit="source", leave=False):
        out.append(load_task_vector(s.name, s.path, base, allow_pickle, trust_remote_code))
        release_freed_memory()
    return out
