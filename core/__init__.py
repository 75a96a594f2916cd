"""The ground floor: errors, file writing, model loading, config basics. Imports nothing of ours."""

import sys


def quiet_interrupt_at_start() -> None:
    """Ctrl-C while a command's modules still import (torch, transformers: ~10 s on a small CPU),
    before `core.cli.run_cli` runs: one line instead of an import's traceback (exit status still
    that of SIGINT). Here, not in core.cli, so that it is in place before anything heavy imports."""
    default = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, KeyboardInterrupt):
            print("\n[alignmerge] interrupted while starting: nothing was done", file=sys.stderr)
        else:
            default(kind, value, tb)

    sys.excepthook = hook
