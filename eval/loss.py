"""The scorer: mean token cross-entropy on response tokens only (docs/method.md §3).

Each (prompt, response) is rendered with the model's chat template; prompt tokens are masked, so
the loss is the model's surprise at the reference answer. A set's loss is the mean over examples
of each example's mean token CE (the paper's HF per-sample loss, averaged).

Batches are padded, built from examples sorted by length so padding stays small, and sized by a
token budget. Logits are computed for response positions only: the lm_head over a 49k vocab is
a large share of a small model's forward, and prompt positions would be thrown away.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    n_prompt: int  # tokens before the response; the loss is on input_ids[n_prompt:]


def encode(tokenizer, prompt: str, response: str, max_length: int) -> Example | None:
    """Chat-template rendering with the prompt masked by character offsets, so a BPE merge
    across the prompt/response boundary cannot shift the mask. None if no response token fits."""
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    head = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    if not full.startswith(head):
        raise ValueError(
            "the chat template renders the prompt differently with and without the "
            "answer; cannot mask prompt tokens"
        )
    # Tokenize only what can fit: max_length tokens cover at most max_length * (longest token)
    # characters, so a 50 MB row costs what a short one does.
    longest = longest_token(tokenizer)
    if len(head) > max_length * longest:
        return None  # the prompt alone is longer than max_length tokens
    full = full[: len(head) + (max_length + 2) * longest]
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"][:max_length]
    n_prompt = sum(1 for start, _ in enc["offset_mapping"][: len(ids)] if start < len(head))
    if n_prompt >= len(ids) or n_prompt == 0:
        return None
    return Example(tuple(ids), n_prompt)


@functools.lru_cache(maxsize=8)
def longest_token(tokenizer) -> int:
    """Characters of the tokenizer's longest vocabulary entry (a bound on text per token)."""
    return max(len(t) for t in tokenizer.get_vocab())


def length_batches(examples: list[Example], batch_tokens: int) -> list[list[int]]:
    """Indices grouped so that (longest in batch) x (batch size) <= batch_tokens."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    batches, current = [], []
    for i in order:
        longest = len(examples[i].input_ids)  # sorted: the newest is the longest
        if current and longest * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class Scorer:
    """Scores a model on named sets ({"alignment": rows, "domain": rows}) of prompt/response."""

    def __init__(
        self,
        tokenizer,
        sets: dict[str, list[dict]],
        max_length: int = 1024,
        batch_tokens: int = 4096,
        device: str = "cpu",
    ):
        self.device = device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.examples: dict[str, list[Example]] = {}
        self.skipped: dict[str, int] = {}
        for name, rows in sets.items():
            encoded = [encode(tokenizer, r["prompt"], r["response"], max_length) for r in rows]
            self.examples[name] = [e for e in encoded if e is not None]
            self.skipped[name] = len(encoded) - len(self.examples[name])
            if not self.examples[name]:
                raise ValueError(
                    f"set {name!r}: no example has a response token within "
                    f"max_length={max_length}; raise data.max_length"
                )
        # Interleave the sets' batches so intermediate reports (for pruning) see every set early.
        per_set = {
            n: [self._collate(n, b) for b in length_batches(ex, batch_tokens)]
            for n, ex in self.examples.items()
        }
        self.batches = _interleave(per_set)

    def _collate(self, name: str, idx: list[int]):
        exs = [self.examples[name][i] for i in idx]
        width = max(len(e.input_ids) for e in exs)
        ids = torch.full((len(exs), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(exs), width), dtype=torch.long)
        # target[b, j] is the token predicted at position j; -100 where not scored
        target = torch.full((len(exs), width), -100, dtype=torch.long)
        for b, e in enumerate(exs):
            n = len(e.input_ids)
            ids[b, :n] = torch.tensor(e.input_ids)
            attn[b, :n] = 1
            target[b, e.n_prompt - 1 : n - 1] = ids[b, e.n_prompt : n]
        return name, ids.to(self.device), attn.to(self.device), target.to(self.device), idx

    @property
    def n_tokens(self) -> dict[str, int]:
        """Tokens fed to the model per set (excluding padding)."""
        return {n: sum(len(e.input_ids) for e in ex) for n, ex in self.examples.items()}

    @property
    def padded_tokens(self) -> int:
        return sum(ids.numel() for _, ids, *_ in self.batches)

    @torch.no_grad()
    def example_losses(
        self,
        model,
        on_batch: Callable[[int, dict[str, list[float]]], None] | None = None,
        progress: bool = False,
    ) -> dict[str, list[float]]:
        """Per-example mean token CE for every set, in the order of the set's (kept) examples.
        `on_batch(step, losses_so_far)` is called after each batch (the search reports
        intermediate values to its pruner from it)."""
        losses: dict[str, list[float]] = {n: [] for n in self.examples}
        order: dict[str, list[int]] = {n: [] for n in self.examples}
        batches = tqdm(self.batches, desc="scoring", unit="batch", leave=False, disable=not progress)
        for step, (name, ids, attn, target, idx) in enumerate(batches):
            losses[name].extend(response_losses(model, ids, attn, target).tolist())
            order[name].extend(idx)
            if on_batch is not None:
                on_batch(step, losses)
        return {n: [v for _, v in sorted(zip(order[n], losses[n]))] for n in losses}

    def losses(self, model, **kwargs) -> dict[str, float]:
        return {n: sum(v) / len(v) for n, v in self.example_losses(model, **kwargs).items()}


HEAD_CHUNK = 256  # response positions per lm_head + CE step: the logits stay HEAD_CHUNK x vocab


def response_losses(model, ids, attn, target) -> torch.Tensor:
    """Mean CE per row over positions where target != -100. The head runs on those positions
    only, a chunk at a time (a batch's full logits are tokens x vocab floats: 0.4 GB for 2048
    tokens of SmolLM2)."""
    scored = target != -100
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if decoder is not None and head is not None and not _has_logit_transform(model.config):
        hidden = decoder(input_ids=ids, attention_mask=attn).last_hidden_state[scored]
        chunks = zip(hidden.split(HEAD_CHUNK), target[scored].split(HEAD_CHUNK))
        token_ce = torch.cat([F.cross_entropy(head(h).float(), t, reduction="none") for h, t in chunks])
    else:
        logits = model(input_ids=ids, attention_mask=attn).logits[scored]
        token_ce = F.cross_entropy(logits.float(), target[scored], reduction="none")
    rows = scored.nonzero()[:, 0]
    per_row = torch.zeros(ids.shape[0], device=ids.device).index_add_(0, rows, token_ce)
    return per_row / scored.sum(1).clamp(min=1)


def _has_logit_transform(config) -> bool:
    """Models whose logits are not just lm_head(hidden) go through the full forward."""
    return any(getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))


def _interleave(per_set: dict[str, list]) -> list:
    """Merge lists proportionally: item j of a list of length n sits at position (j + .5) / n."""
    keyed = [
        ((j + 0.5) / len(items), k, item)
        for k, items in enumerate(per_set.values())
        for j, item in enumerate(items)
    ]
    return [item for *_, item in sorted(keyed, key=lambda x: (x[0], x[1]))]
