"""Synthetic safety and domain data: `python -m synth.generate --config X.yaml`."""
