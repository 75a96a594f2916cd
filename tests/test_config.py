from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from core.config import _model_in, parse_sets
from core.errors import ConfigError
from optimize.config import Config, load_config, validate_config
from optimize.search import main


def minimal(**extra) -> dict:
    return {"name": "x", "sources": [{"name": "a", "path": "p"}, {"name": "b", "path": "q"}], **extra}


def error_of(raw) -> str:
    with pytest.raises(ConfigError) as e:
        validate_config(raw)
    return str(e.value)


def test_defaults_are_the_papers():
    cfg = validate_config(minimal())
    assert cfg.search.alpha == 0.3 and cfg.search.sampler == "tpe"
    assert cfg.normalize is False  # task_arithmetic default, as mergekit
    assert validate_config(minimal(merge={"method": "ties"})).normalize is True


@pytest.mark.parametrize(
    "raw,words",
    [
        (minimal(serch={}), ["serch", "unknown key"]),
        (minimal(search={"n_trails": 3}), ["search.n_trails", "unknown key"]),
        (minimal(search={"sampler": "bayes"}), ["search.sampler", "'tpe'", "'cmaes'", "bayes"]),
        (minimal(search={"n_trials": 0}), ["search.n_trials", "greater than or equal to 1"]),
        (minimal(search={"grid": []}), ["search.grid", "at least 1 item"]),
        (minimal(search={"alpha": -1}), ["search.alpha", "greater than or equal to 0"]),
        (minimal(search={"n_trials": "many"}), ["search.n_trials", "many"]),
        (minimal(search={"parametrization": "blocks:0"}), ["blocks:K", "gradient:K"]),
        (minimal(search={"weight": [1, 0]}), ["low (1.0) must be < high (0.0)"]),
        (minimal(search={"weight": [-1, 1]}), ["allow_negative"]),
        (minimal(search={"density": [0, 1]}), ["0 < low"]),
        (minimal(search={"objective": "pareto", "sampler": "cmaes"}), ["cmaes is single-objective"]),
        (minimal(search={"objective": "pareto", "score": "domain"}), ["needs search.score: both"]),
        (minimal(merge={"method": "slerp"}, sources=[{"name": "a", "path": "p"}]), ["exactly 2 sources"]),
        (minimal(merge={"method": "mergealign"}), ["role: domain", "role: alignment"]),
        (minimal(merge={"method": "fancy"}), ["merge.method", "'ties'"]),
        (
            minimal(search={"verify": {"top_k": 2, "restore_steps": 4}}),
            ["restore_steps is 4", "role: alignment"],
        ),
        (
            minimal(search={"verify": {"top_k": 2, "restore_steps": 11}}),
            ["restore_steps", "less than or equal"],
        ),
        (minimal(runtime={"device": "gpu"}), ["runtime.device", "cuda"]),
        (minimal(sources=[]), ["sources"]),
        ({"name": "x", "sources": [{"name": "a", "path": "p"}, {"name": "a", "path": "q"}]}, ["unique"]),
    ],
)
def test_bad_values_name_the_key(raw, words):
    msg = error_of(raw)
    for w in words:
        assert w in msg, msg


def test_numbers_paths_and_labels_as_a_user_writes_them(tmp_path):
    msg = error_of(minimal(search={"init_weight": 5.0}))
    assert "search.init_weight 5.0 is outside search.weight [0.0, 1.0]" in msg, msg
    config = tmp_path / "c.yaml"
    config.write_text(
        "name: x\nsources: [{name: a, path: p}]\nsearch: {alpha: 1e-3, beta: 1.5e3}\nout: ~/runs/x\n"
    )
    cfg = load_config(config, parse_sets(["data.dir=~/d", "merge.lambda=2E+0"]))
    assert (cfg.search.alpha, cfg.search.beta, cfg.merge.lambda_) == (0.001, 1500.0, 2.0)
    assert cfg.run_dir == Path.home() / "runs" / "x" and cfg.data_dir == Path.home() / "d"
    assert "printable characters" in error_of(minimal(study_name="a\nb"))
    assert "less than or equal to 10000" in error_of(minimal(merge={"lambda": 1e39}))  # not a float32
    assert validate_config(minimal(study_name="x[search.beta=0.3] ü")).study_name == "x[search.beta=0.3] ü"
    for value, words in (("&a {x: *a}", "refer to themselves"), ("[" * 60 + "]" * 60, "nested too deeply")):
        with pytest.raises(ConfigError, match=words):
            parse_sets([f"eval={value}"])


def test_negative_weights_when_asked():
    cfg = validate_config(minimal(search={"weight": [-1, 1], "allow_negative": True}))
    assert cfg.search.weight.low == -1


