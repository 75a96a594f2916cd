"""Merge overhead and memory of the in-memory search on SmolLM2-135M with two sources.

    python bench/bench_merge.py [--repeats 5] [--n-examples 32] [--json bench/results/merge.json]

Measures, in one process and side by side:
1. trial time (merge + score) / forward passes alone over the same scoring tokens, per method;
2. candidate -> model ready to score: our in-memory merge vs mergekit-evolve's way
   (`mergekit-yaml` to disk, then `from_pretrained` of the folder), task_arithmetic and TIES;
3. peak RSS after 5 and after 50 trials.
The two sources are dense: base + seeded noise on every tensor (the worst case for merge cost;
LoRA sources only touch the adapted modules). The scoring set is the demo's kind of data:
harmful prompt -> refusal and medical question -> answer, from data/seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.models import load_model, materialize_hf_folder  # noqa: E402
from eval.loss import Scorer  # noqa: E402
from optimize.config import validate_config  # noqa: E402
from optimize.context import prepare  # noqa: E402
from optimize.deltas import stored_bytes  # noqa: E402
from optimize.export import mergekit_config  # noqa: E402
from optimize.methods import Candidate  # noqa: E402

CACHE = ROOT / "bench" / ".cache"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_sources() -> tuple[Path, list[Path]]:
    base = materialize_hf_folder("default", CACHE / "base", dtype=torch.float32)
    sources = []
    for k in (1, 2):
        out = CACHE / f"source{k}"
        if not (out / "model.safetensors").exists():
            model = load_model(base, torch.float32)
            gen = torch.Generator().manual_seed(k)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * 0.02 * p.abs().mean())
            from core.models import load_tokenizer, save_model_atomic

            save_model_atomic(model, load_tokenizer(base), out)
        sources.append(out)
    return base, sources


def scoring_rows(n: int) -> dict[str, list[dict]]:
    seeds = ROOT / "data" / "seeds"
    harmful = [json.loads(x) for x in (seeds / "harmful_prompts.jsonl").read_text().splitlines()]
    refusals = [json.loads(x)["response"] for x in (seeds / "refusals.jsonl").read_text().splitlines()]
    medical = [json.loads(x) for x in (seeds / "medical_qa.jsonl").read_text().splitlines()]
    return {
        "alignment": [
            {"prompt": h["prompt"], "response": refusals[i % len(refusals)]}
            for i, h in enumerate(harmful[:n])
        ],
        "domain": [{"prompt": m["question"], "response": m["answer"]} for m in medical[:n]],
    }


def config(method: str, base: Path, sources: list[Path], rows, out: Path):
    return validate_config(
        {
            "name": f"bench-{method}",
            "out": str(out),
            "base": str(base),
            "sources": [{"name": f"s{i}", "path": str(p)} for i, p in enumerate(sources)],
            "merge": {"method": method, "normalize": False},
            "search": {"parametrization": "layerwise"},
            "data": {"alignment": "x", "domain": "y", "batch_tokens": 4096},
        }
    )


def random_candidate(ctx, rng, density=None) -> Candidate:
    n, g = len(ctx.cfg.sources), ctx.base.groups.n
    levels = np.array(ctx.space.density_levels)
    return Candidate(
        weight=rng.uniform(0.1, 1.0, (n, g)),
        density=np.full((n, g), density) if density else rng.choice(levels, (n, g)),
    )


def median(xs) -> float:
    return float(statistics.median(xs))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--n-examples", type=int, default=32)
    ap.add_argument("--mergekit-repeats", type=int, default=3)
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "merge.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    base, sources = make_sources()
    rows = scoring_rows(args.n_examples)
    results: dict = {"threads": torch.get_num_threads(), "n_examples": args.n_examples}
    tmp = Path(tempfile.mkdtemp(prefix="bench-merge-"))

    for method in ("task_arithmetic", "ties"):
        cfg = config(method, base, sources, rows, tmp / method)
        ctx = prepare(cfg, rows)
        scorer: Scorer = ctx.scorer
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        model = ctx.merger.apply(random_candidate(ctx, rng))  # warm-up: caches, kernel compile
        first_merge_s = time.perf_counter() - t0
        scorer.losses(model)
        merge_s, score_s, forward_s = [], [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            scorer.losses(ctx.base.model)  # forward passes alone, same tokens
            forward_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            model = ctx.merger.apply(random_candidate(ctx, rng))
            t1 = time.perf_counter()
            scorer.losses(model)
            t2 = time.perf_counter()
            merge_s.append(t1 - t0)
            score_s.append(t2 - t1)
        trial = [m + s for m, s in zip(merge_s, score_s)]
        r = {
            "merge_s": median(merge_s),
            "first_merge_s": first_merge_s,  # thresholds sorted, fused kernel compiled
            "score_s": median(score_s),
            "forward_only_s": median(forward_s),
            "trial_s": median(trial),
            "trial_over_forward": median(trial) / median(forward_s),
            "scoring_tokens": scorer.n_tokens,
            "padded_tokens": scorer.padded_tokens,
        }

        # mergekit-evolve's way: write the candidate with mergekit-yaml, then load the folder.
        cand = random_candidate(ctx, rng, density=0.5 if method == "ties" else None)
        mk = mergekit_config(
            cfg,
            ctx.base.groups,
            [n for n, _, _ in ctx.merger.params],
            cand,
            str(base),
            [str(p) for p in sources],
        )
        mk_path = tmp / f"{method}.yaml"
        import yaml

        mk_path.write_text(yaml.safe_dump(mk))
        mk_times, mk_only = [], []
        exe = str(Path(sys.executable).with_name("mergekit-yaml"))
        for k in range(args.mergekit_repeats):
            out = tmp / f"mk-{method}-{k}"
            t0 = time.perf_counter()
            subprocess.run(
                [exe, str(mk_path), str(out), "--no-write-model-card"], check=True, capture_output=True
            )
            t1 = time.perf_counter()
            m = load_model(out, torch.float32)
            t2 = time.perf_counter()
            mk_only.append(t1 - t0)
            mk_times.append(t2 - t0)
            del m
        ours = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ctx.merger.apply(cand)
            ours.append(time.perf_counter() - t0)
        r.update(
            {
                "mergekit_yaml_s": median(mk_only),
                "mergekit_yaml_plus_load_s": median(mk_times),
                "ours_ready_s": median(ours),
                "speedup_ready": median(mk_times) / median(ours),
                "whole_trial_speedup": (median(mk_times) + r["score_s"]) / (median(ours) + r["score_s"]),
                "mergekit_children_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
                / 1024,
            }
        )
        results[method] = r
        print(method, json.dumps(r, indent=1), flush=True)
        del ctx, model

    # Peak RSS over a search: 50 trials on a small scoring set (memory does not depend on it).
    small = {k: v[:2] for k, v in rows.items()}
    cfg = config("ties", base, sources, small, tmp / "rss")
    ctx = prepare(cfg, small)
    rng = np.random.default_rng(1)
    rss = {"after_load_mb": rss_mb()}
    for t in range(1, 51):
        ctx.scorer.losses(ctx.merger.apply(random_candidate(ctx, rng)))
        if t in (5, 50):
            rss[f"after_{t}_trials_mb"] = rss_mb()
    rss["held_mb"] = {
        "base": sum(w.nbytes for w in ctx.base.weights.values()) / 2**20,
        "task_vectors": sum(map(stored_bytes, ctx.merger.task_vectors)) / 2**20,
        "working_model": sum(p.nbytes for p in ctx.base.model.parameters()) / 2**20,
    }
    results["rss"] = rss
    print("rss", json.dumps(rss, indent=1))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.json}")
    os.system(f"rm -rf {tmp}")


if __name__ == "__main__":
    main()
