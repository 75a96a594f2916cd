"""What every command does with a user's mistake: one line naming it and the fix, exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable

from core.errors import UserError


def run_cli(work: Callable[[], object]) -> int:
    """Run a command's work and print its result (a report path); bad input -> exit code 2."""
    try:
        result = work()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result)
    return 0
