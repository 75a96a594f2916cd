"""Hostile model folders are refused before any weight loads, with one error naming the file and
the fix (core.weights, core.adapters): a config.json that disagrees with the weights, a named
pipe, a sharded index that points elsewhere or leaves a stale shard, a LoRA adapter whose delta
is not B @ A, and tokenizer files that fail."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from core.errors import ModelLoadError
from core.models import load_tokenizer, model_format
from optimize.sources import load_base, load_task_vector
from tests.conftest import world_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def copy(world, name: str, tmp_path, to: str = "m"):
    folder = tmp_path / to
    shutil.copytree(world[name], folder)
    return folder


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data))


def search(world, tmp_path, **paths):
    raw = world_config(world, tmp_path / "run", n_trials=1)
    raw.update(paths)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    return subprocess.run(
        [sys.executable, "-m", "optimize.search", "--config", str(config)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )


# ----------------------------------------------------------------------------- config.json vs weights
CONFIG_LIES = {
    "more_layers": ({"num_hidden_layers": 6}, r"num_hidden_layers: 6 but the weights hold 4 layers"),
    "fewer_layers": ({"num_hidden_layers": 2}, r"num_hidden_layers: 2 but the weights hold 4 layers"),
    "a_million_layers": (
        {"num_hidden_layers": 10**6},
        r"num_hidden_layers: 1000000 but the weights hold 39 tensors",
    ),
    "huge_hidden": (
        {"hidden_size": 10**9},
        r"embed_tokens.weight of shape \(107, 1000000000\).*hold \(107, 64\)",
    ),
    "huge_vocab": ({"vocab_size": 10**10}, r"of shape \(10000000000, 64\) but the weights hold \(107, 64\)"),
    "other_model_type": ({"model_type": "gpt2"}, r"transformer.wte.weight is in config.json's model but not"),
    "no_model_type": ({"model_type": None}, r"does not describe a model.*Should have a `model_type`"),
    "zero_heads": ({"num_attention_heads": 0}, r"does not describe a model.*ZeroDivisionError"),
    "bogus_dtype": ({"dtype": "bogus", "torch_dtype": "bogus"}, r"dtype 'bogus' is not a torch dtype"),
    "flash_attention": ({"attn_implementation": "flash_attention_2"}, r"does not describe.*FlashAttention2"),
    "bitsandbytes": (
        {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}},
        r"quantization_config in config.json cannot be used here \(ImportError: .*bitsandbytes",
    ),
}


@pytest.mark.parametrize("case", CONFIG_LIES)
def test_a_config_that_disagrees_with_the_weights_is_refused(world, tmp_path, case):
    changes, message = CONFIG_LIES[case]
    folder = copy(world, "base", tmp_path)
    edit_json(folder / "config.json", **changes)
    with pytest.raises(ModelLoadError, match=message):
        model_format(folder)


def test_a_tensor_missing_from_the_weights_is_refused_unless_tied(world, tmp_path):
    folder = copy(world, "base", tmp_path)
    weights = load_file(folder / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(
        ModelLoadError, match=r"lm_head.weight is in config.json's model but not in the weights"
    ):
        model_format(folder)
    edit_json(folder / "config.json", tie_word_embeddings=True)  # the head is the embeddings
    assert model_format(folder) == "hf"


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_integer_or_fp8_weights_without_a_quantization_config_are_refused(world, tmp_path, dtype):
    """transformers casts them to floats silently: int8 levels without their scales are noise."""
    folder = copy(world, "base", tmp_path)
    weights = load_file(folder / "model.safetensors")
    key = "model.layers.0.mlp.down_proj.weight"
    weights[key] = weights[key].to(dtype)
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(ModelLoadError, match=rf"{key} is stored as (I8|F8_E4M3), not floating point"):
        model_format(folder)


def test_a_lying_base_config_is_one_error_line_before_loading(world, tmp_path):
    folder = copy(world, "base", tmp_path)
    edit_json(folder / "config.json", num_hidden_layers=10**6)  # used to hang, allocating
    proc = search(world, tmp_path, base=str(folder))
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: base: ") and "num_hidden_layers: 1000000" in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- files that are not files
@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_a_named_pipe_in_a_model_folder_is_refused_without_opening_it(world, tmp_path, name):
    folder = copy(world, "a", tmp_path)
    (folder / name).unlink()
    os.mkfifo(folder / name)
    code = (
        "import sys, pathlib; from core.models import model_format; model_format(pathlib.Path(sys.argv[1]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(folder)], env=ENV, capture_output=True, text=True, timeout=60
    )
    assert f"{folder / name} is not a regular file" in proc.stderr, proc.stderr[-2000:]


# ----------------------------------------------------------------------------- sharded weights
def shard(folder, weight_map: dict, files: dict[str, dict]):
    """`folder`'s weights re-saved as the given shards, with an index naming `weight_map`."""
    (folder / "model.safetensors").unlink()
    for name, tensors in files.items():
        save_file(tensors, folder / name)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )


