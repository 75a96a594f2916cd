"""Prompt/response sets, read with `datasets` from a run folder or from JSONL files.

Rows need non-empty `prompt` and `response` strings. A file that is not valid JSON Lines, or that
lacks either field, is refused with the file and the fix named; rows whose prompt or response is
empty, null or missing are skipped and counted (a warning says how many, and which). A folder is
a saved `datasets.DatasetDict` whose splits are the sets; a folder saved from one `Dataset` is one
set (a data file key), never every split.
"""

from __future__ import annotations

import csv
import json
import re
import warnings
from pathlib import Path

from core.errors import DataError

PAIR = ("prompt", "response")
# the splits synth.generate writes, which the commands read from a data folder
SPLITS = (
    "alignment_search, domain_search, benign_search (the search) and alignment_test, domain_test, "
    "benign (held out)"
)
DATASET_DICT = "a datasets.DatasetDict folder saved with save_to_disk (synth.generate writes one)"
ONE_SET = (
    "a JSONL file with 'prompt' and 'response' on every line (or a folder saved from one datasets.Dataset)"
)


def load_pairs(path: str | Path, split: str | None = None, limit: int | None = None) -> list[dict]:
    """Rows of {prompt, response, ...} from a JSONL file (`split` None) or a saved DatasetDict
    folder (its `split`); with `split` None a folder saved from one `Dataset` is also one set."""
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"data not found: {path} (run `python -m synth.generate --config ...` "
            "first, or name JSONL files under data.alignment / data.domain)"
        )
    if path.is_file():
        if split is not None:
            raise DataError(
                f"{path} is a file, but data.dir and data.test_dir name {DATASET_DICT}, and its split "
                f"{split!r} is asked for; name JSONL files under data.alignment / data.domain / "
                "data.helpfulness instead"
            )
        numbered = read_pairs_file(path)
        where, rows = [f"line {n}" for n, _ in numbered], [r for _, r in numbered]
        seen = list(dict.fromkeys(k for r in rows for k in r))
        columns = [k for k in PAIR if k in seen] + [k for k in seen if k not in PAIR]
        rows = [{k: r.get(k) for k in columns} for r in rows]  # every row judged alone, not by row 1
        origin = str(path)
    else:
        ds = open_folder(path, split)
        origin = str(path) if split is None else f"{path}[{split}]"
        columns = ds.column_names
        check_text_columns(ds, origin)
        rows = list(ds)
        where = [f"row {i}" for i in range(1, len(rows) + 1)]
    missing = [k for k in PAIR if k not in columns]
    if missing:
        raise DataError(
            f"{origin}: missing field(s) {missing}; every row needs "
            f"'prompt' and 'response' (found columns {columns})"
        )
    skipped = [w for w, r in zip(where, rows) if not (_text(r["prompt"]) and _text(r["response"]))]
    rows = [r for r in rows if _text(r["prompt"]) and _text(r["response"])]
    if skipped:
        more = ", ..." if len(skipped) > 5 else ""
        warnings.warn(
            f"{origin}: skipped {len(skipped)} of {len(skipped) + len(rows)} rows with an empty prompt or "
            f"response (blank, null or missing: {', '.join(skipped[:5])}{more})",
            stacklevel=2,
        )
    if not rows:
        raise DataError(f"{origin}: no usable rows (need non-empty 'prompt' and 'response')")
    return rows[:limit] if limit else rows


def open_folder(path: Path, split: str | None):
    """The set a folder holds: split `split` of a saved DatasetDict, or (`split` None) a folder
    saved from one Dataset; anything else is a DataError saying what the path is and what was
    expected."""
    import datasets

    expected = f"{DATASET_DICT} with split {split!r}" if split else ONE_SET
    if not path.is_dir():
        raise DataError(
            f"{path} is neither a regular file nor a folder (a device or FIFO?); expected {expected}"
        )
    try:
        dd = datasets.load_from_disk(str(path))
    except Exception as err:  # any unreadable folder is a data problem
        why = "" if isinstance(err, FileNotFoundError) else f" ({type(err).__name__}: {str(err)[:200]})"
        raise DataError(
            f"{path} is a folder not saved by datasets' save_to_disk{why}; expected {expected}"
        ) from None
    if isinstance(dd, datasets.DatasetDict):
        if split is None:
            raise DataError(
                f"{path} is a saved DatasetDict folder (splits {sorted(dd)}), but a data file key names one "
                f"set: {ONE_SET}. To read this folder, name it in data.dir and its splits in "
                "data.alignment_split / data.domain_split / data.helpfulness_split"
            )
        if split not in dd:
            raise DataError(
                f"{path} has no split {split!r} (it has {sorted(dd)}); write the folder with "
                "synth.generate, or save a DatasetDict that has it"
            )
        return dd[split]
    if split is not None:
        raise DataError(
            f"{path} is a single Dataset without splits (saved from datasets.Dataset, not a DatasetDict): "
            f"its rows would be used as every set, the held-out test included. Split {split!r} is asked "
            f"for; data folders have the splits {SPLITS}. Save DatasetDict({{{split!r}: ..., ...}})"
            ".save_to_disk(...) with those split names, or name a JSONL file (or this folder, as one "
            "set) under data.alignment / data.domain / data.helpfulness"
        )
    return dd


