"""What a search holds, at the default model's size and at SmolLM2-1.7B's shape (docs/memory.md).

    python bench/bench_memory.py [--shapes default 1.7b] [--json bench/results/memory.json]

For each shape, sources and method, one fresh process (so peak RSS is its own) loads the search
as `optimize.search` does, merges `--candidates` random per-layer candidates and scores each, then
reports peak resident memory (VmHWM), merge seconds per candidate, forward seconds (scoring the
same tokens again without merging) and trial / forward. Side by side in one run:

- `new`: theta_base and dense task vectors in bfloat16 (the checkpoints' dtype), LoRA factored,
  the head run 256 positions at a time;
- `today` (the design before issue 15): float32 base and task vectors, LoRA deltas dense, the
  head over every response position at once. Run only where its estimate fits in RAM.

Shapes: `default` is SmolLM2-135M-Instruct (dequantized from the packaged GGUF, saved in
bfloat16); `1.7b` is a random model with SmolLM2-1.7B's shape (hidden 2048, 24 layers,
intermediate 8192, vocab 49152, tied embeddings), built from a config, no download. Dense sources
are base + seeded noise on every tensor, saved in bfloat16; LoRA sources are r=16 on every linear
layer of every block. The working model is float32 at the default size and bfloat16 at 1.7B (a GPU
run's dtype), where the scoring set is small (bf16 matmuls are emulated on CPUs without
AVX512-BF16).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CACHE = ROOT / "bench" / ".cache" / "memory"

# The working model: float32 at the default size (what the demo runs on a CPU without native
# bf16), bfloat16 at 1.7B (a GPU run's dtype; the memory goal is stated for it).
WORKING = {"default": "float32", "1.7b": "bfloat16"}
SHAPES = {  # LlamaConfig fields
    "1.7b": dict(hidden_size=2048, num_hidden_layers=24, intermediate_size=8192, num_attention_heads=32),
}


def vm_hwm_gb() -> float:
    """Peak resident set of this process (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError("no VmHWM")


# ----------------------------------------------------------------------------- the models
def make_base(shape: str) -> Path:
    import torch

    from core.models import load_model, load_tokenizer, save_model_atomic

    out = CACHE / shape / "base"
    if (out / "config.json").exists():
        return out
    tokenizer = load_tokenizer("default")  # SmolLM2's tokenizer and chat template (vocab 49152)
    if shape == "default":
        model = load_model("default", torch.bfloat16)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=49152,
            tie_word_embeddings=True,
            num_key_value_heads=SHAPES[shape]["num_attention_heads"],
            max_position_embeddings=2048,
            **SHAPES[shape],
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    save_model_atomic(model, tokenizer, out)
    return out


def make_dense(base: Path, k: int) -> Path:
    import torch

    from core.models import load_model, load_tokenizer, save_model_atomic

    out = base.parent / f"dense{k}"
    if not (out / "config.json").exists():
        model = load_model(base, torch.bfloat16)
        gen = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for p in model.parameters():
                noise = torch.randn(p.shape, generator=gen) * 0.02 * p.float().abs().mean()
                p.add_(noise.to(p.dtype))
        save_model_atomic(model, load_tokenizer(base), out)
    return out


def make_lora(base: Path, k: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    from core.models import load_model

    out = base.parent / f"lora{k}"
    if not (out / "adapter_config.json").exists():
        torch.manual_seed(k)
        cfg = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
        get_peft_model(load_model(base, torch.bfloat16), cfg).save_pretrained(out, safe_serialization=True)
    return out


# ----------------------------------------------------------------------------- one measurement
def measure(args) -> dict:
    """Run in its own process: load, merge and score, report peak memory and times."""
    import numpy as np

    import eval.loss
    from bench.bench_merge import random_candidate
    from optimize.config import load_config
    from optimize.context import prepare
    from optimize.deltas import dense
    from optimize.memory import estimate

    cfg = load_config(args.config)
    if args.design == "today":
        cfg = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"store_dtype": "float32"})})
        eval.loss.HEAD_CHUNK = 1 << 30
    est = estimate(cfg)
    t0 = time.perf_counter()
    ctx = prepare(cfg)
    if args.design == "today":
        ctx.merger.task_vectors = [{k: dense(d) for k, d in tv.items()} for tv in ctx.merger.task_vectors]
    load_s, after_load = time.perf_counter() - t0, vm_hwm_gb()
    rng = np.random.default_rng(0)
    merge_s, score_s, forward_s = [], [], []
    for _ in range(args.candidates + 1):  # the first one compiles the kernel and sorts: dropped
        c = random_candidate(ctx, rng)
        t0 = time.perf_counter()
        model = ctx.merger.apply(c)
        t1 = time.perf_counter()
        ctx.scorer.losses(model)
        t2 = time.perf_counter()
        ctx.scorer.losses(model)  # the same forward passes, no merge
        t3 = time.perf_counter()
        merge_s.append(t1 - t0), score_s.append(t2 - t1), forward_s.append(t3 - t2)
    med = statistics.median
    first_merge = merge_s[0]
    merge_s, score_s, forward_s = merge_s[1:], score_s[1:], forward_s[1:]
    return {
        "peak_rss_gb": round(vm_hwm_gb(), 3),
        "peak_after_load_gb": round(after_load, 3),
        "estimate_gb": round(est.peak / 1e9, 3),
        "load_s": round(load_s, 1),
        "merge_s": round(med(merge_s), 3),
        "score_s": round(med(score_s), 3),
        "forward_s": round(med(forward_s), 3),
        "trial_over_forward": round((med(merge_s) + med(score_s)) / med(forward_s), 3),
        "first_merge_s": round(first_merge, 1),
        "scoring_tokens": ctx.scorer.padded_tokens,
    }


