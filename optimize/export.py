"""What a run leaves behind, written atomically: best.yaml, mergekit.yaml, the merged model.

`mergekit.yaml` reproduces the best merge with `mergekit-yaml mergekit.yaml OUT` run from the run
folder, and `merged/mergekit_config.yml` (the name mergekit gives it) the same from `merged/`.
Per-group coefficients become mergekit conditional parameters (`filter` is a substring of the
tensor name, first match wins). Models mergekit cannot read (GGUF) are written once as
safetensors folders under `<run>/sources/`, in the GGUF's own precision (float32 for quantized
tensors, whose dequantized values need it). LoRA sources stay adapters, in mergekit's
`base+adapter` form: nothing the size of a model is written per source, and the recipe's header
gives the flags mergekit needs for them. Full models from the Hugging Face cache are named
`org/name@commit`, which mergekit fetches itself. mergekit computes in float32 and writes the
base checkpoint's dtype (`out_dtype`).
The model card's front matter is what `huggingface_hub.ModelCardData` writes.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import numpy as np
import yaml

from core.models import (
    adapter_config,
    checkpoint_dtype,
    hub_name,
    materialize_hf_folder,
    model_format,
    resolve_device,
    resolve_dtype,
    resolve_model_path,
)
from optimize.config import Config
from optimize.methods import Candidate
from optimize.sources import Groups

MERGEKIT_CONFIG = "mergekit_config.yml"  # the recipe's name inside a model folder, as mergekit writes it
DARE_NOTE = (
    "# DARE drop masks are random: mergekit draws its own (use --random-seed), so the\n"
    "# result matches ours in distribution, not bit for bit.\n"
)


def source_kind(path: str, allow_pickle: bool = False, trust_remote_code: bool = False) -> str:
    return model_format(resolve_model_path(path), allow_pickle, trust_remote_code)


def adapter_base(path: str) -> str | None:
    return adapter_config(resolve_model_path(path)).get("base_model_name_or_path")


def _r(x: float) -> float:
    return float(round(float(x), 6))


def coefficient_table(cfg: Config, groups: Groups, c: Candidate) -> dict:
    """{group: {weight: {source: w}, density: {source: d}} | {t: t}} in depth order."""
    names = [s.name for s in cfg.sources]
    table = {}
    for g, group in enumerate(groups.names):
        row = {}
        if c.t is not None:
            row["t"] = _r(c.t[g])
        if c.weight is not None:
            row["weight"] = {n: _r(c.weight[i, g]) for i, n in enumerate(names)}
        if c.density is not None:
            row["density"] = {n: _r(c.density[i, g]) for i, n in enumerate(names)}
        table[group] = row
    return table


def group_filters(groups: Groups, param_names: list[str]) -> list[list[str]]:
    """mergekit filters (tensor-name substrings) selecting each group's tensors."""
    out = []
    for g, group in enumerate(groups.names):
        if group.startswith("layers."):
            out.append([f"{groups.layer_prefix}{group.split('.')[1]}."])
        else:
            out.append([n for n in param_names if groups.of_param[n] == g])
    return out


def _setting(values: np.ndarray, filters: list[list[str]]):
    """A scalar when every group has the same value, else a list of conditionals."""
    if np.allclose(values, values[0]):
        return _r(values[0])
    return [{"filter": f, "value": _r(v)} for v, fs in zip(values, filters) for f in fs]


@functools.cache  # once per path: mergekit.yaml and merged/'s mergekit_config.yml both name it
def warn_mergekit_path(path: str) -> None:
    print(
        f"[alignmerge] warning: mergekit.yaml names {path}, whose '+' or '@' mergekit reads as "
        "base+LoRA or repo@revision, so mergekit-yaml cannot load it: link that folder from a path "
        "without them (ln -s) and write the link's path in mergekit.yaml",
        file=sys.stderr,
    )


