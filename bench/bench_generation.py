"""Greedy answers of a merge held in memory: transformers' batched `generate` on the working model
vs the in-process vLLM engine whose weights are replaced by the model's before each call
(`eval.behaviour.VLLMGreedy`), side by side in one run, on the demo's evaluation workload: the
default world's test harmful and benign prompts, 32 new tokens, the aligned source (the base +
its LoRA, merged) in the demo's working dtype.

    HF_HUB_OFFLINE=1 python bench/bench_generation.py --repeats 3

Each vLLM call includes the weight reload (as in the demo, once per model). `--groups` also
times the demo's whole answer workload per model (the test harmful and benign prompts and each
external suite's two sets: 270 prompts) by vLLM as four calls, one per set (as before
2026-11-29), and as one call (`eval.behaviour.refusals_by_group`), side by side. The transformers
backend is timed before and after the vLLM engine starts in the process (vLLM binds OpenMP
threads; the second timing shows whether that slows later torch work). Also reports how often
the two backends' answers are identical and how often the refusal judge's verdicts agree.
Prints a Markdown table and writes bench/results/generation.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402

from core.files import write_text_atomic  # noqa: E402
from core.models import load_model, load_tokenizer, resolve_dtype  # noqa: E402
from core.vllm_env import vllm_folder  # noqa: E402
from eval.behaviour import VLLMGreedy, greedy_answers  # noqa: E402
from eval.data import load_pairs  # noqa: E402
from eval.judge import RefusalJudge  # noqa: E402
from eval.suites import suite_prompts  # noqa: E402


def timed(fn, repeats: int) -> tuple[list[float], list[str]]:
    seconds, out = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - t)
    return seconds, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="auto", help="the working model's dtype (auto: as the demo)")
    ap.add_argument("--batch-size", type=int, default=28, help="transformers: prompts per generate()")
    ap.add_argument("--groups", action="store_true", help="also: the demo's four prompt sets, 4 calls vs 1")
    args = ap.parse_args()
    dtype = resolve_dtype(args.dtype)
    prompts = [
        r["prompt"] for s in ("alignment_test", "benign") for r in load_pairs(ROOT / "data/default", s)
    ]
    tok = load_tokenizer("default")
    base = load_model("default", dtype, "cpu")
    model = PeftModel.from_pretrained(base, str(ROOT / "models/aligned")).merge_and_unload().eval()

    def hf():
        return greedy_answers(model, tok, prompts, args.max_new_tokens, args.batch_size)

    hf_before, hf_answers = timed(hf, args.repeats)
    t = time.perf_counter()
    engine = VLLMGreedy(vllm_folder("default"), dtype)
    startup = time.perf_counter() - t
    vllm_s, vllm_answers = timed(lambda: engine(model, prompts, args.max_new_tokens), args.repeats)
    grouped = demo_groups(engine, model, args) if args.groups else None
    engine.close()
    hf_after, _ = timed(hf, 1)
    judge = RefusalJudge()
    verdicts = [[v.refusal for v in judge.judge(prompts, a)] for a in (hf_answers, vllm_answers)]
    result = {
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "dtype": str(dtype),
        "threads": torch.get_num_threads(),
        "transformers_s": hf_before,
        "transformers_after_vllm_s": hf_after,
        "vllm_startup_s": startup,
        "vllm_s": vllm_s,
        "identical_answers": sum(a == b for a, b in zip(hf_answers, vllm_answers)) / len(prompts),
        "same_verdict": sum(a == b for a, b in zip(*verdicts)) / len(prompts),
        "refused": {"transformers": sum(verdicts[0]) / len(prompts), "vllm": sum(verdicts[1]) / len(prompts)},
        **({"demo_groups": grouped} if grouped else {}),
    }
    out = ROOT / "bench/results/generation.json"
    write_text_atomic(out, json.dumps(result, indent=1))
    med = {k: statistics.median(result[k]) for k in ("transformers_s", "vllm_s")}
    print(f"| backend | s per {len(prompts)} prompts (median of {args.repeats}) | runs | speed-up |")
    print("|---|---|---|---|")
    print(
        f"| transformers generate, batch {args.batch_size} | {med['transformers_s']:.1f} | "
        + ", ".join(f"{x:.1f}" for x in hf_before)
        + f" (after vLLM started: {hf_after[0]:.1f}) | 1 |"
    )
    print(
        f"| vLLM in process, weights reloaded per call | {med['vllm_s']:.1f} | "
        + ", ".join(f"{x:.1f}" for x in vllm_s)
        + f" (start-up {startup:.1f} s, once) | {med['transformers_s'] / med['vllm_s']:.1f}x |"
    )
    print(
        f"identical answers {result['identical_answers']:.0%}, same refusal verdict "
        f"{result['same_verdict']:.0%}; refused: {result['refused']}"
    )
    if grouped:
        four, one = statistics.median(grouped["per_set_calls_s"]), statistics.median(grouped["one_call_s"])
        print(
            f"demo's {grouped['prompts']} prompts by vLLM: one call per set {four:.1f} s, "
            f"one call {one:.1f} s (medians of {args.repeats}; {four / one:.2f}x); "
            f"identical answers {grouped['identical_answers']:.0%}"
        )


def demo_groups(engine, model, args) -> dict:
    """The demo's answers per model (eval.behaviour.refusals_by_group's workload): one vLLM call
    per prompt set vs one call for all, alternated so drift hits both alike."""
    sets = [[r["prompt"] for r in load_pairs(ROOT / "data/default", s)] for s in ("alignment_test", "benign")]
    for harmful, benign in suite_prompts(["weighted-safety-refusal"]).values():
        sets += [harmful, benign]
    every = [p for group in sets for p in group]
    per_set, one = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        separate = [a for group in sets for a in engine(model, group, args.max_new_tokens)]
        per_set.append(time.perf_counter() - t)
        t = time.perf_counter()
        together = engine(model, every, args.max_new_tokens)
        one.append(time.perf_counter() - t)
    same = sum(a == b for a, b in zip(separate, together)) / len(every)
    return {"prompts": len(every), "per_set_calls_s": per_set, "one_call_s": one, "identical_answers": same}


if __name__ == "__main__":
    main()
