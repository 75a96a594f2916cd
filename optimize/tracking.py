"""Experiment tracking, off by default: `tracking: {backend: trackio}` logs every finished trial of
a search as one step of a trackio run (https://github.com/gradio-app/trackio: local SQLite, no
server, no account), so searches of many configs and sweeps can be compared in one dashboard:

    TRACKIO_DIR=runs/<name>/trackio trackio show --project alignmerge-<name>

The run is named after the study (a resumed search or another worker continues the same run); its
config is the resolved config with the storage URL's password removed. Per trial: the objective
value(s), the losses and refusal masses the trial recorded, timings, and every parameter
(`param/<name>`); at the end, the chosen trial's search and test scores.
"""

from __future__ import annotations

import math
import os
import sys
from contextlib import redirect_stdout
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from core.cli import redact
from optimize.study import metric_names


def tracking_dir(cfg) -> Path:
    """Where trackio stores the runs: tracking.dir, else $TRACKIO_DIR, else <run folder>/trackio."""
    return Path(cfg.tracking.dir or os.environ.get("TRACKIO_DIR") or cfg.run_dir / "trackio").resolve()


def numbers(prefix: str, values: dict) -> dict[str, float]:
    return {
        f"{prefix}{k}": float(v) for k, v in values.items() if isinstance(v, int | float) and math.isfinite(v)
    }


class Tracker:
    """An Optuna callback logging each finished trial to trackio (one run per study)."""

    def __init__(self, cfg, study: optuna.Study):
        folder = tracking_dir(cfg)
        if "trackio" not in sys.modules:
            os.environ["TRACKIO_DIR"] = str(folder)  # trackio reads it once, on import
        import trackio
        import trackio.utils

        if Path(trackio.utils.TRACKIO_DIR).resolve() != folder:
            print(
                f"[alignmerge] tracking: trackio was imported earlier in this process and keeps "
                f"logging to {trackio.utils.TRACKIO_DIR}, not {folder}",
                file=sys.stderr,
            )

        self.trackio = trackio
        self.project = cfg.tracking.project or f"alignmerge-{cfg.name}"
        self.names = metric_names(cfg.search)
        config = cfg.model_dump(by_alias=True, mode="json") | {"storage": redact(cfg.storage)}
        with redirect_stdout(sys.stderr):  # stdout is the command's result (the report's path)
            self.run = trackio.init(
                project=self.project,
                name=study.study_name,
                config=config,
                resume="allow",
                auto_log_cpu=False,
                auto_log_gpu=False,
            )

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        metrics = {"pruned": float(trial.state == TrialState.PRUNED)}
        if trial.state == TrialState.COMPLETE and trial.values:
            metrics |= numbers("", dict(zip(self.names, trial.values)))
        metrics |= numbers("", trial.user_attrs) | numbers("param/", trial.params)
        self.run.log(metrics, step=trial.number)

    def finish(self, scores: dict | None, step: int) -> None:
        if scores:
            self.run.log(numbers("chosen/", scores), step=step)
        with redirect_stdout(sys.stderr):
            self.trackio.finish()  # also forgets the run: trackio's exit hook would finish it again
