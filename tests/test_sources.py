import json
import re
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.errors import ModelLoadError
from optimize.deltas import LowRank, dense
from optimize.sources import (
    SourceMismatchError,
    layer_groups,
    load_base,
    load_task_vector,
)
from tests.conftest import make_lora
from tests.tiny import make_tiny_llama


@pytest.fixture(scope="module")
def base(world):
    return load_base(str(world["base"]), torch.float32, "cpu")


def test_groups_cover_every_parameter(base):
    g = base.groups
    assert g.names == ("embed", "layers.0", "layers.1", "layers.2", "layers.3", "norm", "lm_head")
    assert set(g.of_param) == set(base.weights)
    assert g.of_param["model.layers.2.mlp.up_proj.weight"] == 3


def test_tied_lm_head_is_one_group():
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.norm.weight"]
    assert layer_groups(names).names == ("embed", "layers.0", "norm")


def test_hf_task_vector_is_the_difference(world, base):
    tv = load_task_vector("a", str(world["a"]), base)
    src = AutoModelForCausalLM.from_pretrained(world["a"], dtype=torch.float32)
    for n, p in src.named_parameters():
        torch.testing.assert_close(base.weights[n] + tv[n], p.detach())


def test_lora_task_vector_is_b_a_scaling_and_base_is_restored(world, base):
    before = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    tv = load_task_vector("lora", str(world["lora"]), base)
    assert len(tv) == 4 * 3  # q, v, up in each of 4 layers; nothing dense for the rest
    assert all(isinstance(d, LowRank) for d in tv.values())  # kept factored
    from safetensors.torch import load_file

    w = load_file(world["lora"] / "adapter_model.safetensors")
    cfg = json.loads((world["lora"] / "adapter_config.json").read_text())
    key = "base_model.model.model.layers.1.self_attn.q_proj"
    expected = w[f"{key}.lora_B.weight"] @ w[f"{key}.lora_A.weight"] * (cfg["lora_alpha"] / cfg["r"])
    torch.testing.assert_close(dense(tv["model.layers.1.self_attn.q_proj.weight"]), expected)
    after = dict(base.model.named_parameters())
    assert set(after) == set(before)  # the adapter was unloaded
    for n, p in before.items():
        assert torch.equal(after[n].detach(), p)
    assert type(base.model.model.layers[0].self_attn.q_proj).__name__ == "Linear"


def tied_base(folder):
    """The tiny Llama with lm_head tied to the embedding, as SmolLM2 and Llama-3.2 ship."""
    untied = make_tiny_llama(folder.parent / f"{folder.name}_untied", num_layers=2)
    model = AutoModelForCausalLM.from_pretrained(untied, dtype=torch.float32)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(untied).save_pretrained(folder)
    return folder


def lora_saving(base_path, out, modules, **config):
    """A LoRA on q_proj that also trains its own copy of `modules` (peft's modules_to_save)."""
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=modules, **config)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.5)
    peft_model.save_pretrained(out, safe_serialization=True)
    return out


def test_modules_to_save_become_deltas_and_the_base_keeps_its_own_and_its_ties(tmp_path):
    """peft's unload leaves the adapter's trained copy of a modules_to_save module in the model; it
    untied a tied base's lm_head, and the merger then failed with KeyError 'lm_head.weight'."""
    base = load_base(str(tied_base(tmp_path / "tied")), torch.float32, "cpu")
    before = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    tv = load_task_vector("emb", str(lora_saving(base.path, tmp_path / "emb", ["embed_tokens"])), base)
    torch.testing.assert_close(
        dense(tv["model.embed_tokens.weight"]), torch.full_like(before["model.embed_tokens.weight"], 0.5)
    )
    assert base.model.lm_head.weight is base.model.model.embed_tokens.weight  # still tied
    after = dict(base.model.named_parameters())
    assert set(after) == set(before) and all(torch.equal(after[n].detach(), p) for n, p in before.items())
    with pytest.raises(
        ModelLoadError, match=r"trains its own lm_head \(modules_to_save\), but the base ties"
    ):
        load_task_vector("head", str(lora_saving(base.path, tmp_path / "head", ["lm_head"])), base)
    assert base.model.lm_head.weight is base.model.model.embed_tokens.weight
    assert all(torch.equal(p.detach(), before[n]) for n, p in base.model.named_parameters())
    # peft's ensure_weight_tying: the lm_head copy is the embedding copy, which a merge can hold
    tying = lora_saving(base.path, tmp_path / "tying", ["embed_tokens"], ensure_weight_tying=True)
    tv = load_task_vector("tying", str(tying), base)
    assert "model.embed_tokens.weight" in tv and "lm_head.weight" not in tv
    assert base.model.lm_head.weight is base.model.model.embed_tokens.weight


def test_dora_is_refused_when_merging_before_peft_loads_it(world, base, tmp_path):
    """DoRA's delta is not B @ A: a merge of task vectors cannot hold it (generation, which merges
    the adapter with peft, can: core.adapters does not refuse it)."""
    from core.models import model_format

    dora = tmp_path / "dora"
    shutil.copytree(world["lora"], dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(cfg | {"use_dora": True}))
    assert model_format(dora) == "lora"
    with pytest.raises(ModelLoadError, match="DoRA adapters cannot be merged"):
        load_task_vector("dora", str(dora), base)