def check_text_columns(ds, origin: str) -> None:
    """`prompt` and `response` of a saved set are text columns (a number is not an empty row)."""
    import datasets

    for key in PAIR:
        feature = ds.features.get(key)
        if feature is None:
            continue  # named as a missing field by the caller
        if not isinstance(feature, datasets.Value):
            kind = type(feature).__name__
        elif feature.dtype in ("string", "large_string", "null"):
            continue
        else:
            kind = feature.dtype
        raise DataError(
            f"{origin}: column {key!r} holds {kind} values, not text; every row needs 'prompt' and "
            "'response' strings (save those columns as strings)"
        )


LINE_END = re.compile(r"\r\n?|\n")  # not str.splitlines: U+2028, U+0085 ... are text inside a JSON string
SURROGATE = re.compile("[\ud800-\udfff]")


def json_lines(path: str | Path, fix: str) -> list[tuple[int, object]]:
    """(line number, value) of every non-blank line of a JSON Lines file; a file that is missing,
    not UTF-8 text (a BOM is fine), or has a bad line is a DataError naming it, with `fix`."""
    path = Path(path)
    if not path.is_file():
        what = "is not a regular file (a folder, device or FIFO)" if path.exists() else "not found"
        raise DataError(f"{path} {what}; {fix}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (byte {err.start}); {fix}") from None
    out = []
    for n, line in enumerate(LINE_END.split(text), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
            # "\ud800" is valid JSON but no text: no file, tokenizer or table can hold it
            bad = SURROGATE.search(json.dumps(value, ensure_ascii=False)) if "\\u" in line else None
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {n}: not valid JSON ({err.msg}); {fix}") from None
        except RecursionError:
            raise DataError(f"{path}, line {n}: nested too deeply; {fix}") from None
        except ValueError as err:  # an integer of more than 4300 digits
            raise DataError(f"{path}, line {n}: {str(err)[:200]}; {fix}") from None
        if bad:
            raise DataError(
                f"{path}, line {n}: the escape \\u{ord(bad.group()):04x} is half of a UTF-16 surrogate "
                f"pair, not a character (no text can hold it); write the character itself or drop it; {fix}"
            )
        out.append((n, value))
    return out


def read_pairs_file(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of a prompt/response JSON Lines file: string fields only (other fields
    are dropped, so a stray number or list never breaks the table); a bad line is named by its number."""
    fix = "each line must be one JSON object with 'prompt' and 'response'"
    rows = []
    for n, row in json_lines(path, fix):
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {n}: a JSON object with 'prompt' and 'response' expected")
        for key in PAIR:
            if key in row and row[key] is not None and not isinstance(row[key], str):
                raise DataError(
                    f"{path}, line {n}: {key!r} must be a string, got {str(row[key])[:60]} (not text)"
                )
        rows.append((n, {k: v for k, v in row.items() if isinstance(v, str)}))
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
        reader = None
        try:
            with path.open(newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f, strict=True)  # strict: a stray quote is an error, not a merge
                rows = [(reader.line_num, row) for row in reader]  # the line a record ends on
        except (UnicodeDecodeError, csv.Error) as err:
            where = f" after line {reader.line_num}" if reader and reader.line_num else ""
            raise DataError(f"{path} cannot be read as CSV{where} ({err}); {fix}") from None
    else:
        rows = json_lines(path, fix)
    out = []
    for n, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {n}: a JSON object expected; {fix}")
        if any(str(v).strip() for v in row.get(None) or ()):  # DictReader's key for fields past the header
            raise DataError(
                f"{path}, line {n}: more fields than the header has columns (quote a comma); {fix}"
            )
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