def mergekit_paths(
    cfg: Config, run_dir: Path, start: Path | None = None, base_in_memory=None
) -> tuple[str, list[str]]:
    """Paths of base and sources as mergekit reads them, relative to `start` (the run folder by
    default): GGUF files become safetensors folders under <run>/sources/, LoRA adapters
    `base+adapter`, full models from the HF cache `org/name@commit`. `base_in_memory` (model,
    dtype, tokenizer) saves a GGUF base from memory when it is held in the precision needed."""
    materialized, rt = run_dir / "sources", cfg.runtime
    start = (start or run_dir).resolve()

    def ref(path: str, p: Path) -> str:
        name = hub_name(path)
        if name and p.is_dir() and p.parent.name == "snapshots":
            return f"{name}@{p.name}"
        # "./" keeps mergekit's model card from asking the Hub whether "sources/x" is a repo
        rel = "./" + os.path.relpath(p.resolve(), start)
        if "+" in rel or "@" in rel:  # mergekit reads them as base+LoRA and repo@revision
            warn_mergekit_path(str(p.resolve()))
        return rel

    def readable(path: str, out: Path, loaded=None) -> str:
        p = resolve_model_path(path)
        if p.is_file():
            dtype = gguf_dtype(p)
            build = (lambda: (loaded[0](), loaded[2])) if loaded and loaded[1] == dtype else None
            p = materialize_hf_folder(p, out, dtype, rt.trust_remote_code, build)
        return ref(path, p)

    base = readable(cfg.base, materialized / "base", base_in_memory)
    sources = []
    for s in cfg.sources:
        if source_kind(s.path, rt.allow_pickle, rt.trust_remote_code) == "lora":
            sources.append(f"{base}+{ref(s.path, resolve_model_path(s.path))}")
        else:
            sources.append(readable(s.path, materialized / s.name))
    return base, sources


def mergekit_base_before_loading(cfg: Config) -> None:
    """mergekit reads a GGUF base as a folder in its exact precision. When the search will not
    hold the base in it (a Q4 GGUF is exact in float32, the held base is bf16), that folder is
    written now, before the search loads its models, not at the export on top of them (+0.7 GB
    at the demo's peak; docs/memory.md)."""
    base_file = resolve_model_path(cfg.base)
    working = resolve_dtype(cfg.runtime.dtype, resolve_device(cfg.runtime.device))
    if cfg.output.mergekit and base_file.is_file() and gguf_dtype(base_file) != working:
        mergekit_paths(cfg, cfg.run_dir)


def gguf_dtype(path: Path):
    """The precision a GGUF's weights are exact in: float16/bfloat16 when every matrix is stored
    so, else float32 (dequantized blocks are scale * q + min: more bits than 16)."""
    import gguf
    import torch

    kinds = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors if len(t.shape) > 1}
    exact = {frozenset({"F16"}): torch.float16, frozenset({"BF16"}): torch.bfloat16}
    return exact.get(frozenset(kinds), torch.float32)


def mergekit_header(cfg: Config, recipe: str) -> str:
    """The comment lines above a recipe: how to run it, and what differs from our merge."""
    rt = cfg.runtime
    flags = ""
    if any(source_kind(s.path, rt.allow_pickle, rt.trust_remote_code) == "lora" for s in cfg.sources):
        flags = " --lora-merge-cache lora_cache --lora-merge-dtype float32"
    lines = [
        "# Reproduces this merge; local paths are relative to this folder, so run it from here:\n"
        f"#   mergekit-yaml {recipe} OUT{flags}\n"
    ]
    if flags:
        lines.append(
            "# mergekit applies each LoRA to the base first (into lora_cache/); float32 keeps its\n"
            "# delta exact, as the search used it (bfloat16 halves the cache and rounds it).\n"
        )
    if cfg.merge.method in ("dare_ties", "dare_linear"):
        lines.append(DARE_NOTE)
    return "".join(lines)