def test_cli_flags_override_and_fail_before_loading(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(minimal(base="/nonexistent/base")))
    cfg = load_config(path, {"search.n_trials": 7, "search.sampler": "random"})
    assert cfg.search.n_trials == 7 and cfg.search.sampler == "random"
    # a bad model path is reported (exit 2) without loading anything
    assert main(["--config", str(path)]) == 2
    assert "base: model path does not exist: /nonexistent/base" in capsys.readouterr().err
    assert main(["--config", str(path), "--n-trials", "0"]) == 2
    assert "search.n_trials" in capsys.readouterr().err


def test_set_overrides_any_key_on_every_cli(world, tmp_path, capsys):
    """`--set key=value` (YAML values) on search, demo, synth.generate and eval.run: a bad key or
    value is one error line naming it, before anything loads."""
    from eval.run import main as eval_main
    from optimize.demo import main as demo_main
    from synth.generate import main as synth_main

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(minimal(base="/nonexistent/base", synth={"pool": []})))
    cfg = load_config(path, parse_sets(["search.alpha=0.5", "search.grid=[0.5, 1]", "search.verify.top_k=2"]))
    assert (cfg.search.alpha, cfg.search.grid, cfg.search.verify.top_k) == (0.5, [0.5, 1], 2)
    for argv, fragment in [
        (["--set", "search.alpha=-1"], "search.alpha"),
        (["--set", "search.alpah=1"], "search.alpah: unknown key"),
        (["--set", "alpha"], "expected key=value"),
        (["--set", "sources.0.path=x"], "'sources' is not a section of keys"),
    ]:
        assert main(["--config", str(path), *argv]) == 2
        assert fragment in capsys.readouterr().err
    assert demo_main(["--config", str(path), "--set", "search.n_trials=0"]) == 2
    assert "search.n_trials" in capsys.readouterr().err
    assert synth_main(["--config", str(path), "--set", "synth.n_safety=-3"]) == 2
    assert "n_safety" in capsys.readouterr().err
    assert eval_main(["--model", str(world["base"]), "--config", str(path), "--set", "search.sampler=x"]) == 2
    assert "search.sampler" in capsys.readouterr().err


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_configs_validate():
    from pathlib import Path

    from optimize.ablate_config import load_ablation

    for path in sorted(Path("configs").glob("*.yaml")):
        if path.name.startswith("ablation"):
            load_ablation(path)
        else:
            load_config(path)


def test_dtype_auto_is_bf16_only_where_it_is_native(monkeypatch, tmp_path):
    import torch

    from core import models

    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(
        models, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else __import__("pathlib").Path(p)
    )
    cpuinfo.write_text("flags : fpu avx2 fma\n")
    assert models.resolve_dtype("auto", "cpu") == torch.float32
    cpuinfo.write_text("flags : fpu avx2 avx512f avx512_bf16\n")
    assert models.resolve_dtype("auto", "cpu") == torch.bfloat16
    assert models.resolve_dtype("float16", "cpu") == torch.float16  # an explicit choice is kept


def readme_config() -> dict:
    """The YAML block of the README's "Config" section."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return yaml.safe_load(text.split("### Config", 1)[1].split("```yaml", 1)[1].split("```", 1)[0])


def undocumented(model, doc: dict, prefix: str = "") -> list[str]:
    """Keys of `model` missing from `doc`, or shown there with a value other than their default."""
    out = []
    for name, field in model.model_fields.items():
        key, where = field.alias or name, f"{prefix}{field.alias or name}"
        if key not in doc:
            out.append(f"{where}: missing")
            continue
        sub, value = _model_in(field.annotation), doc[key]
        if sub is not None and isinstance(value, dict):
            out += undocumented(sub, value, where + ".")
        elif not field.is_required() and not (sub is not None and isinstance(value, list) and value):
            default = field.get_default(call_default_factory=True)
            if isinstance(default, BaseModel):  # bounds are shown as [low, high]
                default = list(default.model_dump(by_alias=True, mode="json").values())
            if value != default:
                out.append(f"{where}: README shows {value!r}, the default is {default!r}")
    return out


def test_readme_config_reference_lists_every_key_with_its_default():
    doc = readme_config()
    assert undocumented(Config, doc) == []
    validate_config(doc)  # and it is a valid config as written


def test_vllm_generation_without_vllm_fails_before_loading(world, tmp_path, monkeypatch):
    import importlib.util

    from optimize.config import check_runtime
    from tests.conftest import world_config

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a)
    )
    raw = world_config(world, tmp_path / "run")
    raw["runtime"] = {"generation": "vllm"}
    with pytest.raises(ConfigError, match="runtime.generation is vllm but vllm is not installed"):
        check_runtime(validate_config(raw))
    raw["runtime"] = {"generation": "auto"}
    check_runtime(validate_config(raw))  # auto: transformers then, no error