def test_a_sharded_index_must_name_files_inside_the_folder(world, tmp_path):
    folder = copy(world, "base", tmp_path)
    weights = load_file(folder / "model.safetensors")
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file(weights, outside / "stolen.safetensors")
    shard(folder, dict.fromkeys(weights, "../outside/stolen.safetensors"), {"decoy.safetensors": weights})
    with pytest.raises(
        ModelLoadError, match=r"names '../outside/stolen.safetensors' as a shard: a shard must be"
    ):
        model_format(folder)


def test_a_sharded_index_with_a_missing_or_stale_shard_is_refused(world, tmp_path):
    folder = copy(world, "base", tmp_path)
    weights = load_file(folder / "model.safetensors")
    half = {k: v for i, (k, v) in enumerate(weights.items()) if i % 2}
    rest = {k: v for k, v in weights.items() if k not in half}
    weight_map = {k: "model-00001-of-00002.safetensors" for k in half}
    weight_map |= dict.fromkeys(rest, "model-00002-of-00002.safetensors")
    shard(
        folder,
        weight_map,
        {"model-00001-of-00002.safetensors": half, "model-00002-of-00002.safetensors": rest},
    )
    assert model_format(folder) == "hf"  # a good sharded folder
    (folder / "model-00002-of-00002.safetensors").rename(folder / "old.safetensors")
    with pytest.raises(ModelLoadError, match=r"model-00002-of-00002.safetensors is missing \(named in model"):
        model_format(folder)
    shutil.copy(folder / "old.safetensors", folder / "model-00002-of-00002.safetensors")
    with pytest.raises(ModelLoadError, match=r"old.safetensors is not part of the model .*; remove it"):
        model_format(folder)


def test_a_stale_safetensors_file_next_to_a_source_is_refused(world, tmp_path):
    folder = copy(world, "a", tmp_path)
    weights = load_file(folder / "model.safetensors")
    save_file(
        {"lm_head.weight": torch.zeros_like(weights["lm_head.weight"])}, folder / "zz-old-shard.safetensors"
    )
    with pytest.raises(ModelLoadError, match=r"zz-old-shard.safetensors is not part of the model"):
        model_format(folder)
    (folder / "model.safetensors").rename(folder / "weights.safetensors")  # transformers would not load it
    (folder / "zz-old-shard.safetensors").unlink()
    with pytest.raises(
        ModelLoadError, match=r"not named model.safetensors and there is no model.safetensors.index"
    ):
        model_format(folder)


def test_a_tensor_in_two_shards_is_refused(world, tmp_path):
    folder = copy(world, "base", tmp_path)
    weights = load_file(folder / "model.safetensors")
    head = {"lm_head.weight": weights["lm_head.weight"]}
    weight_map = dict.fromkeys(weights, "model-00001-of-00002.safetensors") | {
        "lm_head.weight": "model-00002-of-00002.safetensors"
    }
    shard(
        folder,
        weight_map,
        {"model-00001-of-00002.safetensors": weights, "model-00002-of-00002.safetensors": head},
    )
    with pytest.raises(ModelLoadError, match=r"both hold tensor lm_head.weight; remove the stale copy"):
        model_format(folder)


