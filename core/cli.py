"""What every command does with a user's mistake: one line naming it and the fix, exit code 2."""

from __future__ import annotations

import argparse
import csv
import errno
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from core.config import NAME_MAX, clip, cut
from core.errors import ConfigError, DataError, UserError

T = TypeVar("T")

# What a reader of a user's file raises on a bad file (wrong encoding, bad JSON or CSV, rows of
# the wrong shape, nesting too deep), as opposed to a bug of ours.
BAD_FILE = (OSError, ValueError, LookupError, TypeError, AttributeError, RecursionError, csv.Error)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes (an unknown flag, a bad value) are a ConfigError, so that
    `run_cli` prints them like any other: one `error:` line, exit code 2."""

    def error(self, message: str):
        raise ConfigError(f"{message} (see {self.prog} --help)")

    def add_set_flag(self, example: str, scope: str = "") -> None:
        """`--set KEY=VALUE` (repeatable): config overrides, read by `core.config.parse_sets`."""
        self.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help=f"override a config key{scope}, e.g. --set {example} (repeatable; the value is YAML)",
        )


def positive_int(text: str) -> int:
    """An argparse `type`: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def read_user_file(reader: Callable[[Path], T], path: str | Path, what: str, fix: str) -> T:
    """`reader(path)` with any bad-file exception turned into a DataError naming `what` (the
    config key or flag), the file and `fix` (what a good file looks like)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what}: {path} {'is not a file' if path.exists() else 'does not exist'}")
    try:
        return reader(path)
    except UserError as err:  # the reader's own message names the file; add the key
        raise type(err)(f"{what}: {err}") from None
    except BAD_FILE as err:
        problem = str(err) if isinstance(err, OSError | ValueError) else f"{type(err).__name__}: {err}"
        raise DataError(f"{what}: {path}: {cut(problem, 300)} ({fix})") from None


def run_cli(work: Callable[[], object], interrupted: str = "run the same command again to go on") -> int:
    """Run a command's work (argument parsing included) and print its result (a report path);
    bad input -> one `error:` line on stderr, exit code 2; Ctrl-C -> what the user can do
    (`interrupted`), exit code 130 (so `search && eval` stops), no traceback."""
    try:
        result = work()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n[alignmerge] interrupted: {interrupted}", file=sys.stderr)
        return 130
    except OSError as err:  # any path a user gave, wherever it is first touched
        if err.errno == errno.ENAMETOOLONG:
            problem = (
                f"a folder or file name in it (or the whole path) is longer than the file system allows "
                f"({NAME_MAX} bytes a name); choose a shorter one"
            )
        elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and err.filename:
            problem = f"{err.strerror}; check its permissions, or choose a path you may read and write"
        else:
            raise
        # a failed rename names its destination (filename2), not our temporary file beside it
        where = err.filename2 or err.filename or err
        print(f"error: {clip(str(where), 120)}: {problem}", file=sys.stderr)
        return 2
    print(result)
    return 0


# a query parameter whose name holds one of these is masked (password, sslpassword, access_token...)
SECRET_PARAMS = ("pass", "pwd", "secret", "token", "key", "auth", "credential")


def secret_param(name: str) -> bool:
    return any(word in name.lower() for word in SECRET_PARAMS)


def redact(url: str | None) -> str | None:
    """`url` fit to print or write: the password and secret query parameters shown as ***.
    Never fails; a URL it cannot read has everything between // and the last @ masked."""
    if not url or url.startswith(("journal:", "sqlite:")):  # no credentials (sqlite+pysqlcipher: has)
        return url
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
        if "@" in (parsed.host or ""):  # a raw "@" in the password: SQLAlchemy ends it there
            raise ValueError(url)
        query = {k: "***" if secret_param(k) else v for k, v in parsed.query.items()}
        return parsed.set(query=query).render_as_string(hide_password=True).replace("=%2A%2A%2A", "=***")
    except Exception:
        head, slashes, rest = url.partition("//")
        if not slashes:
            head, rest = "", url
        if "@" in rest:
            rest = "***@" + rest.rpartition("@")[2]
        keys = "|".join(SECRET_PARAMS)
        return re.sub(rf"([?&]\w*(?:{keys})\w*=)[^&]*", r"\1***", head + slashes + rest, flags=re.IGNORECASE)


def command_line(module: str, argv: list[str] | None) -> str:
    """The command as a run records it (synth_run.json, the data card), a storage URL given by
    --set storage=... redacted like every other place it is written."""
    given = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", "-m", module, *map(_redacted, given)])


def _redacted(arg: str) -> str:
    if "://" not in arg:
        return arg
    key, eq, value = arg.partition("=") if "=" in arg.split("://")[0] else ("", "", arg)
    return key + eq + redact(value)
