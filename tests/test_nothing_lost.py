"""Nothing a user has is ever lost, and nothing stale is ever served (README, security promises):
a command replaces only folders it wrote itself; a killed write leaves no temporary folder behind
for long; a run's outputs are read only as one complete set; caches and studies follow the
content of the models, not their paths."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys

import pytest
import torch
import yaml

from core.cli import run_cli
from core.errors import OutputError
from core.files import (
    MARKER,
    atomic_dir,
    check_creatable,
    check_replaceable,
    claim_run_dir,
    fingerprint,
    read_marker,
    unclaim_run_dir,
)
from core.models import load_model, load_tokenizer, materialize_hf_folder, save_model_atomic
from optimize.config import validate_config
from optimize.report import load_best
from optimize.search import run
from tests.conftest import make_variant, world_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def user_folder(path):
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work")
    return path


def test_a_folder_alignmerge_did_not_write_is_never_replaced(tmp_path):
    mine = user_folder(tmp_path / "mine")
    with pytest.raises(OutputError, match="was not written by alignmerge"):
        with atomic_dir(mine) as tmp:
            (tmp / "x").write_text("new")
    assert (mine / "thesis.tex").read_text() == "years of work" and not (mine / "x").exists()
    with pytest.raises(OutputError, match="is a file"):
        check_replaceable(mine / "thesis.tex")
    with pytest.raises(OutputError, match="holds files that alignmerge did not write"):
        claim_run_dir(mine)
    # two workers started together: the other one is writing the marker (its temporary is there)
    racing = tmp_path / "racing"
    racing.mkdir()
    (racing / f".{MARKER}.k2j4.tmp").write_text("")
    assert claim_run_dir(racing) == racing and read_marker(racing) == {"kind": "run"}
    (mine / f".{MARKER}.k2j4.tmp").write_text("")  # beside a user's files it does not make them ours
    with pytest.raises(OutputError, match="holds files that alignmerge did not write"):
        claim_run_dir(mine)
    # a folder it wrote is replaced; one of another kind (a dataset for an eval output) is not
    with atomic_dir(tmp_path / "ours", kind="eval") as tmp:
        (tmp / "a").write_text("1")
    with atomic_dir(tmp_path / "ours", kind="eval") as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == [MARKER, "b"]
    with pytest.raises(OutputError, match="holds another alignmerge output"):
        check_replaceable(tmp_path / "ours", kind="dataset")


def test_a_run_yaml_does_not_make_a_folder_ours_and_links_are_kept(tmp_path):
    project = user_folder(tmp_path / "project")
    (project / "run.yaml").write_text("my own experiment settings")
    with pytest.raises(OutputError, match="holds files that alignmerge did not write"):
        claim_run_dir(project)
    assert not (project / MARKER).exists()
    unclaim_run_dir(claim_run_dir(tmp_path / "fresh"))  # a claim undone: nothing left
    assert not (tmp_path / "fresh").exists()
    (claim_run_dir(tmp_path / "busy") / "study.log").write_text("another worker's")
    unclaim_run_dir(tmp_path / "busy")  # someone wrote there meanwhile: the folder stays ours
    assert read_marker(tmp_path / "busy") == {"kind": "run"}
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="which is a file"):
        claim_run_dir(tmp_path / "afile" / "run")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(OutputError, match="broken symbolic link"):
        claim_run_dir(tmp_path / "dangling")
    # an --out that is a link to an empty folder: written where it points, the link kept
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    for n in (1, 2):
        with atomic_dir(tmp_path / "link", kind="eval") as tmp:
            (tmp / "report.md").write_text(f"run {n}")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "target" / "report.md").read_text() == "run 2"


def test_every_cli_refuses_an_out_folder_of_the_user(world, tmp_path):
    """optimize.search (out:), synth.generate (--out) and eval.run (--out): exit 2, one line, the
    folder untouched."""
    mine = user_folder(tmp_path / "mine")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(world_config(world, mine, n_trials=1)))
    proc = subprocess.run(
        [sys.executable, "-m", "optimize.search", "--config", str(config)],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:"), proc.stderr[-2000:]
    assert "did not write" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]

    from synth.config import parse_synth
    from synth.generate import generate

    cfg = parse_synth({"pool": [{"path": str(world["base"])}], "n_domain": 0})
    with pytest.raises(OutputError, match="was not written by alignmerge"):
        generate(cfg, mine)
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]


def test_stale_temporaries_of_a_dead_writer_are_removed(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".merged.tmp-{host}-{dead.pid}-abc123"
    old = tmp_path / f".merged.old-{host}-{dead.pid}"
    alive = tmp_path / f".merged.tmp-{host}-{os.getpid()}-xyz789"  # a write under way: kept
    other_host = tmp_path / f".merged.tmp-elsewhere-{dead.pid}-q1"  # can't tell: kept
    for p in (stale, old, alive, other_host):
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"0" * 1000)
    with atomic_dir(tmp_path / "merged", kind="model") as tmp:
        (tmp / "config.json").write_text("{}")
    assert not stale.exists() and not old.exists()
    assert alive.exists() and other_host.exists()


def test_outputs_honour_the_umask(world, tmp_path):
    old = os.umask(0o022)
    try:
        model, tok = load_model(world["base"]), load_tokenizer(world["base"])
        out = save_model_atomic(model, tok, tmp_path / "m")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.iterdir()]}
    assert modes["model.safetensors"] == 0o644 and modes["m"] == 0o755, modes
    assert all(m in (0o644, 0o755) for m in modes.values()), modes


def test_a_half_written_set_of_outputs_is_never_read_as_whole(world, tmp_path):
    """A kill between best.yaml and run.yaml (written last) leaves a new best.yaml beside the old
    run.yaml and merged/: every reader refuses the set; the same search command rewrites it."""
    raw = world_config(world, tmp_path / "run", n_trials=2)
    raw["output"] = {"plots": False, "references": False, "mergekit": False, "test_splits": False}
    run(validate_config(raw))
    run_dir = tmp_path / "run"
    first_run_yaml = (run_dir / "run.yaml").read_text()
    assert (
        load_best(run_dir)["outputs_stamp"] == json.loads((run_dir / "merged" / MARKER).read_text())["stamp"]
    )
    raw["search"]["n_trials"] = 3
    run(validate_config(raw))
    (run_dir / "run.yaml").write_text(first_run_yaml)  # as if killed before run.yaml was written
    with pytest.raises(OutputError, match="not one complete set"):
        load_best(run_dir)
    from eval.run_inputs import resolve_target

    with pytest.raises(OutputError, match="not one complete set"):
        resolve_target(str(run_dir))
    run(validate_config(raw))  # the same command: no new trial, the outputs written again
    assert load_best(run_dir)["params"]
    assert resolve_target(str(run_dir)).params == load_best(run_dir)["params"]


def test_a_model_retrained_at_the_same_path_is_never_served_stale(world, tmp_path):
    model = shutil.copytree(world["a"], tmp_path / "expert")
    before = fingerprint(model)
    folder = materialize_hf_folder(model, tmp_path / "cache" / "expert", dtype=torch.float32)
    assert materialize_hf_folder(model, folder, dtype=torch.float32) == folder  # reused as is
    stamp = json.loads((folder / MARKER).read_text())["stamp"]
    make_variant(world["base"], model, seed=9)  # retrained in place
    assert fingerprint(model) != before
    materialize_hf_folder(model, folder, dtype=torch.float32)
    assert json.loads((folder / MARKER).read_text())["stamp"] != stamp
    torch.testing.assert_close(
        load_model(folder).model.embed_tokens.weight, load_model(model).model.embed_tokens.weight
    )
    # the study signature follows the weights: resuming on other weights is refused
    raw = world_config(world, tmp_path / "run", n_trials=1)
    raw["sources"][0]["path"] = str(model)
    raw["output"] = {"plots": False, "references": False, "mergekit": False, "save_model": False}
    run(validate_config(raw))
    make_variant(world["base"], model, seed=10)
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match="weights: study has"):
        run(validate_config({**raw, "search": {**raw["search"], "n_trials": 2}}))


def test_the_synth_cache_follows_the_model_content(world, tmp_path):
    from synth.cache import Request, engine_ident, model_fingerprint, request_key
    from synth.engine import EngineSettings, ModelRef, Sampling

    model = shutil.copytree(world["a"], tmp_path / "expert")
    req = Request([{"role": "user", "content": "hi"}], Sampling(temperature=0.0, max_tokens=4))
    engine = engine_ident(EngineSettings())
    key = request_key(ModelRef(str(model)), req, engine)
    make_variant(world["base"], model, seed=11)
    model_fingerprint.cache_clear()  # a new process (the rerun after a retrain)
    assert request_key(ModelRef(str(model)), req, engine) != key


def test_a_run_never_goes_into_another_outputs_folder(tmp_path):
    """A search, sweep, demo or ablation given an eval, dataset, world or model folder as its run
    folder would write into it, and the owner's next write would delete the run."""
    for kind in ("eval", "dataset", "model"):
        with atomic_dir(tmp_path / kind, kind=kind) as tmp:
            (tmp / "report.md").write_text(kind)
        with pytest.raises(OutputError, match=f"holds another alignmerge output \\(an? {kind} folder\\)"):
            claim_run_dir(tmp_path / kind)
        assert sorted(p.name for p in (tmp_path / kind).iterdir()) == [MARKER, "report.md"]
    # the shipped world is a world, not a synth data set: synth.generate --out data/default is refused
    with pytest.raises(OutputError, match="a world folder"):
        check_replaceable("data/default", "--out", kind="dataset")
    check_replaceable("data/default", kind="world")  # every file of it is the world's own


