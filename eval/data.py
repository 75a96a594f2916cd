"""Prompt/response sets, read with `datasets` from a run folder or from JSONL files.

Rows need non-empty `prompt` and `response` strings. A file that is not valid JSON Lines, or that
lacks either field, is refused with the file and the fix named; rows whose prompt or response is
empty are skipped and counted (a warning says how many).
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

from core.errors import DataError


def load_pairs(path: str | Path, split: str | None = None, limit: int | None = None) -> list[dict]:
    """Rows of {prompt, response, ...} from a JSONL file or a saved DatasetDict folder (`split`)."""
    import datasets

    path = Path(path)
    if not path.exists():
        raise DataError(
            f"data not found: {path} (run `python -m synth.generate --config ...` "
            "first, or name JSONL files under data.alignment / data.domain)"
        )
    if path.is_file():
        ds = datasets.Dataset.from_list(read_jsonl(path))
        origin = str(path)
    else:
        try:
            dd = datasets.load_from_disk(str(path))
        except Exception as err:
            raise DataError(f"{path} is not a saved datasets folder: {err}") from None
        if isinstance(dd, datasets.DatasetDict):
            if split not in dd:
                raise DataError(f"{path} has no split {split!r} (it has {sorted(dd)})")
            ds = dd[split]
        else:
            ds = dd
        origin = f"{path}[{split}]"
    missing = {"prompt", "response"} - set(ds.column_names)
    if missing:
        raise DataError(
            f"{origin}: missing field(s) {sorted(missing)}; every row needs "
            f"'prompt' and 'response' (found columns {ds.column_names})"
        )
    rows = [r for r in ds if _text(r["prompt"]) and _text(r["response"])]
    if len(rows) < len(ds):
        warnings.warn(
            f"{origin}: skipped {len(ds) - len(rows)} of {len(ds)} rows with an empty prompt or response",
            stacklevel=2,
        )
    if not rows:
        raise DataError(f"{origin}: no usable rows (need non-empty 'prompt' and 'response')")
    return rows[:limit] if limit else rows


def json_lines(path: str | Path, fix: str) -> list[tuple[int, object]]:
    """(line number, value) of every non-blank line of a JSON Lines file; a file that is missing,
    not UTF-8 text, or has a bad line is a DataError naming it, with `fix`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found (or not a file); {fix}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (byte {err.start}); {fix}") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {n}: not valid JSON ({err.msg}); {fix}") from None
        except RecursionError:
            raise DataError(f"{path}, line {n}: nested too deeply; {fix}") from None
    return out


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a prompt/response JSON Lines file: string fields only (other fields are dropped,
    so a stray number or list never breaks the table); a bad line is named by its number."""
    fix = "each line must be one JSON object with 'prompt' and 'response'"
    rows = []
    for n, row in json_lines(path, fix):
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {n}: a JSON object with 'prompt' and 'response' expected")
        for key in ("prompt", "response"):
            if key in row and row[key] is not None and not isinstance(row[key], str):
                raise DataError(f"{path}, line {n}: {key!r} must be a string, got {str(row[key])[:60]}")
        rows.append({k: v for k, v in row.items() if isinstance(v, str)})
    if not rows:
        raise DataError(f"{path} is empty: it needs JSON lines with 'prompt' and 'response'")
    return rows


def _text(v) -> bool:
    return isinstance(v, str) and bool(v.strip())


def split_prompts(data_dir: Path, split: str) -> list[dict]:
    """{prompt, category} of every row of a split ([] when the folder has no such split)."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(data_dir))[split]
    except (FileNotFoundError, KeyError):
        return []
    cats = ds["category"] if "category" in ds.column_names else ["unspecified"] * len(ds)
    return [{"prompt": p, "category": c or "unspecified"} for p, c in zip(ds["prompt"], cats)]


def read_prompt_file(path: str | Path) -> list[dict]:
    """Rows with `prompt` (or question/text) and optional `category`, from JSONL or CSV."""
    path = Path(path)
    fix = (
        "a prompt file is JSONL or CSV with a text column `prompt` (or `question`/`text`) "
        "and optional `category`"
    )
    if path.suffix.lower() == ".csv":
        if not path.is_file():
            raise DataError(f"{path} not found (or not a file); {fix}")
        try:
            with path.open(newline="", encoding="utf-8") as f:
                rows = list(enumerate(csv.DictReader(f), start=2))
        except (UnicodeDecodeError, csv.Error) as err:
            raise DataError(f"{path} cannot be read as CSV ({err}); {fix}") from None
    else:
        rows = json_lines(path, fix)
    out = []
    for n, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {n}: a JSON object expected; {fix}")
        low = {str(k).lower(): v for k, v in row.items()}
        text = next((low[k] for k in ("prompt", "question", "text") if low.get(k)), None)
        if not isinstance(text, str):  # a blank one is kept: the pipelines drop and count it
            raise DataError(f"{path}, line {n}: no text `prompt` (or `question`/`text`); {fix}")
        category = low.get("category")
        out.append(
            {
                "prompt": text,
                "category": category if isinstance(category, str) and category else "unspecified",
            }
        )
    if not out:
        raise DataError(f"{path} is empty; {fix}")
    return out