# ----------------------------------------------------------------------------- the driver
def write_config(shape: str, base: Path, sources: list[Path], method: str, n_rows: int) -> Path:
    import yaml

    from bench.bench_merge import scoring_rows

    rows = scoring_rows(n_rows)
    folder = CACHE / shape
    data = {}
    for name, items in rows.items():
        data[name] = folder / f"{name}.jsonl"
        data[name].write_text("".join(json.dumps(r) + "\n" for r in items))
    cfg = {
        "name": f"mem-{shape}",
        "out": str(folder / "run"),
        "base": str(base),
        "sources": [{"name": p.name, "path": str(p)} for p in sources],
        "merge": {"method": method, "normalize": False},
        "search": {"parametrization": "layerwise"},
        "data": {"alignment": str(data["alignment"]), "domain": str(data["domain"]), "max_length": 256},
        "runtime": {"dtype": WORKING[shape], "store_dtype": "auto", "device": "cpu"},
    }
    path = folder / f"{method}-{sources[0].name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def lora_sizes_of(path: Path):
    from optimize.memory import lora_sizes

    return lora_sizes(path, 2)


def run_child(config: Path, design: str, candidates: int) -> dict:
    cmd = [sys.executable, __file__, "measure", "--config", str(config), "--design", design]
    out = subprocess.run(
        [*cmd, "--candidates", str(candidates)], capture_output=True, text=True, env={**os.environ}
    )
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1][:300]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd")
    m = sub.add_parser("measure")
    m.add_argument("--config", required=True)
    m.add_argument("--design", choices=["new", "today"], default="new")
    m.add_argument("--candidates", type=int, default=3)
    ap.add_argument("--shapes", nargs="+", default=["default", "1.7b"])
    ap.add_argument("--candidates", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties"])
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "memory.json"))
    args = ap.parse_args()
    if args.cmd == "measure":
        print(json.dumps(measure(args)))
        return
    import psutil

    from optimize.config import load_config
    from optimize.memory import estimate

    results = []
    for shape in args.shapes:
        base = make_base(shape)
        pools = {"dense": [make_dense(base, k) for k in (1, 2)], "lora": [make_lora(base, k) for k in (1, 2)]}
        n_rows = 16 if shape == "default" else 1
        for kind, sources in pools.items():
            for method in args.methods:
                config = write_config(shape, base, sources, method, n_rows)
                for design in ("new", "today"):
                    cfg = load_config(config)
                    if design == "today":
                        rt = cfg.runtime.model_copy(update={"store_dtype": "float32"})
                        cfg = cfg.model_copy(update={"runtime": rt})
                    est_gb = estimate(cfg).peak / 1e9
                    if design == "today" and kind == "lora":  # held dense in float32, not factored
                        sizes = map(lora_sizes_of, sources)
                        est_gb += sum(4 * covered - held for held, covered, _ in sizes) / 1e9
                    row = {"shape": shape, "sources": kind, "method": method, "design": design}
                    if est_gb > 0.9 * psutil.virtual_memory().total / 1e9:
                        row["skipped"] = f"estimate {est_gb:.1f} GB does not fit this machine"
                    else:
                        row |= run_child(config, design, args.candidates)
                    print(json.dumps(row), flush=True)
                    results.append(row)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
