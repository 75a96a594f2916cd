"""Bad input gets a clear error before expensive work, and nothing already written is lost
(docs/errors.md lists every case and what the user sees; the others are tested beside their code:
test_config, test_sources, test_loss, test_search, test_workers)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from core.errors import ModelLoadError
from core.models import adapter_config, load_model, model_format
from optimize.config import validate_config
from optimize.context import check_inputs
from tests.conftest import world_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def search(config, *args, limit_bytes: int | None = None):
    def limit():  # a disk that fills up: writes past this size fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(
        [sys.executable, "-m", "optimize.search", "--config", str(config), *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit if limit_bytes else None,
    )


def test_disk_full_while_saving_keeps_the_previous_best_model(world, tmp_path):
    raw = world_config(world, tmp_path / "run", n_trials=2)
    raw["output"] = {"plots": False, "references": False, "mergekit": False}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert search(config).returncode == 0
    merged = tmp_path / "run" / "merged"
    before = {p.name: p.read_bytes() for p in merged.iterdir()}
    weights = merged / "model.safetensors"
    assert weights.stat().st_size > 400_000  # the limit below stops the model, not the small files
    proc = search(config, "--n-trials", "4", limit_bytes=400_000)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "could not write the outputs" in proc.stderr and "File too large" in proc.stderr
    assert "run the same command again" in proc.stderr
    assert {p.name: p.read_bytes() for p in merged.iterdir()} == before  # the previous model, intact
    assert not [p for p in (tmp_path / "run").iterdir() if ".tmp" in p.name]  # no half-written file
    # with space again, the same command writes the outputs of all 4 trials without new trials
    proc = search(config, "--n-trials", "4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "4/4 trials done" in proc.stderr
    assert yaml.safe_load((tmp_path / "run" / "run.yaml").read_text())["outputs_stamp"]
    load_file(weights)


def test_corrupt_weights_are_refused_before_loading(world, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(world["a"], broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])  # an interrupted copy
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        model_format(broken)
    raw = world_config(world, tmp_path / "run")
    raw["sources"][1]["path"] = str(broken)
    with pytest.raises(ModelLoadError, match="source 'b'.*truncated or corrupt"):
        check_inputs(validate_config(raw))
    with pytest.raises(ModelLoadError, match="must be .gguf"):
        model_format(broken / "config.json")
    for name, data in {"text.gguf": b"not a model\n", "cut.gguf": b"GGUF\x03\x00\x00\x00\x05"}.items():
        (broken / name).write_bytes(data)  # a wrong file renamed; a copy cut after the magic
        with pytest.raises(ModelLoadError, match="cannot be read as GGUF.*truncated or corrupt"):
            model_format(broken / name)
    assert adapter_config(broken / "cut.gguf") == {}  # a model file has no adapter config: not an error


def test_pickled_weights_need_the_flag_and_warn(world, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(world["a"] / "config.json", pickled)
    torch.save(load_model(str(world["a"])).state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickled .bin weights"):
        model_format(pickled)
    with pytest.warns(UserWarning, match="loading pickled weights"):
        assert model_format(pickled, allow_pickle=True) == "hf"


def test_remote_code_is_never_run_unless_asked(world, tmp_path):
    """A model folder that ships code (auto_map) is loaded with the library's own class; its code
    is not imported."""
    folder = tmp_path / "remote"
    shutil.copytree(world["a"], folder)
    marker = tmp_path / "code-ran"
    (folder / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\n"
        "from transformers import LlamaForCausalLM\nclass Evil(LlamaForCausalLM):\n    pass\n"
    )
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.Evil"}
    (folder / "config.json").write_text(json.dumps(cfg))
    try:
        model = load_model(str(folder))
        assert type(model).__name__ == "LlamaForCausalLM"
    except (ValueError, OSError) as err:  # or refused outright: both are safe
        assert "trust_remote_code" in str(err)
    assert not marker.exists()
