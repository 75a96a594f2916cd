"""Generation-based behaviour of a model held in memory: does it refuse harmful prompts, does it
wrongly refuse benign ones. Greedy decoding with transformers on left-padded batches, so the
search's working model is evaluated as it is, with no export or reload."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from eval.judge import refusal_rate


@torch.inference_mode()
def greedy_answers(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64, batch_size: int = 16
) -> list[str]:
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad less
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = [""] * len(texts)
    device = next(model.parameters()).device
    try:
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc="generating", unit="batch", leave=False, disable=len(starts) < 2):
            idx = order[start : start + batch_size]
            enc = tokenizer(
                [texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(device)
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=pad,
            )
            decoded = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            for i, text in zip(idx, decoded):
                out[i] = text.strip()
    finally:
        tokenizer.padding_side = side
    return out


def refusals(
    model, tokenizer, prompts: Sequence[str], judge, max_new_tokens: int = 64, batch_size: int = 16
) -> dict:
    """Share of prompts the model refuses (by `judge`), with the answers and verdicts."""
    answers = greedy_answers(model, tokenizer, prompts, max_new_tokens, batch_size)
    verdicts = judge.judge(list(prompts), answers)
    share = sum(v.refusal for v in verdicts) / len(verdicts) if verdicts else float("nan")
    return {"share": share, "answers": answers, "verdicts": [v.label for v in verdicts]}


def _by(rows: list[dict], verdicts, key: str, answered: bool = False) -> dict:
    groups: dict[str, list] = {}
    for r, v in zip(rows, verdicts):
        groups.setdefault(r.get(key) or "unspecified", []).append(v)
    field = "answered" if answered else "refused"
    sign = (lambda x: 1 - x) if answered else (lambda x: x)
    return {k: {"n": len(vs), field: sign(refusal_rate(vs))} for k, vs in sorted(groups.items())}


def refusal_summary(rows: list[dict], verdicts, answered: bool = False) -> dict:
    """Share refused (or answered, for benign prompts) overall, per category and per prompt set."""
    share = refusal_rate(verdicts)
    out = {"n": len(verdicts), "refused": share}
    if answered:
        out["answered"] = 1 - share
    out["by_category"] = _by(rows, verdicts, "category", answered)
    if any("set" in r for r in rows):
        out["by_set"] = _by(rows, verdicts, "set", answered)
    return out