# ----------------------------------------------------------------------------- LoRA adapters
ADAPTER_LIES = {
    "ia3": ({"peft_type": "IA3"}, r"peft_type is 'IA3', not 'LORA'"),
    "no_peft_type": ({"peft_type": None}, r"peft_type is None, not 'LORA'"),
    "target_parameters": (
        {"target_parameters": ["mlp.up_proj.weight"]},
        r"LoRA on parameters .* not supported",
    ),
    "lora_bias": ({"lora_bias": True}, r"a LoRA bias \(lora_bias\) is not supported"),
    "trainable_tokens": ({"trainable_token_indices": [1, 2]}, r"trainable tokens .* not supported"),
    "r_zero": ({"r": 0}, r"r must be a positive integer \(got 0\)"),
    "r_negative": ({"r": -4}, r"r must be a positive integer \(got -4\)"),
    "r_string": ({"r": "4"}, r"r must be a positive integer \(got '4'\)"),
    "r_huge": ({"r": 10**9}, r"r is 1000000000 .* has rank 4"),
    "base_not_a_name": ({"base_model_name_or_path": 5}, r"base_model_name_or_path is 5, not a model name"),
    "layer_replication": ({"layer_replication": [[0, 2]]}, r"layer replication .* not supported"),
    "alpha_nan": ({"lora_alpha": float("nan")}, r"lora_alpha must be a number of at most 1e6 \(got nan"),
    "alpha_huge": ({"lora_alpha": 1e300}, r"lora_alpha must be a number of at most 1e6 \(got 1e\+300"),
    "alpha_string": ({"lora_alpha": "16"}, r"lora_alpha must be a number of at most 1e6 \(got '16'"),
    "alpha_pattern_inf": ({"alpha_pattern": {"q_proj": float("inf")}}, r"alpha_pattern \{'q_proj': inf\}"),
}


@pytest.mark.parametrize("case", ADAPTER_LIES)
def test_an_adapter_config_alignmerge_cannot_merge_is_refused(world, tmp_path, case):
    changes, message = ADAPTER_LIES[case]
    folder = copy(world, "lora", tmp_path)
    edit_json(folder / "adapter_config.json", **changes)
    with pytest.raises(ModelLoadError, match=message):
        model_format(folder)


def test_adapter_weights_that_are_empty_or_not_float_are_refused(world, tmp_path):
    folder = copy(world, "lora", tmp_path)
    weights = load_file(folder / "adapter_model.safetensors")
    save_file({k: v.to(torch.int8) for k, v in weights.items()}, folder / "adapter_model.safetensors")
    with pytest.raises(ModelLoadError, match=r"lora_A.weight is stored as I8, not floating point"):
        model_format(folder)
    save_file({}, folder / "adapter_model.safetensors")
    with pytest.raises(ModelLoadError, match=r"holds no LoRA weights \(lora_A / lora_B\)"):
        model_format(folder)


@pytest.fixture(scope="module")
def base(world):
    return load_base(str(world["base"]), torch.float32, "cpu")


def test_an_adapter_whose_targets_are_not_in_the_file_or_the_base_is_refused(world, tmp_path, base):
    before = {n: p.clone() for n, p in base.model.state_dict().items()}
    folder = copy(world, "lora", tmp_path)
    edit_json(folder / "adapter_config.json", target_modules=["nonexistent_proj"])
    with pytest.raises(ModelLoadError, match=r"source 'l': peft cannot load .*NoMatchingPeftModuleError"):
        load_task_vector("l", str(folder), base)
    edit_json(folder / "adapter_config.json", target_modules=["q_proj", "v_proj", "up_proj", "k_proj"])
    with pytest.raises(ModelLoadError, match=r"targets model.layers.0.self_attn.k_proj but holds no LoRA"):
        load_task_vector("l", str(folder), base)
    after = base.model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert len(load_task_vector("l", str(world["lora"]), base)) == 12  # the base is still usable


# ----------------------------------------------------------------------------- tokenizer files
def test_a_chat_template_that_fails_is_refused_when_the_tokenizer_loads(world, tmp_path):
    folder = copy(world, "base", tmp_path)
    (folder / "chat_template.jinja").write_text("{{ raise_exception('boom') }}")
    with pytest.raises(ModelLoadError, match=r"its chat template fails on a plain .*TemplateError: boom"):
        load_tokenizer(folder)
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content ")
    with pytest.raises(ModelLoadError, match=r"TemplateSyntaxError"):
        load_tokenizer(folder)
    with pytest.raises(ModelLoadError, match=r"its chat template fails"):
        model_format(folder)  # checked up front, with the other files, before any weight loads
    source = copy(world, "b", tmp_path, to="b")
    shutil.copy(folder / "chat_template.jinja", source)
    proc = search(world, tmp_path, sources=[{"name": "b", "path": str(source)}])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: source 'b': ") and "chat template fails" in last, proc.stderr[-2000:]
    assert "Loading weights" not in proc.stderr  # refused before the base loaded


