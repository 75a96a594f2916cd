"""Config basics shared by every command: strict pydantic sections, one error formatter, and
reading a YAML mapping from a file. Each command declares its own sections on top of these."""

from __future__ import annotations

import math
import os
import re
import reprlib
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_args

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from core.errors import ConfigError

M = TypeVar("M", bound=BaseModel)

MAX_BYTES = 10_000_000  # a config file; anything bigger is not one
MAX_VALUES = 100_000  # values of a YAML file once its aliases are expanded (alias bombs)
MAX_DEPTH = 40  # nesting levels of a YAML file
MAX_CHARS = 1200  # a config error message, at most (each problem: at most MAX_CHARS // 2)


class Strict(BaseModel):
    """A config section: unknown keys are errors, values are frozen once validated; types are
    strict (`true` is not an int, `'5'` is not a number) and floats are finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


NAME_MAX = 255  # bytes of one file or folder name, on every common file system


def _check_name(v: str) -> str:
    if not v or v[0] == "." or not all(c.isascii() and (c.isalnum() or c in "_.-") for c in v):
        raise ValueError(
            f"name {clip(v, 60)} must be letters, digits, '_', '-' or '.' and not start with '.'"
        )
    if len(v) > 200:  # it becomes a folder name, with suffixes added
        raise ValueError(f"name {clip(v, 60)} has {len(v)} characters; at most 200")
    return v


def check_path_parts(path: str, room: int = 0) -> str:
    """A path whose folder or file names all fit a file system (OSError 'File name too long');
    its last name `room` bytes shorter (an output written under a longer temporary name first)."""
    parts = Path(path).parts
    for i, part in enumerate(parts):
        extra = room if i == len(parts) - 1 else 0
        if len(os.fsencode(part)) > NAME_MAX - extra:
            why = f"; it is first written under a name {extra} bytes longer" if extra else ""
            raise ValueError(
                f"{clip(part, 60)} in path {clip(path, 60)} is a name of {len(os.fsencode(part))} bytes; "
                f"file systems allow {NAME_MAX}{why}"
            )
    return path


# A run, source or study name: it becomes a folder or file name, so never `.`, `..` or hidden.
Name = Annotated[str, AfterValidator(_check_name)]
# A path a user writes: `~` is their home folder, as in a shell.
UserPath = Annotated[str, AfterValidator(os.path.expanduser), AfterValidator(check_path_parts)]


def _check_label(v: str) -> str:
    if not v.strip() or len(v) > 1000 or any(not c.isprintable() for c in v):
        raise ValueError(f"{clip(v, 60)} must be 1-1000 printable characters (no newline or tab)")
    return v


# A study name: shown in reports and dashboards, stored in the database, never a path.
Label = Annotated[str, AfterValidator(_check_label)]
# A random seed: numpy (Optuna's samplers) takes 0 <= seed < 2**32.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]

_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """`24GiB`, `80 GB`, `512MiB`, `2e9` -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    size = float(m.group(1)) * _UNITS[m.group(2)] if m and m.group(2) in _UNITS else 0.0
    if not 1 <= size < float("inf"):  # "0.5" is half a byte, not half a GB
        raise ValueError(f"{clip(text, 60)} is not a memory size (write e.g. 24GiB, 80GB or 512MiB)")
    return int(size)


# A memory size such as "24GiB" or "80GB", checked when the config is read.
MemorySize = Annotated[
    str,
    BeforeValidator(lambda v: repr(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v),
    AfterValidator(lambda v: parse_size(v) and v),
]

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother = 3, 120, 120


def cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def printable(text: str) -> str:
    """`text` on one line: control characters (a newline in a key) escaped."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def clip(value: Any, limit: int = 200) -> str:
    """A short repr of any user input (huge, deeply nested or self-referencing): at most `limit`
    characters."""
    return cut(_repr.repr(value), limit)


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


def _problems(model: type[BaseModel], err: ValidationError, prefix: str) -> list[str]:
    """One line per bad key, and one per section for its unknown keys; inputs shown clipped."""

    def where(loc: tuple) -> str:
        return cut(printable(".".join(str(p) for p in (*([prefix] if prefix else []), *loc))), 120)

    lines, unknown = [], {}
    for e in err.errors():
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            unknown.setdefault(e["loc"][:-1], []).append(e["loc"][-1])
            continue
        if e["type"] == "literal_error":
            msg = f"got {clip(e['input'])}; {msg.lower()}"
        elif e.get("input") is not None and e["type"] != "value_error":
            msg = f"{msg} (got {clip(e['input'])})"
        lines.append(f"  {where(e['loc']) or '(top level)'}: {msg}")
    for section, keys in unknown.items():
        allowed = f"allowed keys here: {', '.join(allowed_keys(model, section))}"
        if len(keys) == 1:
            lines.append(f"  {where((*section, keys[0]))}: unknown key; {allowed}")
        else:
            names = ", ".join(cut(printable(str(k)), 40) for k in keys[:5])
            more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
            lines.append(f"  {where(section) or '(top level)'}: unknown keys {names}{more}; {allowed}")
    return [cut(line, MAX_CHARS // 2) for line in lines]


def validate(model: type[M], raw: Any, origin: str = "", prefix: str = "") -> M:
    """`model.model_validate(raw)`; a ConfigError names every bad key with what is wrong and, for
    an unknown key, the keys allowed there. `prefix` is the section's path (`synth`, `eval`).
    The message stays short (MAX_CHARS), whatever the input."""
    try:
        return model.model_validate(raw)
    except (RecursionError, MemoryError):
        raise ConfigError(f"config{f' {origin}' if origin else ''} is nested too deeply") from None
    except ValidationError as err:
        lines = _problems(model, err, prefix)
        shown = [f"invalid config{f' {cut(origin, 200)}' if origin else ''}:"]
        for i, line in enumerate(lines):
            if i and sum(map(len, shown)) + len(line) > MAX_CHARS - 20:
                shown.append(f"  (and {len(lines) - i} more)")
                break
            shown.append(line)
        raise ConfigError("\n".join(shown)) from None


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """YAML's safe loader that refuses a key given twice in one mapping (YAML forbids it; the
    plain loader keeps the last value without a word)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, (str, int, float, bool)) or key is None:
                    if key in first:
                        raise yaml.MarkedYAMLError(
                            problem=f"key {clip(key, 60)} given twice (first on line {first[key]})",
                            problem_mark=key_node.start_mark,
                        )
                    first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


