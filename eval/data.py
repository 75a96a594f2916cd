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


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON Lines file; blank lines are skipped, a bad line is named by its number."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}, line {n}: not valid JSON ({err.msg}); each line must be one JSON object "
                "with 'prompt' and 'response'"
            ) from None
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {n}: a JSON object with 'prompt' and 'response' expected")
        rows.append(row)
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
    if not path.exists():
        raise FileNotFoundError(f"prompts_file {path} does not exist")
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = []
    for n, row in enumerate(rows, start=1):
        low = {k.lower(): v for k, v in row.items()}
        text = next((low[k] for k in ("prompt", "question", "text") if low.get(k)), None)
        if text is None:
            raise ValueError(f"{path} row {n}: no `prompt` (or `question`/`text`) column")
        out.append({"prompt": str(text), "category": str(low.get("category") or "unspecified")})
    return out