def test_files_a_user_added_inside_an_output_are_never_deleted(world, tmp_path):
    merged = tmp_path / "merged"
    with atomic_dir(merged, kind="model") as tmp:
        (tmp / "model.safetensors").write_text("weights")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x.json").write_text("{}")
    (merged / "model-q4.gguf").write_text("the user's own export")
    with pytest.raises(OutputError, match=r"did not write \(model-q4.gguf\).*move them away"):
        with atomic_dir(merged, kind="model") as tmp:
            (tmp / "model.safetensors").write_text("new weights")
    assert (merged / "model-q4.gguf").read_text() == "the user's own export"
    assert (merged / "model.safetensors").read_text() == "weights"
    (merged / "model-q4.gguf").unlink()
    for hidden in (".gitattributes", ".env", ".git/config", ".env.old", ".tmp/x", ".old/notes"):  # the user's
        (merged / hidden).parent.mkdir(exist_ok=True)
        (merged / hidden).write_text("the user's")
        with pytest.raises(OutputError, match=rf"did not write \({re.escape(hidden)}\)"):
            with atomic_dir(merged, kind="model") as tmp:
                (tmp / "model.safetensors").write_text("new weights")
        assert (merged / hidden).read_text() == "the user's"
        (merged / hidden).unlink()
    (merged / ".DS_Store").write_text("")
    (merged / ".config.json.k3j9x2ab.tmp.json").write_text("")  # a kill mid-write: ours, not counted
    (merged / ".cache" / "huggingface").mkdir(parents=True)  # a Hub upload's metadata: hidden, not counted
    (merged / ".cache" / "huggingface" / "upload.lock").write_text("")
    with atomic_dir(merged, kind="model") as tmp:  # only its own files: replaced
        (tmp / "model.safetensors").write_text("new weights")
    (merged / MARKER).write_text(json.dumps({"kind": "model", "stamp": None}) + "\n")  # an older marker
    (merged / "notes.md").write_text("cannot tell: an older marker lists no files")
    check_replaceable(merged, kind="model")
    # a search refuses before its trials, not when it writes merged/ at the end
    raw = world_config(world, tmp_path / "run", n_trials=1)
    raw["output"] = {"plots": False, "references": False, "mergekit": False, "test_splits": False}
    run(validate_config(raw))
    (tmp_path / "run" / "merged" / "model-q4.gguf").write_text("the user's own export")
    raw["search"]["n_trials"] = 2
    with pytest.raises(OutputError, match="merged model folder .* did not write"):
        run(validate_config(raw))
    import optuna

    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    assert len(study.trials) == 1
    # a study without trials (its study.db emptied by a full disk, or another study name) must not
    # replace the outputs of the one that wrote them
    (tmp_path / "run" / "merged" / "model-q4.gguf").unlink()
    (tmp_path / "run" / "study.db").write_bytes(b"")
    with pytest.raises(OutputError, match="holds the outputs of study 'tiny' .* has no trials"):
        run(validate_config(raw))
    assert (tmp_path / "run" / "merged" / "model.safetensors").is_file()


