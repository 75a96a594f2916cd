"""A crash while writing a folder leaves the previous folder intact and no half-written one."""

import pytest

from eval.models import atomic_dir


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
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
