"""LoRA fine-tuning on prompt/response pairs (peft), for building merge sources.

Loss on response tokens only, rendered with the model's chat template: the same masking as the
scorer (`eval.loss.encode`), so a source is trained on exactly what the search measures.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from core.files import atomic_dir
from core.models import hub_name, load_model, load_tokenizer
from eval.loss import Example, encode, response_scores

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def train_lora(
    base: str,
    rows: list[dict],
    out: str | Path,
    *,
    epochs: int = 3,
    lr: float = 1e-3,
    r: int = 8,
    alpha: int = 16,
    batch_size: int = 8,
    max_length: int = 256,
    seed: int = 0,
    targets: tuple[str, ...] = DEFAULT_TARGETS,
    max_steps: int | None = None,
    save_dtype: str = "float32",
    card: str | None = None,
) -> Path:
    """Train a LoRA adapter on rows of {prompt, response}; save it (safetensors) to `out`,
    atomically (temporary folder, then rename), with `card` as its README.md. `save_dtype`
    bfloat16 halves the adapter size."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = load_tokenizer(base)
    model = get_peft_model(
        load_model(base, torch.float32),
        LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets), task_type="CAUSAL_LM"
        ),
    )
    model.train()
    examples = [e for e in (encode(tok, x["prompt"], x["response"], max_length) for x in rows) if e]
    opt, sched, steps = _optimizer(model, lr, epochs * -(-len(examples) // batch_size), max_steps)
    bar = tqdm(total=steps, desc=f"train {Path(out).name}", unit="step", leave=False)
    for batch in _batches(examples, batch_size, steps, rng):
        ids, labels, attn = _padded(batch, _pad_id(tok))
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        _step(loss, opt, sched, bar)
    bar.close()
    return _save(model, base, out, save_dtype, card)


def _save(model, base: str, out: str | Path, save_dtype: str, card: str | None) -> Path:
    # the adapter names its base portably (a Hub id), never this machine's install path
    model.peft_config["default"].base_model_name_or_path = hub_name(base) or str(base)
    with atomic_dir(out, kind="adapter") as tmp:
        model.to(getattr(torch, save_dtype)).save_pretrained(tmp, safe_serialization=True)
        if card is not None:  # inside: the folder's marker lists it as alignmerge's own
            (tmp / "README.md").write_text(card)
    return Path(out)


def _pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def _optimizer(model, lr: float, steps: int, max_steps: int | None):
    """AdamW on the trainable parameters, the learning rate decaying linearly to 0 over the steps."""
    steps = min(steps, max_steps) if max_steps else steps
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / max(1, steps)), steps


def _batches(items: list, batch_size: int, steps: int, rng: random.Random):
    """`steps` batches of `batch_size`, a new shuffle each pass (epoch)."""
    step = 0
    while step < steps:
        rng.shuffle(items)
        for i in range(0, len(items), batch_size):
            if step >= steps:
                return
            step += 1
            yield items[i : i + batch_size]


def _padded(batch: list[Example], pad: int):
    """input_ids, labels (-100 outside the response) and attention mask of a right-padded batch."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad)
    labels = torch.full((len(batch), width), -100)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    for b, e in enumerate(batch):
        n = len(e.input_ids)
        ids[b, :n] = torch.tensor(e.input_ids)
        labels[b, e.n_prompt : n] = ids[b, e.n_prompt : n]
        attn[b, :n] = 1
    return ids, labels, attn


def _step(loss, opt, sched, bar) -> None:
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    bar.update(1)
    bar.set_postfix(loss=f"{loss.item():.3f}")


def _response_logps(model, batch: list[Example], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the summed log-probability of its response tokens, and how many there are
    (the scorer's head on response positions only: `eval.loss.response_scores`)."""
    ids, labels, attn = _padded(batch, pad)
    target = torch.full_like(labels, -100)
    target[:, :-1] = labels[:, 1:]  # target[b, j]: the token predicted at position j
    n = (target != -100).sum(1)
    ce, _ = response_scores(model, ids, attn, target)
    return -ce * n, n


def prefer_lora(
    base: str,
    adapter: str | Path,
    pairs: list[dict],
    out: str | Path,
    *,
    beta: float = 0.1,
    lr: float = 5e-4,
    epochs: int = 1,
    nll_weight: float = 1.0,
    batch_size: int = 8,
    max_length: int = 256,
    seed: int = 0,
    max_steps: int | None = None,
    save_dtype: str = "float32",
    card: str | None = None,
) -> Path:
    """Go on training a LoRA adapter on preference pairs {prompt, response (chosen), rejected}: DPO
    (Rafailov et al. 2023, arXiv:2305.18290, eq. 7) with the adapter as trained as the reference
    policy, plus `nll_weight` x the chosen answers' mean token NLL (RPO, Pang et al. 2024,
    arXiv:2404.19733, which keeps DPO from lowering the chosen answers' likelihood too). Loss on
    response tokens only, as in `train_lora`; saved to `out` the same way."""
    from peft import PeftModel

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = load_tokenizer(base)
    pad = _pad_id(tok)
    model = PeftModel.from_pretrained(load_model(base, torch.float32), str(adapter), is_trainable=True)
    encoded = [
        tuple(encode(tok, x["prompt"], x[k], max_length) for k in ("response", "rejected")) for x in pairs
    ]
    encoded = [pair for pair in encoded if all(pair)]
    if not encoded:
        raise ValueError(f"no preference pair has both answers within max_length={max_length} tokens")
    model.eval()
    with torch.no_grad():  # the reference policy's log-probabilities, once
        reference = []
        for i in range(0, len(encoded), batch_size):
            flat = [e for pair in encoded[i : i + batch_size] for e in pair]
            reference += _response_logps(model, flat, pad)[0].view(-1, 2).tolist()
    model.train()
    items = list(zip(encoded, reference))
    opt, sched, steps = _optimizer(model, lr, epochs * -(-len(items) // batch_size), max_steps)
    bar = tqdm(total=steps, desc=f"prefer {Path(out).name}", unit="step", leave=False)
    for batch in _batches(items, batch_size, steps, rng):
        logp, n = _response_logps(model, [e for pair, _ in batch for e in pair], pad)
        logp, n = logp.view(-1, 2), n.view(-1, 2)
        ref = torch.tensor([r for _, r in batch])
        margin = (logp[:, 0] - ref[:, 0]) - (logp[:, 1] - ref[:, 1])
        loss = -F.logsigmoid(beta * margin).mean() + nll_weight * (-logp[:, 0] / n[:, 0]).mean()
        _step(loss, opt, sched, bar)
    bar.close()
    return _save(model, base, out, save_dtype, card)


def average_lora(
    base: str, adapters: list[Path], out: str | Path, *, save_dtype: str = "float32", card: str | None = None
) -> Path:
    """The uniform soup of LoRA adapters of one base (Wortsman et al. 2022, arXiv:2203.05482): the
    mean of their weight deltas, sum_i s_i B_i A_i / n. Exact: peft's `cat` combination stacks the
    ranks (r = the sum of theirs) instead of fitting the mean at one rank. Saved as `train_lora` saves."""
    from peft import PeftModel

    names = [f"soup{i}" for i in range(len(adapters))]
    model = PeftModel.from_pretrained(
        load_model(base, torch.float32), str(adapters[0]), adapter_name=names[0]
    )
    for name, adapter in zip(names[1:], adapters[1:]):
        model.load_adapter(str(adapter), adapter_name=name)
    model.add_weighted_adapter(names, [1 / len(names)] * len(names), "default", combination_type="cat")
    model.set_adapter("default")
    for name in names:
        model.delete_adapter(name)
    return _save(model, base, out, save_dtype, card)
