"""A crash while writing a folder leaves the previous folder intact and no half-written one."""

import os
from pathlib import Path

import pytest

from core.files import MARKER, atomic_dir


def test_atomic_dir_replaces_only_on_success(tmp_path):
    out = tmp_path / "merged"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("first")
    assert (out / "a.txt").read_text() == "first"
    with pytest.raises(OSError), atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("half")
        raise OSError("No space left on device")
    assert (out / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temporary left behind
    with atomic_dir(out) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b.txt"]  # its own folder from now on


def test_a_folder_named_tilde_is_written_where_it_is(tmp_path, monkeypatch):
    """`--out '~/x'` (quoted): datasets' save_to_disk expands "~", so a relative temporary folder
    sent the data to $HOME and left the output without it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with atomic_dir("~/x") as tmp:
        (Path(os.path.expanduser(str(tmp))) / "a.txt").write_text("data")
    assert (tmp_path / "~" / "x" / "a.txt").read_text() == "data" and not (tmp_path / "home").exists()


def test_atomic_files_get_the_usual_permissions(tmp_path):
    import os
    import stat

    from core.files import write_text_atomic

    umask = os.umask(0o022)
    try:
        path = write_text_atomic(tmp_path / "best.yaml", "a: 1\n")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's private 0600
