"""Writing files and folders so that nothing is ever half-written or lost.

- Files and folders are written under a temporary sibling name, then renamed into place.
- Outputs honour the umask (Python makes temporary files and folders private; we undo that).
- Every folder alignmerge writes carries a marker file (`.alignmerge`). A command replaces an
  existing folder only when it carries the marker: anything else is the user's and is refused.
- Temporary siblings left by a killed process (`.<name>.tmp-<host>-<pid>-*`) are removed by the
  next write of the same folder once that process is gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

import yaml

from core.config import check_path_parts
from core.errors import ModelLoadError, OutputError

MARKER = ".alignmerge"


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_file(path: str | Path):
    """Yield a temporary sibling path of `path` (same suffix) to write; on success it is fsynced
    and renamed onto `path`: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes it private; outputs should not be
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically (`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_yaml_atomic(path: str | Path, data) -> Path:
    return write_text_atomic(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def read_marker(folder: str | Path) -> dict | None:
    """The marker of a folder alignmerge wrote ({"kind", "stamp"}), None for any other folder."""
    try:
        doc = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def check_creatable(out: str | Path, what: str, replaced: bool = True) -> Path:
    """Refuse (OutputError) a path that cannot become a folder: one inside a file, a broken link, a
    name too long, a place nothing can be written. `replaced`: written as a whole by `atomic_dir`
    (a temporary sibling, then a rename in the parent); else made once and written into (a run folder)."""
    try:
        room = len(_temporary_prefix("")) + 8 if replaced else 0  # mkdtemp adds 8 characters
        check_path_parts(str(out), room=room)
    except ValueError as err:
        raise OutputError(f"{what}: {err}; choose a shorter name") from None
    out = Path(out)
    file_above = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if file_above is not None:
        raise OutputError(f"{what} {out} is inside {file_above}, which is a file; choose another path")
    if out.is_symlink() and not out.exists():
        raise OutputError(f"{what} {out} is a broken symbolic link; remove it or choose another")
    # written: the folder itself (a run folder), or the nearest existing folder above (where it, or
    # atomic_dir's temporary sibling, is created)
    above = next(p for p in out.absolute().parents if p.exists())
    written = [above] if replaced or not out.exists() else [out]
    unwritable = next((p for p in written if p.is_dir() and not os.access(p, os.W_OK | os.X_OK)), None)
    if unwritable is not None:
        raise OutputError(
            f"{what} {out}: {unwritable} cannot be written (no write permission, or a read-only file "
            "system); choose a folder you may write to"
        )
    return out


def check_replaceable(out: str | Path, what: str = "output folder", kind: str | None = None) -> None:
    """Refuse (OutputError) to replace `out` unless it is missing, empty, or a folder of `kind`
    that alignmerge wrote (any kind when `kind` is None)."""
    out = check_creatable(out, what)
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputError(f"{what} {out} is a file, not a folder; choose another path")
    if any(out.iterdir()) and read_marker(out) is None:
        raise OutputError(
            f"{what} {out} exists and was not written by alignmerge (no {MARKER} marker inside); "
            "it would be replaced: choose another path, or move that folder away"
        )
    marker = read_marker(out) or {}
    found = marker.get("kind")
    if kind is not None and found is not None and found != kind:
        raise OutputError(
            f"{what} {out} holds another alignmerge output ({article(found)} {found} folder); it would be "
            "replaced: choose another path"
        )
    present = written_files(out)
    added = sorted(set(present) - set(marker.get("files", present)))
    if added:
        raise OutputError(
            f"{what} {out} holds files alignmerge did not write ({', '.join(added[:5])}"
            f"{', ...' if len(added) > 5 else ''}), which replacing it would delete: move them away "
            "(or choose another path), then run the same command again"
        )


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


# the names atomic_file (mkstemp) and atomic_dir (with `_owner_tag`) give their temporaries
TEMPORARY = re.compile(r"\..+\.(\w{8}\.tmp(\.\w+)?|tmp-.+-\d+-\w+|old-.+-\d+)")


def written_files(folder: Path) -> list[str]:
    """The files of a folder, relative to it, that its marker records. Left out: the markers,
    alignmerge's own temporaries (a kill mid-write), .DS_Store and a Hub download's or upload's
    .cache/huggingface. Any other hidden file (.git/, .env, .gitattributes) counts: it is the
    user's, and replacing the folder would delete it."""
    paths = (p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    return sorted(str(p) for p in paths if not _ours_or_a_cache(p))


def _ours_or_a_cache(rel: Path) -> bool:
    return (
        rel.name in (MARKER, ".DS_Store")
        or rel.parts[:2] == (".cache", "huggingface")
        or any(TEMPORARY.fullmatch(part) for part in rel.parts)
    )


def claim_run_dir(run_dir: str | Path) -> Path:
    """Create the run folder, or accept an existing one that is ours (its marker) or empty and mark
    it; refuse any other folder (a user's folder that merely holds a run.yaml is not ours)."""
    run_dir = check_creatable(run_dir, "run folder", replaced=False)
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputError(f"run folder {run_dir} is a file; set out: (or --out) to a folder")
    found = (read_marker(run_dir) or {}).get("kind", "run") if run_dir.is_dir() else "run"
    if found != "run":
        raise OutputError(
            f"run folder {run_dir} holds another alignmerge output ({article(found)} {found} folder), "
            "which would replace the run's files when it is written again: set out: (or --out) to another "
            "folder"
        )
    if run_dir.is_dir() and read_marker(run_dir) is None:
        # another worker's marker being written (`atomic_file`'s temporary) is ours too: workers
        # started together claim the same folder
        others = [
            p for p in run_dir.iterdir() if not (p.name.startswith(f".{MARKER}.") and p.name.endswith(".tmp"))
        ]
        if others:
            raise OutputError(
                f"run folder {run_dir} exists and holds files that alignmerge did not write; "
                "outputs there could replace them: set out: (or --out) to a new folder (a run folder "
                'of an alignmerge before its .alignmerge marker: echo \'{"kind": "run"}\' > '
                f"{run_dir}/{MARKER}, then run again)"
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    if read_marker(run_dir) is None:
        write_text_atomic(run_dir / MARKER, json.dumps({"kind": "run"}) + "\n")
    return run_dir


def unclaim_run_dir(run_dir: Path) -> None:
    """Undo `claim_run_dir` on a folder it created, when the marker is still all it holds (another
    worker may have written there meanwhile: then the folder stays, marked)."""
    with contextlib.suppress(OSError):
        if [p.name for p in run_dir.iterdir()] == [MARKER]:
            (run_dir / MARKER).unlink()
            run_dir.rmdir()


def _owner_tag() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _temporary_prefix(name: str) -> str:
    """`atomic_dir`'s temporary sibling of `name` (`TEMPORARY` matches it), before mkdtemp's suffix."""
    return f".{name}.tmp-{_owner_tag()}-"


def remove_stale_temporaries(out: Path) -> None:
    """Remove `.<name>.tmp-<host>-<pid>-*` / `.<name>.old-<host>-<pid>` siblings of `out` whose
    process on this host is gone (a kill mid-write), e.g. 16 GB of a half-written 8B model."""
    host = socket.gethostname()
    for kind in ("tmp", "old"):
        for p in out.parent.glob(f".{out.name}.{kind}-*"):
            tag = p.name[len(f".{out.name}.{kind}-") :]
            if kind == "tmp":
                tag = tag.rpartition("-")[0]  # drop mkdtemp's random suffix
            p_host, _, pid = tag.rpartition("-")
            if p_host == host and pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)


@contextmanager
def atomic_dir(out: str | os.PathLike, kind: str = "output", stamp: str | None = None):
    """Yield a temporary sibling folder of `out`; on success it gets the marker and replaces `out`
    by renames, so a crash never leaves a half-written folder under `out` (nor loses the previous
    one). An existing `out` that alignmerge did not write is refused, before and after."""
    out = Path(out).absolute()  # a literal "~" folder stays one for writers that expand "~"
    check_replaceable(out, kind=kind)
    if out.is_symlink():  # write where the link points and keep the user's link
        out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(out.name), dir=out.parent))
    try:
        yield tmp
        marker = {"kind": kind, "stamp": stamp, "files": written_files(tmp)}
        (tmp / MARKER).write_text(json.dumps(marker) + "\n")
        honour_umask(tmp)
        check_replaceable(out, kind=kind)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{_owner_tag()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def honour_umask(folder: Path) -> None:
    """Give `folder` and everything in it the permissions the umask asks for: libraries that
    write through temporary files (safetensors, tempfile) leave them private (0600)."""
    umask = current_umask()
    folder.chmod(0o777 & ~umask)
    for p in folder.rglob("*"):
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def fingerprint(path: str | Path, full_below: int = 256 << 20) -> str:
    """A content fingerprint of a file or folder that changes when a model is retrained at the
    same path and is the same for copies on other machines: the sha256 of every file up to
    `full_below` bytes, and of the size, first and last MiB of larger ones (weights shards)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for f in files:
        if (f.name.startswith(".") or f.suffix == ".md") and f != path:  # our marker, temporaries,
            continue  # model cards: not what the model computes
        try:
            _digest_file(digest, f, f.relative_to(path) if f != path else f.name, full_below)
        except OSError as err:
            problem = f"cannot read {f} ({err.strerror or err})"
            raise ModelLoadError(f"{problem}: check its permissions and disk") from None
    return digest.hexdigest()[:16]


def _digest_file(digest, f: Path, name, full_below: int) -> None:
    size = f.stat().st_size
    digest.update(f"{name}:{size}:".encode())
    with f.open("rb") as fh:
        if size <= full_below:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        else:
            digest.update(fh.read(1 << 20))
            fh.seek(size - (1 << 20))
            digest.update(fh.read(1 << 20))