def test_another_lora_variant_is_refused_when_merging(world, base, tmp_path):
    """Activated LoRA (aLoRA) keeps B @ A's shapes but peft applies it to some tokens only."""
    alora = tmp_path / "alora"
    shutil.copytree(world["lora"], alora)
    cfg = json.loads((alora / "adapter_config.json").read_text())
    (alora / "adapter_config.json").write_text(json.dumps(cfg | {"alora_invocation_tokens": [5, 6]}))
    with pytest.raises(ModelLoadError, match=r"LoRA variant \(ALoraLinearVariant\) whose delta is not B @ A"):
        load_task_vector("alora", str(alora), base)
    assert len(load_task_vector("l", str(world["lora"]), base)) > 0  # the base is usable again


def test_other_architecture_shapes_vocab_and_template_are_refused(world, base, tmp_path):
    wide = make_tiny_llama(tmp_path / "wide", num_layers=4, hidden_size=128, num_heads=2)
    with pytest.raises(SourceMismatchError, match="shape of model"):
        load_task_vector("wide", str(wide), base)
    vocab = make_tiny_llama(tmp_path / "vocab", num_layers=4, phrases=["I cannot help with that."])
    with pytest.raises(SourceMismatchError, match="vocab size"):
        load_task_vector("vocab", str(vocab), base)
    deep = make_tiny_llama(tmp_path / "deep", num_layers=5)
    with pytest.raises(SourceMismatchError, match="tensor names"):
        load_task_vector("deep", str(deep), base)
    arch = tmp_path / "arch"
    shutil.copytree(world["a"], arch)
    cfg = json.loads((arch / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (arch / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SourceMismatchError, match="architecture differs"):
        load_task_vector("arch", str(arch), base)
    tmpl = tmp_path / "tmpl"
    shutil.copytree(world["a"], tmpl)
    tok = AutoTokenizer.from_pretrained(tmpl)
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
    tok.save_pretrained(tmpl)
    with pytest.raises(SourceMismatchError, match="chat template differs"):
        load_task_vector("tmpl", str(tmpl), base)


def test_a_source_whose_tokens_have_other_ids_is_refused(world, base, tmp_path):
    """Same vocab size, two tokens swapped: every shape fits, yet a merge would add one token's
    embedding row to another's. Refused for a full model and for a LoRA adapter with its own
    tokenizer; a source without tokenizer files uses the base's, and tokens only one side knows
    (a GGUF tokenizer's padding) are not compared."""
    swapped = tmp_path / "swapped"
    shutil.copytree(world["a"], swapped)
    spec = json.loads((swapped / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[-2:]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (swapped / "tokenizer.json").write_text(json.dumps(spec))
    expected = re.escape(f"id of token {min(first, second)!r} (2 moved) differs")
    with pytest.raises(SourceMismatchError, match=expected):
        load_task_vector("swapped", str(swapped), base)
    lora = tmp_path / "lora"
    shutil.copytree(world["lora"], lora)
    for f in swapped.glob("*token*"):
        shutil.copy(f, lora / f.name)
    with pytest.raises(SourceMismatchError, match=r"id of token .* \(2 moved\)"):
        load_task_vector("lora", str(lora), base)
    # a tokenizer with one more entry (a GGUF one pads its vocab) and the same ids is the base's
    padded = tmp_path / "padded"
    shutil.copytree(world["a"], padded)
    spec = json.loads((padded / "tokenizer.json").read_text())
    spec["model"]["vocab"]["[PAD999]"] = len(spec["model"]["vocab"])
    (padded / "tokenizer.json").write_text(json.dumps(spec))
    assert len(AutoTokenizer.from_pretrained(padded).get_vocab()) == len(base.tokenizer.get_vocab()) + 1
    assert load_task_vector("padded", str(padded), base)
    for f in swapped.glob("*token*"):
        (swapped / f.name).unlink()
    assert load_task_vector("plain", str(swapped), base)


def test_lora_for_another_base_is_refused(base, tmp_path):
    other = make_tiny_llama(tmp_path / "other", num_layers=4, hidden_size=128, num_heads=2)
    lora = make_lora(other, tmp_path / "other_lora", seed=0)
    with pytest.raises(SourceMismatchError, match="LoRA shape for model.layers.0"):
        load_task_vector("other", str(lora), base)


def test_missing_and_pickled_paths(world, base, tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_task_vector("x", str(tmp_path / "nope"), base)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(world["a"] / "config.json", pickled)
    torch.save({}, pickled / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickled .bin weights"):
        load_task_vector("p", str(pickled), base)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_task_vector("e", str(tmp_path / "empty"), base)


def test_the_same_model_twice_through_a_link_or_the_base_as_a_source_is_refused(world, tmp_path):
    """normpath saw `a` and a link to it as two models: the aligned model was merged twice, each
    copy with its own coefficients; the base as a source has a zero task vector."""
    from optimize.config import validate_config
    from optimize.context import check_models
    from tests.conftest import world_config

    (tmp_path / "a_link").symlink_to(world["a"], target_is_directory=True)
    raw = world_config(world, tmp_path / "run")
    raw["sources"][1]["path"] = str(tmp_path / "a_link")
    with pytest.raises(ModelLoadError, match=r"source 'b': .*a_link is the same model as the source 'a' \("):
        check_models(validate_config(raw))
    raw["sources"][1]["path"] = str(world["base"])
    with pytest.raises(ModelLoadError, match="same model as the base .*its task vector is zero"):
        check_models(validate_config(raw))
    raw["sources"] = [{"name": "aligned", "path": str(world["base"]), "role": "alignment"}, raw["sources"][1]]
    raw["sources"][1]["path"] = str(world["b"])
    check_models(validate_config(raw))  # the aligned model as base and as the alignment source
