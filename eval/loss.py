"""The scorer: mean token cross-entropy on response tokens only (docs/method.md §3).

Each (prompt, response) is rendered with the model's chat template; prompt tokens are masked, so
the loss is the model's surprise at the reference answer. A set's loss is the mean over examples
of each example's mean token CE (the paper's HF per-sample loss, averaged).

With `refusal_tokens`, the same forward pass also gives each example's refusal-opening mass: the
probability of those tokens (the first tokens of `eval.judge.REFUSAL_OPENINGS`) at the first
response position, i.e. how likely the model is to start its answer as a refusal. It reads only
the first token, so it bounds the openings' mass from above ("I" also starts "I'd be glad to").

Batches are padded, built from examples sorted by length so padding stays small, and sized by a
token budget. Logits are computed for response positions only: the lm_head over a 49k vocab is
a large share of a small model's forward, and prompt positions would be thrown away.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from core.errors import DataError, ModelLoadError


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
        raise ModelLoadError(
            "the base's chat template renders the user turn differently with and without the "
            "answer (add_generation_prompt's text is not where the answer starts), so the prompt "
            "tokens cannot be masked: fix the template in tokenizer_config.json or chat_template.jinja"
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


def first_response_tokens(tokenizer, responses: Sequence[str]) -> list[int]:
    """The token each response starts with, rendered as the answer of a chat turn."""
    first = (encode(tokenizer, "Hello", r, 64) for r in responses)
    return sorted({e.input_ids[e.n_prompt] for e in first if e is not None})


@functools.lru_cache(maxsize=8)
def longest_token(tokenizer) -> int:
    """Characters of the tokenizer's longest vocabulary entry (a bound on text per token)."""
    return max(len(t) for t in tokenizer.get_vocab())


