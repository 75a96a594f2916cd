"""Similarity and contribution analysis of a merge (MergeAlign's "model similarity metrics" and
"contributions of individual models", arXiv 2411.06824; the paper does not pin the exact metrics,
so these are the standard ones, defined here and in docs/method.md §8).

Notation: tau_s = theta_s - theta_base for source s, tau_m = theta_merged - theta_base, and
<x, y>_g the dot product over the parameters of layer group g (embeddings, each transformer
block, final norm, lm_head, as `optimize.sources.layer_groups` groups them). Per group g:

  task-vector cosine      cos(tau_a, tau_b)_g = <tau_a, tau_b>_g / (||tau_a||_g ||tau_b||_g)
  relative distance       d_s,g = ||theta_m - theta_s||_g / ||theta_s - theta_base||_g
                                = ||tau_m - tau_s||_g / ||tau_s||_g
                          (0: the merged layer is source s; 1: as far from s as the base is)
  effective coefficient   beta_s,g = <tau_m, tau_s>_g / ||tau_s||_g^2
                          (the least-squares weight of tau_s in tau_m; for task arithmetic with
                          orthogonal task vectors it is exactly lambda * w_s,g)
  contribution share      share_s,g = |p_s,g| / sum_t |p_t,g|, p_s,g = <tau_m, tau_s>_g / ||tau_s||_g
                          (the length of tau_m along each source's direction, i.e. the share of
                          ||beta_s tau_s||, the "||w_i tau_i|| share" of task arithmetic)

A group a source does not touch (||tau_s||_g = 0, e.g. the embeddings of a LoRA) has no value
(NaN). Representation similarity is linear CKA (Kornblith et al. 2019) between the hidden
states of two models on the same tokens:

  CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F),  X, Y (n tokens x d) column-centred

1 for identical representations, invariant to orthogonal transforms and isotropic scaling.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import torch

TaskVector = dict[str, torch.Tensor]  # parameter name -> delta; absent names have delta 0


# ----------------------------------------------------------------------------- weight space
def group_dot(x: TaskVector, y: TaskVector, of_param: dict[str, int], n_groups: int) -> np.ndarray:
    """<x, y>_g for every group g (float64 accumulation)."""
    out = np.zeros(n_groups)
    for name in x.keys() & y.keys():
        out[of_param[name]] += torch.vdot(x[name].flatten().double(), y[name].flatten().double()).item()
    return out


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, NaN where den is 0."""
    return np.divide(num, den, out=np.full_like(num, np.nan, dtype=float), where=den > 0)


def weight_metrics(
    sources: dict[str, TaskVector], merged: TaskVector, of_param: dict[str, int], n_groups: int
) -> dict[str, dict[str, np.ndarray]]:
    """Per-group cosine between task vectors (every pair), relative distance of the merged model
    to each source, effective coefficient and contribution share of each source (module doc)."""
    dot = lambda x, y: group_dot(x, y, of_param, n_groups)  # noqa: E731
    sq = {s: dot(t, t) for s, t in sources.items()}
    norm = {s: np.sqrt(v) for s, v in sq.items()}
    with_m = {s: dot(merged, t) for s, t in sources.items()}
    m_sq = dot(merged, merged)
    cosine = {
        f"{a} ~ {b}": _ratio(dot(sources[a], sources[b]), norm[a] * norm[b])
        for a, b in combinations(sources, 2)
    }
    distance = {s: _ratio(np.sqrt(np.maximum(m_sq - 2 * with_m[s] + sq[s], 0)), norm[s]) for s in sources}
    coefficient = {s: _ratio(with_m[s], sq[s]) for s in sources}
    projection = {s: np.abs(_ratio(with_m[s], norm[s])) for s in sources}
    total = np.nansum(np.stack(list(projection.values())), axis=0)
    share = {s: _ratio(p, total) for s, p in projection.items()}
    return {"cosine": cosine, "distance": distance, "coefficient": coefficient, "share": share}


# ----------------------------------------------------------------------------- representations
def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between two (n x d1), (n x d2) representations of the same n inputs."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    if x.shape[0] < max(x.shape[1], y.shape[1]):  # same value through the n x n Gram matrices
        gx, gy = x @ x.T, y @ y.T
        hsic, kk, ll = (gx * gy).sum(), (gx * gx).sum(), (gy * gy).sum()
    else:
        hsic, kk, ll = (y.T @ x).square().sum(), (x.T @ x).square().sum(), (y.T @ y).square().sum()
    den = torch.sqrt(kk * ll)
    return float(hsic / den) if den > 0 else float("nan")


def prompt_batches(tokenizer, prompts: list[str], max_length: int, batch_size: int = 8):
    """Chat-template-rendered prompts (with the generation prompt, no response), right-padded."""
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(texts), batch_size):
        ids = [
            tokenizer(t, add_special_tokens=False)["input_ids"][:max_length]
            for t in texts[start : start + batch_size]
        ]
        width = max(map(len, ids))
        batch = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for b, row in enumerate(ids):
            batch[b, : len(row)] = torch.tensor(row)
            mask[b, : len(row)] = 1
        yield batch, mask


@torch.no_grad()
def hidden_states(model, batches, layer_prefix: str) -> dict[str, torch.Tensor]:
    """Per group (`embed`, `layers.i`, `norm`): the hidden states (tokens x d, float32, CPU) on
    every prompt token except each sequence's first. The first position is an attention sink
    in many LLMs, with activations far larger than the rest; it would dominate linear CKA."""
    layers = model.get_submodule(layer_prefix.rstrip("."))
    captured: dict[str, torch.Tensor] = {}

    def keep(name):
        return lambda module, args, out: captured.__setitem__(name, out[0] if isinstance(out, tuple) else out)

    modules = {"embed": model.get_input_embeddings(), **{f"layers.{i}": m for i, m in enumerate(layers)}}
    hooks = [m.register_forward_hook(keep(name)) for name, m in modules.items()]
    feats: dict[str, list[torch.Tensor]] = {}
    device = next(model.parameters()).device
    try:
        for ids, mask in batches:
            captured["norm"] = model.get_decoder()(
                input_ids=ids.to(device), attention_mask=mask.to(device)
            ).last_hidden_state
            used = mask.bool().clone()
            used[:, 0] = False
            for name, h in captured.items():
                feats.setdefault(name, []).append(h[used.to(h.device)].float().cpu())
    finally:
        for h in hooks:
            h.remove()
    return {name: torch.cat(v) for name, v in feats.items()}


def cka_profile(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], groups: list[str]) -> np.ndarray:
    """Linear CKA per group between two `hidden_states` results (NaN for groups without states)."""
    return np.array([linear_cka(a[g], b[g]) if g in a and g in b else np.nan for g in groups])
