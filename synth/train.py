"""LoRA fine-tuning on prompt/response pairs (peft), for building merge sources.

Loss on response tokens only, rendered with the model's chat template: the same masking as the
scorer (`eval.loss.encode`), so a source is trained on exactly what the search measures.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from core.files import atomic_dir
from core.models import hub_name, load_model, load_tokenizer
from eval.loss import encode

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
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    steps = epochs * -(-len(examples) // batch_size)
    if max_steps:
        steps = min(steps, max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / max(1, steps))
    bar = tqdm(total=steps, desc=f"train {Path(out).name}", unit="step", leave=False)
    step = 0
    while step < steps:
        rng.shuffle(examples)
        for i in range(0, len(examples), batch_size):
            if step >= steps:
                break
            batch = examples[i : i + batch_size]
            width = max(len(e.input_ids) for e in batch)
            ids = torch.full((len(batch), width), pad)
            labels = torch.full((len(batch), width), -100)
            attn = torch.zeros((len(batch), width), dtype=torch.long)
            for b, e in enumerate(batch):
                n = len(e.input_ids)
                ids[b, :n] = torch.tensor(e.input_ids)
                labels[b, e.n_prompt : n] = ids[b, e.n_prompt : n]
                attn[b, :n] = 1
            loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    # the adapter names its base portably (a Hub id), never this machine's install path
    model.peft_config["default"].base_model_name_or_path = hub_name(base) or str(base)
    with atomic_dir(out, kind="adapter") as tmp:
        model.to(getattr(torch, save_dtype)).save_pretrained(tmp, safe_serialization=True)
        if card is not None:  # inside: the folder's marker lists it as alignmerge's own
            (tmp / "README.md").write_text(card)
    return Path(out)