# YAML 1.1 reads 1e-3 and 1.5e3 as text; YAML 1.2, JSON and Python read a number: so does a config.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _shape(data: Any) -> tuple[float, float]:
    """(values once every alias is expanded, nesting depth) of loaded YAML; a structure that
    contains itself is infinite. Each shared part is measured once, without recursion."""
    shapes: dict[int, tuple | None] = {}
    stack: list[tuple[Any, bool]] = [(data, False)]
    while stack:
        obj, done = stack.pop()
        if not isinstance(obj, (dict, list)):
            continue
        kids = [*obj, *obj.values()] if isinstance(obj, dict) else obj
        if done:
            inner = [shapes.get(id(k)) or (1, 0) for k in kids]
            shapes[id(obj)] = (1 + sum(n for n, _ in inner), 1 + max((d for _, d in inner), default=0))
        elif id(obj) not in shapes:
            shapes[id(obj)] = None  # open until its kids are measured
            stack += [(obj, True), *((k, False) for k in kids)]
        elif shapes[id(obj)] is None:  # met again while open: it contains itself
            return math.inf, math.inf
    return shapes.get(id(data)) or (1, 0)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error on one line: where, what, and in which construct."""
    if isinstance(err, yaml.reader.ReaderError):
        return f"character U+{err.character:04X} at position {err.position} is not allowed in YAML"
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    what = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    return " ".join(f"{where}{what}{f' ({context})' if context else ''}".split())


def load_yaml_text(text: str, where: str) -> Any:
    """YAML text as plain data (a safe loader, no key given twice); nesting too deep, or aliases
    that expand past MAX_VALUES values, is a ConfigError naming `where` (a file, a --set flag)."""
    try:
        raw = yaml.load(text, Loader=_Loader)
    except ValueError as err:  # a scalar its resolver took for a number that float() refuses
        raise yaml.YAMLError(str(err)) from None
    except (RecursionError, MemoryError):
        raise ConfigError(f"{where} is nested too deeply to be a config") from None
    values, depth = _shape(raw)
    if values > MAX_VALUES:
        raise ConfigError(
            f"{where}: its aliases (*name) expand to more than {MAX_VALUES} values, or refer to "
            "themselves; write the values out"
        )
    if depth > MAX_DEPTH:
        raise ConfigError(f"{where} is nested too deeply to be a config (more than {MAX_DEPTH} levels)")
    return raw


def read_yaml_mapping(path: str | Path) -> dict:
    """The top-level mapping of a YAML file; a missing, unreadable, non-UTF-8 or oversized file,
    bad YAML (a key given twice included), nesting too deep, aliases that expand past
    MAX_VALUES values, or another top level is a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}") from None
    if len(data) > MAX_BYTES:
        raise ConfigError(f"{path} is {len(data) / 1e6:.0f} MB: too big for a config file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path} is not UTF-8 text (byte {data[err.start]:#04x} at position {err.start}); "
            "save it as UTF-8"
        ) from None
    try:
        raw = load_yaml_text(text, str(path))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(err)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return raw


def apply_overrides(raw: dict, overrides: dict[str, Any] | None) -> dict:
    """Set dotted keys (`search.n_trials`) in a raw config mapping, creating sections as needed,
    before validation, so a bad override fails the way a bad file does."""
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for i, p in enumerate(parents):
            if node.get(p) is None:  # missing, or `search:` left empty
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):  # `search: 5`, or a list such as `sources`
                where = ".".join(parents[: i + 1])
                raise ConfigError(
                    f"cannot set {clip(dotted, 80)}: {clip(where, 60)} is not a section of keys (it is "
                    f"{clip(node, 60)}); fix it in the config file"
                )
        node[leaf] = value
    return raw


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """`--set key=value` flags -> {dotted key: value}; the value is read as YAML (numbers, bools,
    lists: `--set search.grid=[0.5,1]`)."""
    out = {}
    for item in items or []:
        key, eq, text = item.partition("=")
        if not eq or not re.fullmatch(r"[\w-]+(\.[\w-]+)*", key.strip()):
            raise ConfigError(
                f"--set {clip(item, 80)}: expected key=value with a dotted key, e.g. --set search.alpha=0.5"
            )
        try:
            out[key.strip()] = (
                load_yaml_text(text, f"--set {clip(key.strip(), 60)}") if text.strip() else None
            )
        except yaml.YAMLError:
            out[key.strip()] = text
    return out
