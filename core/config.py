"""Config basics shared by every command: strict pydantic sections, one error formatter, and
reading a YAML mapping from a file. Each command declares its own sections on top of these."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from core.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """A config section: unknown keys are errors, values are frozen once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (`Source`, `list[Source]`, `Bounds | None`...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for a in get_args(annotation) if (m := _model_in(a))), None)


def allowed_keys(root: type[BaseModel], loc: tuple) -> list[str]:
    """The keys a config section accepts; `loc` is its path from `root` (list indices skipped)."""
    model: type[BaseModel] | None = root
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = next((f for n, f in model.model_fields.items() if part in (n, f.alias)), None)
        model = _model_in(field.annotation) if field else None
    return [f.alias or n for n, f in model.model_fields.items()] if model else []


def validate(model: type[M], raw: Any, origin: str = "", prefix: str = "") -> M:
    """`model.model_validate(raw)`; a ConfigError names every bad key with what is wrong and, for
    an unknown key, the keys allowed there. `prefix` is the section's path (`synth`, `eval`)."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        lines = [f"invalid config{f' {origin}' if origin else ''}:"]
        for e in err.errors():
            key = ".".join(str(p) for p in (*([prefix] if prefix else []), *e["loc"])) or "(top level)"
            msg = e["msg"]
            if e["type"] == "extra_forbidden":
                msg = f"unknown key; allowed keys here: {', '.join(allowed_keys(model, e['loc'][:-1]))}"
            elif e["type"] == "literal_error":
                msg = f"got {e['input']!r}; {msg.lower()}"
            elif e.get("input") is not None and e["type"] != "value_error":
                msg = f"{msg} (got {e['input']!r})"
            lines.append(f"  {key}: {msg}")
        raise ConfigError("\n".join(lines)) from None


def read_yaml_mapping(path: str | Path) -> dict:
    """The top-level mapping of a YAML file; a missing file, bad YAML or another top level is a
    ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return raw
