"""The search: `python -m optimize.search --config X.yaml`, and its sweeps, ablations and demo."""

import sys

if sys.argv[:1] == ["-m"]:  # `python -m optimize.<command>`, while Python imports this package
    from core import quiet_interrupt_at_start

    quiet_interrupt_at_start()