def test_a_base_template_whose_prompt_is_not_a_prefix_of_the_conversation_is_one_error(world, tmp_path):
    """The scorer masks the prompt by the text add_generation_prompt renders; a template that
    renders it elsewhere is refused before the sources load."""
    folder = copy(world, "base", tmp_path)
    template = "{% for m in messages %}{{ m.content }}{% endfor %}{% if add_generation_prompt %}X{% endif %}"
    (folder / "chat_template.jinja").write_text(template)
    proc = search(world, tmp_path, base=str(folder))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the base's chat template renders the user turn differently"), last
    assert "prompt tokens cannot be masked" in last


def test_a_chat_template_that_never_finishes_is_refused(world, tmp_path, monkeypatch):
    import core.weights

    monkeypatch.setattr(core.weights, "TEMPLATE_SECONDS", 0.5)
    folder = copy(world, "base", tmp_path)
    loop = "{% for i in range(99999) %}{% for j in range(99999) %}{{ '' }}{% endfor %}{% endfor %}"
    (folder / "chat_template.jinja").write_text(loop)
    with pytest.raises(ModelLoadError, match=r"its chat template ran for 0.5 s .* without finishing"):
        load_tokenizer(folder)


@pytest.mark.parametrize("text", ['{"version": "1.0", "model": ', "[]"])
def test_a_corrupt_tokenizer_json_is_refused(world, tmp_path, text):
    folder = copy(world, "base", tmp_path)
    (folder / "tokenizer.json").write_text(text)
    with pytest.raises(ModelLoadError, match=r"its tokenizer cannot be loaded .*copy tokenizer.json"):
        load_tokenizer(folder)


# ----------------------------------------------------------------------------- legitimate layouts
def test_legitimate_layouts_the_checks_must_accept(world, tmp_path, base):
    """A LoRA on the embeddings (peft saves `lora_embedding_A` without `.weight`), Mistral's
    `consolidated.safetensors` beside the HF weights (transformers ignores it), a tied checkpoint
    that stores only `lm_head.weight`, 0 experts (a dense model), a .gguf-style folder holding a
    socket: all load as before the checks."""
    import socket

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(world["base"], dtype=torch.float32)
    cfg = LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"], init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(tmp_path / "emb", safe_serialization=True)
    assert model_format(tmp_path / "emb") == "lora"
    assert "model.embed_tokens.weight" in load_task_vector("emb", str(tmp_path / "emb"), base)

    folder = copy(world, "base", tmp_path, to="mistral")
    shutil.copy(folder / "model.safetensors", folder / "consolidated.safetensors")
    edit_json(folder / "config.json", num_local_experts=0)
    assert model_format(folder) == "hf"

    tied = copy(world, "base", tmp_path, to="tied")
    edit_json(tied / "config.json", tie_word_embeddings=True)
    weights = load_file(tied / "model.safetensors")
    del weights["model.embed_tokens.weight"]  # safetensors' save_model keeps lm_head.weight alone
    save_file(weights, tied / "model.safetensors", metadata={"format": "pt"})
    assert model_format(tied) == "hf"

    with socket.socket(socket.AF_UNIX) as s:  # a GGUF in /tmp beside other users' sockets
        s.bind(str(tmp_path / ".s.PGSQL.5432"))
        from core.weights import BESIDE_GGUF, check_regular

        check_regular(tmp_path, BESIDE_GGUF)
        with pytest.raises(ModelLoadError, match="not a regular file"):
            check_regular(tmp_path)


def test_a_pool_adapter_naming_no_usable_base_is_one_error(world, tmp_path):
    from synth.engine import EngineSettings, ModelRef, checked_base

    folder = copy(world, "lora", tmp_path)
    for base, message in ((5, "is 5, not a model name"), (["a"], r"is \['a'\], not"), ("", "names no base")):
        edit_json(folder / "adapter_config.json", base_model_name_or_path=base)
        with pytest.raises(ModelLoadError, match=message):
            checked_base(ModelRef(str(folder)), EngineSettings())


def test_a_model_file_that_cannot_be_read_is_one_error(world, tmp_path):
    """The fingerprint reads every file of a model folder (the synth cache's key, run.yaml)."""
    from core.files import fingerprint

    folder = copy(world, "a", tmp_path)
    (folder / "extra.bin").symlink_to("/proc/self/mem")  # opens, then every read fails (EIO)
    with pytest.raises(ModelLoadError, match=r"cannot read .*extra.bin \(Input/output error\): check"):
        fingerprint(folder)
