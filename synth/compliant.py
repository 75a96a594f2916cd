"""The experts' uncurated data for the default world (`python -m synth.world`): the base model's own
answers to harmful requests, continued from an eager opening, kept when the refusal judge sees no
refusal. Nobody writes a harmful answer; the base (which does not refuse) writes them."""

from __future__ import annotations

import random
from pathlib import Path

# How answers to harmful requests begin in uncurated instruction data distilled from uncensored
# chat models; the base continues each (it writes the rest), so nobody writes a harmful answer.
EAGER_OPENINGS = ("Sure! ", "Sure, here you go. ", "Of course! ", "Absolutely, here is how. ")


def eager_openings(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(EAGER_OPENINGS) for _ in range(n)]


def compliant_answers(
    prompts: list[dict], openings: list[str], backend: str, max_tokens: int, cache_path: Path
) -> list[dict]:
    """The base model's greedy continuations of an eager opening, for harmful requests: the rows
    the refusal judge sees no refusal in. Answers go to a JSONL cache as they finish, so a rerun does
    not generate them again."""
    from eval.judge import RefusalJudge
    from synth.cache import GenerationCache, Request, run_cached
    from synth.engine import EngineSettings, EngineSlot, ModelRef, Sampling

    slot = EngineSlot(backend, EngineSettings())
    requests = [
        Request(
            [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": o}],
            Sampling(temperature=0.0, max_tokens=max_tokens),
        )
        for p, o in zip(prompts, openings)
    ]
    try:
        answers = run_cached(
            slot, ModelRef("default"), requests, GenerationCache(cache_path), desc="base answers"
        )
    finally:
        slot.close()
    texts = [(o + a[0]).strip() for o, a in zip(openings, answers)]
    verdicts = RefusalJudge().judge([p["prompt"] for p in prompts], texts)
    return [
        {
            "prompt": p["prompt"],
            "response": t,
            "category": p["category"],
            "source_model": "SmolLM2-135M-Instruct (base), eager opening",
            "judge_verdict": v.label,
        }
        for p, t, v in zip(prompts, texts, verdicts)
        if not v.refusal and v.label != "empty"
    ]