def test_a_worker_waiting_for_the_outputs_lock_says_for_whom(tmp_path, capsys):
    from optimize.workers import outputs_lock

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, socket, sys, time; f = open(sys.argv[1], 'a+'); "
            "fcntl.flock(f, fcntl.LOCK_EX); "
            "f.write(f'pid {os.getpid()} on {socket.gethostname()}'); f.flush(); print('held', flush=True); "
            "time.sleep(60)",
            str(tmp_path / ".outputs.lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        held = f"another worker \\(pid {holder.pid} on .*run the same command"
        with pytest.raises(OutputError, match=held):
            with outputs_lock(tmp_path, patience_s=2):
                pass
        assert f"waiting for pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    with outputs_lock(tmp_path, patience_s=2):  # released when its holder dies
        assert (tmp_path / ".outputs.lock").read_text().startswith(f"pid {os.getpid()}")


@pytest.fixture
def read_only(tmp_path):
    """A folder nothing can be written in: a read-only tmpfs when root (root writes through any
    mode bits), else mode 0555."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_an_output_where_nothing_can_be_written_is_refused_before_any_work(
    read_only, world, tmp_path, capsys
):
    """It was a traceback: at once for a new run folder, after the models loaded for an old one."""
    with pytest.raises(OutputError, match="ro cannot be written .*choose a folder you may write to"):
        check_creatable(read_only / "run", "run folder")
    with pytest.raises(OutputError, match="ro cannot be written"):
        check_replaceable(read_only / "eval", "--out", kind="eval")
    assert check_creatable(tmp_path / ("r" * 240), "run folder", replaced=False)  # no temporary sibling
    cfg = validate_config(world_config(world, read_only / "run"))
    with pytest.raises(OutputError, match="cannot be written"):
        run(cfg)

    # a permission error met later (here: a rename into place) is one line naming the user's path
    def rename_refused():
        temporary = str(tmp_path / ".best.yaml.tmp")
        raise PermissionError(errno.EACCES, "Permission denied", temporary, None, "best.yaml")

    assert run_cli(rename_refused) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 'best.yaml': Permission denied; check its permissions") and "tmp" not in err
