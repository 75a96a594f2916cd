"""Resumable generation: every finished request is appended to a JSONL cache at once, and a
rerun generates only what is missing (`run_cached`)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

from tqdm.auto import tqdm

from core.errors import ModelLoadError
from core.files import fingerprint
from core.models import dtype_name, resolve_model_path
from synth.engine import Conversation, EngineSettings, EngineSlot, ModelRef, Sampling


@dataclass
class Request:
    """One prompt to a model; `key` identifies it in the cache (see `request_key`)."""

    conversation: Conversation
    sampling: Sampling
    key: str = ""
    meta: dict = field(default_factory=dict)


@cache
def model_fingerprint(path: str | None) -> str | None:
    """Content of the model at `path` (a retrain at the same path changes it); once per process."""
    try:
        return None if path is None else fingerprint(resolve_model_path(path))
    except ModelLoadError:  # not a local model (yet): its key is its path alone
        return None


def engine_ident(settings: EngineSettings) -> dict:
    """The engine settings that change the outputs: the dtype (`auto` resolved on this machine) and
    max_model_len (vLLM cuts prompt + output at it). The others change speed, or rounding only."""
    return {"dtype": dtype_name(settings.dtype), "max_model_len": settings.max_model_len}


def request_key(ref: ModelRef, req: Request, engine: dict) -> str:
    """`engine`: `engine_ident` of the settings generating it."""
    model = [ref.path, ref.base, model_fingerprint(ref.path), model_fingerprint(ref.base)]
    ident = {"model": model, "conv": req.conversation, "sampling": asdict(req.sampling), "engine": engine}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def parse_row(line: bytes) -> tuple[str, list[str]]:
    """(key, outputs) of a cache line; ValueError when it is not `{"key", "model", "outputs"}`."""
    row = json.loads(line)  # JSONDecodeError, UnicodeDecodeError: both ValueErrors
    if not (isinstance(row, dict) and isinstance(row.get("key"), str) and isinstance(row.get("model"), str)):
        raise ValueError("not a cache row")
    outputs = row.get("outputs")
    if not (isinstance(outputs, list) and all(isinstance(o, str) for o in outputs)):
        raise ValueError("outputs: not a list of texts")
    return row["key"], outputs


class GenerationCache:
    """Append-only JSONL: one line per finished request, `{"key", "model", "outputs"}`.
    A line cut short by a crash, or of another shape, is ignored (and regenerated)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.data: dict[str, list[str]] = {}
        self.cut_short = False  # the last line has no newline: the next write starts a new one
        if self.path.exists():
            raw = self.path.read_bytes()  # per line: a line of garbage bytes is one bad line
            self.cut_short = bool(raw) and not raw.endswith(b"\n")
            for line in raw.splitlines():
                try:
                    key, outputs = parse_row(line)
                except ValueError:
                    continue
                self.data[key] = outputs

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str) -> list[str]:
        return self.data[key]

    def add_many(self, rows: list[tuple[str, str, list[str]]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            if self.cut_short:
                f.write("\n")
                self.cut_short = False
            for key, model, outputs in rows:
                f.write(json.dumps({"key": key, "model": model, "outputs": outputs}) + "\n")
                self.data[key] = outputs
            f.flush()
            os.fsync(f.fileno())


def run_cached(
    slot: EngineSlot,
    ref: ModelRef,
    requests: list[Request],
    cache: GenerationCache,
    desc: str,
    keep: Callable[[str], bool] | None = None,
) -> list[list[str]]:
    """Outputs for every request, generating only those missing from `cache`, chunk by chunk.
    The progress bar counts prompts done and, when `keep` is given, outputs kept and dropped."""
    engine = engine_ident(slot.settings)
    for r in requests:
        r.key = r.key or request_key(ref, r, engine)
    done = {r.key for r in requests if len(cache.data.get(r.key, ())) == r.sampling.n}
    todo = [r for r in requests if r.key not in done]
    kept = dropped = 0
    for r in requests:
        if r.key in done and keep is not None:
            k = sum(map(keep, cache.get(r.key)))
            kept, dropped = kept + k, dropped + len(cache.get(r.key)) - k
    bar = tqdm(total=len(requests), initial=len(requests) - len(todo), desc=desc, unit="prompt")
    if keep is not None:
        bar.set_postfix(kept=kept, dropped=dropped)
    chunk = max(1, slot.settings.chunk_size)
    for start in range(0, len(todo), chunk):
        part = todo[start : start + chunk]
        engine = slot.get(ref)
        outs = engine.chat([r.conversation for r in part], [r.sampling for r in part])
        cache.add_many([(r.key, ref.label, o) for r, o in zip(part, outs)])
        bar.update(len(part))
        if keep is not None:
            for o in outs:
                k = sum(map(keep, o))
                kept, dropped = kept + k, dropped + len(o) - k
            bar.set_postfix(kept=kept, dropped=dropped)
    bar.close()
    return [cache.get(r.key) for r in requests]
