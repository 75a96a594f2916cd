"""Synthetic safety and domain data: `python -m synth.generate --config X.yaml`."""

import sys

if sys.argv[:1] == ["-m"]:  # `python -m synth.<command>`, while Python imports this package
    from core import quiet_interrupt_at_start

    quiet_interrupt_at_start()