def length_batches(
    examples: list[Example], batch_tokens: int, keep: list[int] | None = None
) -> list[list[int]]:
    """Indices (of `keep`, default all) grouped so that (longest in batch) x (batch size) <= batch_tokens."""
    order = sorted(range(len(examples)) if keep is None else keep, key=lambda i: len(examples[i].input_ids))
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
        refusal_tokens: Sequence[int] = (),
    ):
        self.device, self.batch_tokens = device, batch_tokens
        self._fold_batches: dict[tuple, list] = {}  # minibatch_backward's, built on first use
        self.refusal_tokens = torch.tensor(sorted(set(refusal_tokens)), dtype=torch.long, device=device)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.examples: dict[str, list[Example]] = {}
        self.skipped: dict[str, int] = {}
        for name, rows in sets.items():
            encoded = [encode(tokenizer, r["prompt"], r["response"], max_length) for r in rows]
            self.examples[name] = [e for e in encoded if e is not None]
            self.skipped[name] = len(encoded) - len(self.examples[name])
            if not self.examples[name]:
                raise DataError(
                    f"set {name!r}: no example has a response token within "
                    f"max_length={max_length}; raise data.max_length"
                )
        # An example in several sets (each domain's test rows are also in "domain") is scored once,
        # in the batches of the first set that has it: same[name][i] = (that set, its index there).
        first: dict[tuple, tuple[str, int]] = {}
        self.same = {
            n: [first.setdefault((tuple(e.input_ids), e.n_prompt), (n, i)) for i, e in enumerate(ex)]
            for n, ex in self.examples.items()
        }
        # Interleave the sets' batches so intermediate reports (for pruning) see every set early.
        per_set = {
            n: [self._collate(n, b) for b in length_batches(ex, batch_tokens, self._own(n))]
            for n, ex in self.examples.items()
        }
        self.batches = _interleave({n: b for n, b in per_set.items() if b})

    def _own(self, name: str) -> list[int]:
        return [i for i, (owner, _) in enumerate(self.same[name]) if owner == name]

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

    def score(
        self,
        model,
        on_batch: Callable[[int, dict[str, list[float]]], None] | None = None,
        progress: bool = False,
        backward: dict[str, float] | None = None,
    ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
        """Per-example mean token CE for every set and, with refusal tokens, per-example
        refusal-opening mass (else empty lists), in the order of the set's (kept) examples.
        `on_batch(step, losses_so_far)` is called after each batch (the search reports
        intermediate values to its pruner from it). With `backward` ({set: weight}), the gradient
        of sum_k weight_k L_k (L_k: set k's mean) is accumulated into the model's `.grad`,
        one batch at a time."""
        losses: dict[str, list[float]] = {n: [] for n in self.examples}
        mass: dict[str, list[float]] = {n: [] for n in self.examples}
        order: dict[str, list[int]] = {n: [] for n in self.examples}
        batches = tqdm(self.batches, desc="scoring", unit="batch", leave=False, disable=not progress)
        tokens = self.refusal_tokens if len(self.refusal_tokens) else None
        scored = self._scored(model, batches, self._gradient_weights(backward or {}), tokens)
        for step, (name, idx, ce, first_mass) in enumerate(scored):
            losses[name].extend(ce.tolist())
            if first_mass is not None:
                mass[name].extend(first_mass.detach().tolist())
            order[name].extend(idx)
            if on_batch is not None:
                on_batch(step, losses)

        def ordered(values):
            if not any(values.values()):  # no refusal tokens: no masses
                return {n: [] for n in values}
            scored = {n: dict(zip(order[n], values[n])) for n in values}
            return {n: [scored[o][j] for o, j in pairs] for n, pairs in self.same.items()}

        return ordered(losses), ordered(mass)

    def minibatch_backward(self, model, backward: dict[str, float], fold: int, folds: int) -> float:
        """Minibatch `fold` of `folds`: the examples at positions i with i % folds == fold of every
        set (strided, so every set with at least `folds` examples is in every minibatch).
        Accumulates into `.grad` the gradient of sum_k weight_k L_k, each L_k the mean over the
        set's examples in this minibatch (the minibatch's estimate of the whole objective, which it
        returns); with sets that divide evenly, the minibatches' gradients average to the whole one."""
        weights = self._gradient_weights(backward, fold, folds)
        key = (folds, fold, tuple(sorted(weights)))
        if key not in self._fold_batches:  # only the examples this minibatch weighs
            self._fold_batches[key] = [
                self._collate(n, b)
                for n, w in weights.items()
                for b in length_batches(self.examples[n], self.batch_tokens, w.nonzero()[:, 0].tolist())
            ]
        total = 0.0
        for name, idx, ce, _ in self._scored(model, self._fold_batches[key], weights, None):
            total += float((ce.double() * weights[name][idx]).sum())
        return total

    def _scored(self, model, batches, weights: dict[str, torch.Tensor], tokens):
        """(set, indices, per-example CE, refusal masses) per batch; batches of examples with a
        gradient weight run with autograd on and backpropagate sum(weight x CE)."""
        for name, ids, attn, target, idx in batches:
            w = weights[name][idx] if name in weights else None
            with torch.set_grad_enabled(w is not None and bool(w.any())):
                ce, first_mass = response_scores(model, ids, attn, target, tokens)
                if w is not None and w.any():
                    same = bool((w == w[0]).all())  # one set's examples only: its weight / size
                    (ce.sum() * w[0].item() if same else (ce * w.to(ce.dtype)).sum()).backward()
            yield name, idx, ce.detach(), first_mass

    def _gradient_weights(self, backward: dict[str, float], fold: int = 0, folds: int = 1):
        """d(sum_k weight_k L_k)/d(CE of each scored example), per owning set: an example in several
        sets gets each set's weight / size. With folds > 1, only the examples at minibatch `fold`'s
        positions of each set, and each set's size is its count in that minibatch."""
        out = {n: torch.zeros(len(ex), dtype=torch.float64) for n, ex in self.examples.items()}
        for name, weight in backward.items():
            members = [pair for i, pair in enumerate(self.same.get(name, [])) if i % folds == fold]
            for owner, j in members:
                out[owner][j] += weight / len(members)
        return {n: w for n, w in out.items() if w.any()}

    def example_losses(self, model, **kwargs) -> dict[str, list[float]]:
        return self.score(model, **kwargs)[0]

    def losses(self, model, **kwargs) -> dict[str, float]:
        return means(self.example_losses(model, **kwargs))


def means(per_example: dict[str, list[float]]) -> dict[str, float]:
    """The mean of each set's values (sets without values are left out)."""
    return {n: sum(v) / len(v) for n, v in per_example.items() if v}


HEAD_CHUNK = 256  # response positions per lm_head + CE step: the logits stay HEAD_CHUNK x vocab


def response_scores(model, ids, attn, target, tokens=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean CE per row over positions where target != -100 and, when `tokens` is given, the
    probability of those tokens at each row's first scored position. The head runs on the scored
    positions only, a chunk at a time (a batch's full logits are tokens x vocab floats: 0.4 GB
    for 2048 tokens of SmolLM2)."""
    scored = target != -100
    counts = scored.sum(1)
    first = torch.cumsum(counts, 0) - counts  # each row's first scored position, among the scored
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if decoder is not None and head is not None and not _has_logit_transform(model.config):
        hidden = decoder(input_ids=ids, attention_mask=attn).last_hidden_state[scored]
        chunks = zip(hidden.split(HEAD_CHUNK), target[scored].split(HEAD_CHUNK))
        if torch.is_grad_enabled():  # keep no chunk's logits for the backward pass: recompute them
            token_ce = torch.cat([checkpoint(_head_ce, head, h, t, use_reentrant=False) for h, t in chunks])
        else:
            token_ce = torch.cat([_head_ce(head, h, t) for h, t in chunks])
        first_logits = head(hidden[first[counts > 0]]).float() if tokens is not None else None
    else:
        logits = model(input_ids=ids, attention_mask=attn).logits[scored]
        token_ce = F.cross_entropy(logits.float(), target[scored], reduction="none")
        first_logits = logits[first[counts > 0]].float() if tokens is not None else None
    rows = scored.nonzero()[:, 0]
    per_row = torch.zeros(ids.shape[0], device=ids.device).index_add_(0, rows, token_ce)
    mass = None
    if first_logits is not None:
        mass = torch.zeros(ids.shape[0], device=ids.device)
        mass[counts > 0] = first_logits.softmax(-1)[:, tokens].sum(-1)
    return per_row / counts.clamp(min=1), mass


def _head_ce(head, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), target, reduction="none")


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