def mergekit_config(
    cfg: Config, groups: Groups, param_names: list[str], c: Candidate, base_path: str, source_paths: list[str]
) -> dict:
    method = cfg.merge.method
    filters = group_filters(groups, param_names)
    out: dict = {"merge_method": method, "dtype": "float32"}
    if (stored := checkpoint_dtype(cfg.base)) and stored != "float32":
        out["out_dtype"] = stored
    if method == "slerp":
        out["base_model"] = source_paths[0]
        out["models"] = [{"model": p} for p in source_paths]
        out["parameters"] = {"t": _setting(c.t, filters)}
        return out
    weights = c.weight
    if method == "mergealign":  # task arithmetic with weights t (domain) and 1 - t (alignment)
        out["merge_method"] = "task_arithmetic"
        weights = np.stack([c.t if s.role == "domain" else 1 - c.t for s in cfg.sources])
    models = []
    for i, p in enumerate(source_paths):
        params = {"weight": _setting(weights[i], filters)}
        if c.density is not None:
            params["density"] = _setting(c.density[i], filters)
        models.append({"model": p, "parameters": params})
    out["models"] = models
    if method != "linear":
        out["base_model"] = base_path
    out["parameters"] = {"normalize": cfg.normalize}
    if method != "linear" and cfg.merge.lambda_ != 1:
        out["parameters"]["lambda"] = cfg.merge.lambda_
    return out


def merged_mergekit_config(
    cfg: Config, groups: Groups, param_names: list[str], c: Candidate, folder: Path
) -> str:
    """mergekit_config.yml of the merged model folder `folder`: the recipe of mergekit.yaml with
    its local paths relative to `folder`, so it runs from there as mergekit's own does."""
    base_path, source_paths = mergekit_paths(cfg, cfg.run_dir, start=folder)
    mk = mergekit_config(cfg, groups, param_names, c, base_path, source_paths)
    return mergekit_header(cfg, MERGEKIT_CONFIG) + yaml.safe_dump(mk, sort_keys=False)


def card_name(path: str) -> str:
    """How a model card names a model: its Hub id when it has one, else its folder's name (a GGUF
    file's name without .gguf)."""
    name = hub_name(path)
    if name:
        return name
    p = resolve_model_path(path).resolve()
    return p.stem if p.is_file() else p.name


def base_models(cfg: Config) -> list[str]:
    """The card's `base_model`: the base, then every source. A local base takes the Hub id its
    LoRA sources were made for, when they all name the same one."""
    base = hub_name(cfg.base)
    if base is None:
        claimed = {hub_name(b) for s in cfg.sources if (b := adapter_base(s.path))}
        base = claimed.pop() if len(claimed) == 1 else None
    names = [base or card_name(cfg.base)] + [card_name(s.path) for s in cfg.sources]
    return list(dict.fromkeys(names))


def model_card(cfg: Config, best: dict, report_lines: list[str]) -> str:
    from huggingface_hub import ModelCardData

    names = base_models(cfg)
    data = ModelCardData(
        base_model=names,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["merge", "mergekit", "alignmerge"],
    )
    sources = "\n".join(f"- `{s.name}` ({s.role}): `{s.path}`" for s in cfg.sources)
    scores = "\n".join(f"- {k}: {v}" for k, v in best["scores"].items())
    base = f"`{names[0]}`" + (f" (config: `{cfg.base}`)" if cfg.base != names[0] else "")
    if (base_file := resolve_model_path(cfg.base)).is_file():
        base += f", dequantized from `{base_file.name}`"
    recipe = "The coefficients are in `best.yaml` of the run folder"
    if cfg.output.mergekit:
        recipe += f"; `{MERGEKIT_CONFIG}` here (or `mergekit.yaml` there) reproduces this model"
    return f"""---
{data.to_yaml()}
---
# {cfg.name} (merged with alignmerge)

Merged from the base {base} and:
{sources}

Method: `{cfg.merge.method}` (normalize: {cfg.normalize}, lambda: {cfg.merge.lambda_}), per-layer
coefficients chosen by an Optuna search ({cfg.search.sampler}, objective `{cfg.search.objective}`,
alpha {cfg.search.alpha}) on held-out alignment and domain cross-entropy.
{recipe}.

## Scores (mean response-token cross-entropy, lower is better)
{scores}

{chr(10).join(report_lines)}

## What was and was not evaluated
Only the cross-entropy losses above were measured by the search. They are a proxy: a low alignment
loss means the model assigns high likelihood to refusals of the harmful prompts in the search
data; it does not prove that the model refuses harmful requests in general. Run `python -m eval.run`
for generation-based safety (refusal rate), over-refusal and domain metrics before you deploy it,
and do not assume a merged model is safe because one of its sources was.
"""
