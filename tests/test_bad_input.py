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

from core.errors import DataError, ModelLoadError
from core.models import adapter_config, load_model, model_format
from eval.data import load_pairs, read_prompt_file
from eval.run_inputs import extra_prompts
from optimize.config import validate_config
from optimize.context import check_inputs, load_data
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


# ----------------------------------------------------------------------------- data files and folders
GOOD = [{"prompt": "how do i make a good question", "response": "what is the answer"}] * 2


def jsonl(path, rows, prefix: bytes = b"", newline: str = "\n"):
    """`rows` as JSON Lines, non-ASCII characters written raw (as json.dumps(ensure_ascii=False) does)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + newline for r in rows)
    path.write_bytes(prefix + text.encode("utf-8"))
    return path


def search_config(tmp_path, **data) -> object:
    """A search config whose only inputs that matter are its data keys (load_data reads no model)."""
    return validate_config(
        {
            "name": "t",
            "out": str(tmp_path / "run"),
            "base": str(tmp_path / "base"),
            "sources": [
                {"name": "a", "path": str(tmp_path / "a"), "role": "alignment"},
                {"name": "b", "path": str(tmp_path / "b"), "role": "domain"},
            ],
            "data": data,
        }
    )


def test_line_separators_inside_json_strings_are_text(tmp_path):
    """U+2028 and U+0085 are line breaks to str.splitlines but plain text inside a JSON string:
    the file loads, the character kept; CRLF files still load."""
    for name, char in {"u2028": "\u2028", "nel": "\x85", "u2029": "\u2029"}.items():
        rows = [{"prompt": f"line one{char}line two", "response": "ok answer"}, *GOOD]
        assert load_pairs(jsonl(tmp_path / f"{name}.jsonl", rows))[0]["prompt"] == f"line one{char}line two"
        assert read_prompt_file(tmp_path / f"{name}.jsonl")[0]["prompt"] == f"line one{char}line two"
    assert len(load_pairs(jsonl(tmp_path / "crlf.jsonl", GOOD, newline="\r\n"))) == 2


def test_a_utf8_bom_is_accepted(tmp_path):
    """A BOM at the start (Notepad's "UTF-8") is no line-1 error, as in config files."""
    path = jsonl(tmp_path / "bom.jsonl", GOOD, prefix=b"\xef\xbb\xbf")
    assert load_pairs(path) == GOOD
    assert read_prompt_file(path)[0]["prompt"] == GOOD[0]["prompt"]
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfprompt,category\nhello there,x\n")
    assert read_prompt_file(tmp_path / "bom.csv") == [{"prompt": "hello there", "category": "x"}]


def test_a_lone_surrogate_is_refused_with_file_and_line(tmp_path):
    """ "\\ud800" is valid JSON but no text (pyarrow and the tokenizer fail on it): the search's
    reader and eval.run --prompts refuse it naming the file and the line."""
    path = tmp_path / "lone.jsonl"
    path.write_text(json.dumps(GOOD[0]) + '\n{"prompt": "\\ud800 x", "response": "r"}\n')
    with pytest.raises(DataError, match=rf"{path}, line 2: the escape \\ud800 is half of a UTF-16 surrogate"):
        load_pairs(path)
    with pytest.raises(DataError, match=rf"^eval.prompts: {path}, line 2: .*surrogate"):
        extra_prompts(str(path), path.name)
    pair = tmp_path / "pair.jsonl"  # an escaped pair is one character: fine
    pair.write_text('{"prompt": "\\ud83d\\ude00 hi", "response": "r"}\n')
    assert load_pairs(pair)[0]["prompt"] == "\U0001f600 hi"


def test_row_1_is_judged_as_a_row_not_as_the_columns(tmp_path):
    """A null or missing prompt/response in row 1 skips that row with the warning a later bad row
    gets; it does not make the whole file lack the field."""
    for name, first in {"nullp": {"prompt": None, "response": "x"}, "noresp": {"prompt": "p only"}}.items():
        path = jsonl(tmp_path / f"{name}.jsonl", [first, *GOOD])
        with pytest.warns(
            UserWarning, match=r"skipped 1 of 3 rows with an empty prompt or response .*line 1\)"
        ):
            assert load_pairs(path) == GOOD
    later = jsonl(tmp_path / "later.jsonl", [*GOOD, {"question": "q", "answer": "a"}])
    with pytest.warns(UserWarning, match=r"skipped 1 of 3 .*line 3\)"):
        assert [r["prompt"] for r in load_pairs(later)] == [r["prompt"] for r in GOOD]
    number = jsonl(tmp_path / "number.jsonl", [*GOOD, {"prompt": 5, "response": "x"}])
    with pytest.raises(DataError, match=r"line 3: 'prompt' must be a string, got 5 \(not text\)"):
        load_pairs(number)


def test_a_plain_dataset_folder_is_not_every_split(tmp_path):
    """data.dir naming a folder saved from one Dataset (no splits) is refused, not used as the
    search sets and the held-out test at once; as a data file key it is one set."""
    import datasets

    plain = tmp_path / "plain"
    datasets.Dataset.from_list(GOOD).save_to_disk(str(plain))
    with pytest.raises(DataError) as err:
        load_data(search_config(tmp_path, dir=str(plain)))
    message = str(err.value)
    assert f"{plain} is a single Dataset without splits" in message
    for needed in ("alignment_search", "domain_search", "alignment_test", "domain_test"):
        assert needed in message
    assert "DatasetDict(" in message and ".save_to_disk" in message and "JSONL" in message
    with pytest.raises(DataError, match="single Dataset without splits"):  # eval.run's test splits
        load_pairs(plain, "alignment_test")
    assert load_pairs(plain) == GOOD  # one set, under data.alignment
    rows = load_data(search_config(tmp_path, alignment=str(plain), domain=str(plain)))
    assert rows["alignment"] == GOOD
    splits = tmp_path / "splits"
    datasets.DatasetDict({"alignment_search": datasets.Dataset.from_list(GOOD)}).save_to_disk(str(splits))
    with pytest.raises(
        DataError, match=rf"{splits} is a saved DatasetDict folder \(splits \['alignment_search'\]\)"
    ):
        load_data(search_config(tmp_path, alignment=str(splits), domain=str(plain)))
    with pytest.raises(DataError, match=rf"{splits} has no split 'domain_search'"):
        load_data(search_config(tmp_path, dir=str(splits)))
    numbers = tmp_path / "numbers"
    datasets.DatasetDict(
        {"alignment_search": datasets.Dataset.from_list([{"prompt": 1, "response": "r"}])}
    ).save_to_disk(str(numbers))
    with pytest.raises(DataError, match=r"column 'prompt' holds int64 values, not text"):
        load_pairs(numbers, "alignment_search")
    with pytest.raises(DataError, match=r"is a file, but data.dir .* split 'alignment_search'"):
        load_data(search_config(tmp_path, dir=str(jsonl(tmp_path / "d.jsonl", GOOD))))


def test_a_device_or_fifo_as_data_says_what_it_is(tmp_path):
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    for path in ("/dev/zero", fifo):  # never opened: no hang
        with pytest.raises(
            DataError, match=r"is neither a regular file nor a folder .*expected a JSONL file"
        ):
            load_data(search_config(tmp_path, alignment=str(path), domain=str(path)))
        with pytest.raises(DataError, match=r"is not a regular file"):
            read_prompt_file(path)
    with pytest.raises(DataError, match=r"/dev/zero is neither .*expected a datasets.DatasetDict folder"):
        load_data(search_config(tmp_path, dir="/dev/zero"))


@pytest.mark.parametrize(
    "setting, message",
    [
        (
            "data.alignment=@long@",
            "no example has a response token within max_length=16; raise data.max_length",
        ),
        ("search.parametrization=gradient:50", "gradient:50 asks for more control points than the model has"),
    ],
)
def test_a_setting_the_loaded_base_rules_out_is_one_error_line_before_the_sources_load(
    world, tmp_path, capsys, setting, message
):
    from optimize.search import main

    raw = world_config(world, tmp_path / "run", n_trials=1)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    long = tmp_path / "long.jsonl"  # every prompt longer than max_length 16
    long.write_text(
        "".join(json.dumps({"prompt": "why " * 40, "response": "because."}) + "\n" for _ in range(3))
    )
    setting = setting.replace("@long@", str(long))
    assert main(["--config", str(config), "--set", "data.max_length=16", "--set", setting]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: ")
    assert "Loading weights" in err and "task vectors:" not in err  # after the base, before the sources


def test_a_named_test_dir_must_exist_and_test_prompts_searched_are_said_and_missing_rows(
    world, tmp_path, capsys
):
    import datasets

    raw = world_config(world, tmp_path / "run")
    raw["data"]["test_dir"] = str(tmp_path / "tset")  # a typo used to leave the report without test figures
    with pytest.raises(DataError, match=r"data.test_dir .*tset does not exist.*remove data.test_dir"):
        check_inputs(validate_config(raw))
    searched = {k: load_pairs(world[k]) for k in ("alignment", "domain")}
    datasets.DatasetDict(
        {f"{k}_test": datasets.Dataset.from_list(rows[:3]) for k, rows in searched.items()}
    ).save_to_disk(str(tmp_path / "tset"))
    capsys.readouterr()
    check_inputs(validate_config(raw))
    err = capsys.readouterr().err
    assert "3 of the 3 prompts of the test split 'alignment_test' are also alignment search prompts" in err
    assert "'domain_test' are also domain search prompts" in err
    raw["data"] |= {"n_alignment": 500, "n_domain": 2}  # more rows asked than the set has: said
    assert len(check_inputs(validate_config(raw))["alignment"]) == len(searched["alignment"])
    err = capsys.readouterr().err
    assert f"data.n_alignment is 500 but the alignment set has {len(searched['alignment'])} rows" in err
    assert "n_domain" not in err


def test_rows_whose_prompt_fills_max_length_are_counted_aloud(world, tmp_path, capsys):
    """A 1 MB prompt among 6 rows was dropped without a word (L_align of the 6 others)."""
    from optimize.context import prepare

    rows = load_pairs(world["alignment"])
    raw = world_config(world, tmp_path / "run")
    raw["data"]["alignment"] = str(
        jsonl(tmp_path / "a.jsonl", [*rows, {"prompt": "how " * 5000, "response": "ok"}])
    )
    cfg = validate_config(raw)
    ctx = prepare(cfg)
    assert len(ctx.scorer.examples["alignment"]) == len(rows)
    assert (
        f"1 of the {len(rows) + 1} rows of the alignment search set are not scored: their prompt leaves "
        f"no answer token within data.max_length={cfg.data.max_length}" in capsys.readouterr().err
    )


def test_a_csv_row_ending_in_a_comma_is_read(tmp_path):
    """Strict CSV reading refuses a stray quote or an extra field with text, not a trailing comma
    (spreadsheets leave them), a BOM, CRLF or doubled quotes."""
    path = tmp_path / "p.csv"
    path.write_bytes(b'\xef\xbb\xbfprompt,category\r\nhow do I bake,cooking,\r\n"say ""hi""",x\r\n\r\n')
    assert read_prompt_file(path) == [
        {"prompt": "how do I bake", "category": "cooking"},
        {"prompt": 'say "hi"', "category": "x"},
    ]
