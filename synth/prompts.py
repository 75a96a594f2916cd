"""Prompt templates: one editable text file per prompt under synth/templates/, with `$name`
placeholders (string.Template).

A `templates_dir` in the config overrides any of these files by name; the rest come from here.
Files: harmful_{system,user,prefill}.txt, domain_{system,user,prefill}.txt,
benign_{system,user,prefill}.txt, benign_seeds.json. A `*_prefill.txt` starts the assistant turn
(the model continues it); leave it empty to let the model start on its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from string import Template

HERE = Path(__file__).parent / "templates"


class Templates:
    def __init__(self, override_dir: str | Path | None = None):
        self.override = Path(override_dir) if override_dir else None
        if self.override and not self.override.is_dir():
            raise FileNotFoundError(f"templates_dir {self.override} is not a folder")

    def path(self, name: str) -> Path:
        if self.override and (self.override / name).exists():
            return self.override / name
        return HERE / name

    def raw(self, name: str) -> str:
        return self.path(name).read_text().rstrip("\n")

    def render(self, name: str, **values) -> str:
        try:
            return Template(self.raw(name)).substitute(**values)
        except KeyError as e:
            raise KeyError(
                f"template {self.path(name)} uses ${e.args[0]}, which is not one of "
                f"{sorted(values)} (write $$ for a literal dollar sign)"
            ) from None

    def seeds(self) -> list[str]:
        return list(json.loads(self.raw("benign_seeds.json")))
