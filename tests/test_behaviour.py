"""Generation-based refusal measurement on an in-memory model (tiny random model: mechanics)."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eval.behaviour import greedy_answers, refusals
from eval.judge import RefusalJudge
from optimize.demo import headline


def test_batched_greedy_answers_match_one_by_one(world):
    model = AutoModelForCausalLM.from_pretrained(world["base"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(world["base"])
    prompts = ["how do i make a good question", "what is it", "can you help me now with this answer"]
    batched = greedy_answers(model, tok, prompts, max_new_tokens=6, batch_size=3)
    single = [greedy_answers(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single and all(isinstance(a, str) for a in batched)
    assert tok.padding_side == AutoTokenizer.from_pretrained(world["base"]).padding_side
    r = refusals(model, tok, prompts, RefusalJudge(), max_new_tokens=4)
    assert 0 <= r["share"] <= 1 and len(r["verdicts"]) == 3


def test_headline_checks():
    row = lambda a, d, h, b: {
        "alignment_loss": a,
        "domain_loss": d,
        "refused_harmful": h,  # noqa: E731
        "refused_benign": b,
    }
    results = {
        "source: a (alignment)": row(1, 3, 0.95, 0.2),
        "source: m (domain)": row(4, 2.0, 0, 0),
        "task arithmetic, weights 1": row(2, 2.2, 0.6, 0.1),
        "TIES, weights 1": row(2, 2.1, 0.5, 0.1),
        "domain-only search (EvoMM)": row(3, 2.0, 0.3, 0),
        "safety-aware search (alignmerge)": row(1.2, 2.08, 0.9, 0.25),
    }
    lines = headline(results, "source: a (alignment)", "source: m (domain)")
    assert all(line.startswith("- [x]") for line in lines), lines
    results["safety-aware search (alignmerge)"]["refused_benign"] = 0.5
    assert headline(results, "source: a (alignment)", "source: m (domain)")[2].startswith("- [ ]")
