"""A tiny merge world for unit tests: a random 4-layer Llama base, two full fine-tunes of it
(base + structured noise), a LoRA adapter, and prompt/response JSONL sets. Built from configs,
no download."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.tiny import make_tiny_llama

SENTENCES = [
    "how do i make a good question",
    "what is the answer",
    "can you help me now",
    "why is the system good",
    "what do people think about this",
]


def make_variant(base: Path, out: Path, seed: int, scale: float = 0.05) -> Path:
    """A 'fine-tune' of `base`: every weight moved by seeded noise, saved as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.abs().mean().clamp(min=1e-3))
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def make_lora(base: Path, out: Path, seed: int, r: int = 4) -> Path:
    """A LoRA adapter with random (non-zero) A and B on attention and MLP projections."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False
    )
    get_peft_model(model, cfg).save_pretrained(out, safe_serialization=True)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("world")
    base = make_tiny_llama(root / "base", num_layers=4, seed=0)
    pairs = [{"prompt": a, "response": b} for a in SENTENCES for b in SENTENCES[:2]]
    return {
        "root": root,
        "base": base,
        "a": make_variant(base, root / "a", seed=1),
        "b": make_variant(base, root / "b", seed=2),
        "lora": make_lora(base, root / "lora", seed=3),
        "alignment": write_jsonl(root / "alignment.jsonl", pairs[:6]),
        "domain": write_jsonl(root / "domain.jsonl", pairs[4:]),
    }


def world_config(world: dict[str, Path], out: Path, **search) -> dict:
    """A config mapping for the tiny world (sources a and b)."""
    return {
        "name": "tiny",
        "out": str(out),
        "base": str(world["base"]),
        "sources": [
            {"name": "a", "path": str(world["a"]), "role": "alignment"},
            {"name": "b", "path": str(world["b"]), "role": "domain"},
        ],
        "merge": {"method": "task_arithmetic"},
        "search": {"n_trials": 3, "pruner": "none", **search},
        "data": {"alignment": str(world["alignment"]), "domain": str(world["domain"]), "batch_tokens": 256},
        "output": {"plots": False},
        # greedy answers compared with transformers' own; VLLMGreedy has its tests (test_behaviour)
        "runtime": {"generation": "transformers"},
    }
