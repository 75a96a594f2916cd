"""Prompt/response sets, read with `datasets` from a run folder or from JSONL files.

Rows need non-empty `prompt` and `response` strings. A file that is not valid JSON Lines, or that
lacks either field, is refused with the file and the fix named; rows whose prompt or response is
empty are skipped and counted (a warning says how many).
"""

from __future__ import annotations

import warnings
from pathlib import Path


class DataError(ValueError):
    pass


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
        try:
            ds = datasets.load_dataset("json", data_files=str(path), split="train")
        except Exception as err:  # datasets raises several types for malformed JSON
            raise DataError(
                f"{path} is not valid JSON Lines (one JSON object per line with "
                f"'prompt' and 'response'): {type(err).__name__}: {err}"
            ) from None
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


def _text(v) -> bool:
    return isinstance(v, str) and bool(v.strip())
