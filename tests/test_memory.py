"""What a search holds: factored LoRA deltas, theta_base and task vectors in the store dtype
(merged in float32), and the memory estimate that refuses a search that cannot fit, before any
weight loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from core.errors import ConfigError
from optimize.config import validate_config
from optimize.context import check_inputs, prepare
from optimize.deltas import LowRank, dense, stored_bytes
from optimize.kernels import kth_largest_abs
from optimize.memory import VLLM_RUNTIME_BYTES, estimate
from optimize.methods import Candidate, DareTies, TaskArithmetic, Ties
from optimize.search import main as search_main
from tests.conftest import make_variant, world_config
from tests.tiny import make_tiny_llama


def test_factored_lora_equals_peft_merge(world):
    """Every factored delta is exactly what peft's own merge adds to the base."""
    cfg = world_config(world, world["root"] / "unused")
    cfg["sources"][1]["path"] = str(world["lora"])
    ctx = prepare(validate_config(cfg))
    tv = ctx.merger.task_vectors[1]
    assert tv and all(isinstance(d, LowRank) for d in tv.values())
    base = AutoModelForCausalLM.from_pretrained(world["base"], dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    merged = dict(PeftModel.from_pretrained(base, str(world["lora"])).merge_and_unload().named_parameters())
    for n, p in merged.items():
        want = p.detach() - before[n]
        got = dense(tv[n]) if n in tv else torch.zeros_like(want)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=n)
    # factored: far fewer numbers than the dense deltas they stand for
    assert stored_bytes(tv) < sum(merged[n].numel() * 4 for n in tv) / 2


@pytest.fixture(scope="module")
def bf16_world(world, tmp_path_factory):
    """A base saved in bfloat16 and a fine-tune of it, also in bfloat16."""
    root = tmp_path_factory.mktemp("bf16")
    base = make_tiny_llama(root / "base", num_layers=4, seed=0, dtype="bfloat16")
    expert = make_variant(base, root / "expert", seed=5)
    model = AutoModelForCausalLM.from_pretrained(expert, dtype=torch.bfloat16)
    model.save_pretrained(expert, safe_serialization=True)  # the fine-tune, stored in bf16 as well
    return {**world, "base": base, "a": expert, "b": world["lora"]}


def test_bf16_store_keeps_the_base_exactly_and_merges_close_to_float32(bf16_world, tmp_path):
    raw = world_config(bf16_world, tmp_path / "run")
    raw["merge"] = {"method": "task_arithmetic", "normalize": False}
    ctx = {}
    for store in ("auto", "float32"):
        ctx[store] = prepare(validate_config({**raw, "runtime": {"store_dtype": store}}))
    auto, full = ctx["auto"], ctx["float32"]
    # auto: the working model is float32, the checkpoint bfloat16 -> kept in bfloat16, exactly
    stored = auto.base.weights
    assert {w.dtype for w in stored.values()} == {torch.bfloat16}
    assert {w.dtype for w in full.base.weights.values()} == {torch.float32}
    for n, w in stored.items():
        assert torch.equal(w.float(), full.base.weights[n]), n
    held = sum(w.nbytes for w in stored.values()) + sum(map(stored_bytes, auto.merger.task_vectors))
    held_f32 = sum(w.nbytes for w in full.base.weights.values()) + sum(
        map(stored_bytes, full.merger.task_vectors)
    )
    assert held < 0.6 * held_f32
    rng = np.random.default_rng(0)
    n_groups = auto.base.groups.n
    cand = Candidate(weight=rng.uniform(0.2, 1, (2, n_groups)))
    auto.merger.apply(cand)
    ours = {n: p.detach().clone() for n, p, _ in auto.merger.params}
    full.merger.apply(cand)
    tau = full.merger.task_vectors[0]  # dense; the LoRA factors are float32 in both
    for n, p, _ in full.merger.params:
        # bf16 rounding of the dense task vector: at most 2^-9 of its largest entry (weight <= 1)
        bound = 2**-8 * dense(tau[n]).abs().max() if n in tau else 0
        assert (ours[n] - p.detach()).abs().max() <= bound + 1e-6, n


def test_estimate_counts_what_a_search_holds(world, tmp_path):
    raw = world_config(world, tmp_path / "run")
    raw["sources"][1]["path"] = str(world["lora"])
    cfg = validate_config(raw)
    est = estimate(cfg)
    ctx = prepare(cfg)
    base = ctx.base
    assert est.held["working model"] == sum(p.nbytes for p in base.model.parameters())
    assert est.held["base copy"] == sum(w.nbytes for w in base.weights.values())
    # source a moved every weight (dense), the LoRA source is held as its factors
    assert est.held["task vectors"] == sum(map(stored_bytes, ctx.merger.task_vectors))
    assert est.peak > sum(est.held[k] for k in ("working model", "base copy", "task vectors"))


