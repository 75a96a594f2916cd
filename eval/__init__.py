"""Evaluation of merged models: `python -m eval.run`."""

import sys

if sys.argv[:1] == ["-m"]:  # `python -m eval.<command>`, while Python imports this package
    from core import quiet_interrupt_at_start

    quiet_interrupt_at_start()