def test_a_search_that_cannot_fit_is_refused_before_loading(world, tmp_path, capsys):
    raw = world_config(world, tmp_path / "run")
    raw["runtime"] = {"max_memory": "1MiB"}
    with pytest.raises(ConfigError, match=r"needs about .* GB but 0.00 GB is runtime.max_memory"):
        check_inputs(validate_config(raw))
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert search_main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "store_dtype" in err and "largest part is" in err
    assert not (tmp_path / "run").exists()  # nothing was started
    for nonsense in ("12 parsecs", "1e400", "0GB", "0.5"):  # 1e400 overflows a float; 0.5 bytes
        raw["runtime"] = {"max_memory": nonsense}
        with pytest.raises(ConfigError, match="runtime.max_memory.*not a memory size"):
            validate_config(raw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_radix_selected_thresholds_equal_the_sort(dtype):
    gen = torch.Generator().manual_seed(0)
    tau = (torch.randn(20_000, generator=gen) * 1e-3).to(dtype)
    tau[:500] = tau[500:1000]  # ties
    tau[1000:1100] = 0
    # float32 entries that share their high 16 bits: the low-bits pass has to tell them apart
    tau[2000:2600] = -(1.0 + torch.arange(600, dtype=torch.float64) * 2**-20).to(dtype)
    ordered = torch.sort(tau.abs().to(torch.float64)).values
    ks = [1, 7, 300, 599, 999, 10_000, 19_899, 20_000]
    got = kth_largest_abs(tau, ks, block=3_000)
    assert got == [ordered[tau.numel() - k].item() for k in ks]


@pytest.mark.parametrize("numel", [3_000, 1 << 17])  # eager chunks, and the fused kernel
@pytest.mark.parametrize("method_cls", [Ties, DareTies, TaskArithmetic])
def test_methods_read_16bit_deltas_as_float32(numel, method_cls, monkeypatch):
    """A merge of bf16-stored base and deltas equals the merge of their float32 copies, bit for
    bit: the arithmetic is float32 either way, and a merge walking the tensor in blocks gives
    the same as in one."""
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(numel, generator=gen).to(torch.bfloat16)
    taus = [(torch.randn(numel, generator=gen) * 0.01).to(torch.bfloat16) for _ in range(2)]
    cand = Candidate(weight=np.array([[0.7], [0.4]]), density=np.array([[0.3], [0.6]]))
    outs = []
    for half, block in ((True, 1 << 20), (False, 1 << 20), (True, 50_000)):
        monkeypatch.setattr("optimize.kernels.BLOCK", block)
        method = method_cls(normalize=False, density_levels=(0.3, 0.6))
        out = torch.empty(numel)
        args = (base, taus) if half else (base.float(), [t.float() for t in taus])
        method.merge("w", 0, args[0], args[1], cand, out)
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("method_cls", [Ties, DareTies, TaskArithmetic])
def test_a_lora_delta_read_by_row_blocks_merges_as_its_dense_delta(method_cls, fan_in_fan_out, monkeypatch):
    """Merging a factored delta a few rows at a time (thresholds found over the blocks, the fused
    kernel on each) writes what merging its multiplied-out delta in one piece writes."""
    gen = torch.Generator().manual_seed(2)
    shape = (96, 64)
    base = torch.randn(shape, generator=gen).to(torch.bfloat16)
    a, b = (
        torch.randn(8, shape[0 if fan_in_fan_out else 1], generator=gen),
        torch.randn(shape[1 if fan_in_fan_out else 0], 8, generator=gen),
    )
    lora = LowRank(a.to(torch.bfloat16), b.to(torch.bfloat16), scaling=0.05, fan_in_fan_out=fan_in_fan_out)
    product = lora.B.float() @ lora.A.float() * 0.05  # peft's get_delta_weight
    torch.testing.assert_close(lora.dense(), product.T if fan_in_fan_out else product)
    other = (torch.randn(shape, generator=gen) * 0.05).to(torch.bfloat16)
    cand = Candidate(weight=np.array([[0.8], [0.5]]), density=np.array([[0.4], [0.7]]))
    outs = []
    for deltas, block in (([lora.dense(), other], 1 << 20), ([lora, other], 700)):  # 700: 10 or 7 rows
        monkeypatch.setattr("optimize.kernels.BLOCK", block)
        out = torch.empty(shape, dtype=torch.bfloat16)
        method_cls(normalize=False, density_levels=(0.4, 0.7)).merge("w", 0, base, deltas, cand, out)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_a_16bit_model_is_written_in_place_as_through_a_float32_buffer(bf16_world, tmp_path, method):
    """TIES and task arithmetic write a bf16 working model's tensors directly (no float32 buffer
    the size of the largest tensor), with the same result as through the buffer."""
    raw = world_config(bf16_world, tmp_path / "run")
    raw["merge"] = {"method": method, "normalize": False}
    ctx = prepare(validate_config({**raw, "runtime": {"dtype": "bfloat16"}}))
    rng = np.random.default_rng(2)
    n_groups = ctx.base.groups.n
    cand = Candidate(weight=rng.uniform(0.2, 1, (2, n_groups)), density=rng.choice([0.4, 1.0], (2, n_groups)))
    assert ctx.merger.method.rounds_once
    direct = {n: p.detach().clone() for n, p in ctx.merger.apply(cand).named_parameters()}
    assert not ctx.merger._scratch  # no float32 buffer was made
    ctx.merger.method.rounds_once = False
    buffered = dict(ctx.merger.apply(cand).named_parameters())
    assert ctx.merger._scratch
    for n, p in buffered.items():
        assert p.dtype == torch.bfloat16 and torch.equal(direct[n], p.detach()), n


def test_the_estimate_counts_the_vllm_engine_of_the_verified_pick(world, tmp_path, monkeypatch):
    """An in-process vLLM engine answers for the verified pick: its weights, KV cache and runtime
    are held from then on; without a verified pick, or with transformers, nothing is added."""
    import eval.behaviour

    monkeypatch.setattr(eval.behaviour, "vllm_available", lambda: True)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    raw = world_config(world, tmp_path / "run", verify={"top_k": 2})
    raw["runtime"] = {"generation": "auto", "device": "cpu"}
    est = estimate(validate_config(raw))
    assert est.held["vLLM engine"] == est.held["working model"] + 2**30 + int(VLLM_RUNTIME_BYTES)
    raw["runtime"]["generation"] = "transformers"
    assert "vLLM engine" not in estimate(validate_config(raw)).held
    raw["runtime"]["generation"] = "auto"
    raw["search"]["verify"] = {"top_k": 0}
    assert "vLLM engine" not in estimate(validate_config(raw)).held
