"""What a search holds in memory, built once and used by every trial: the base, the task
vectors, the merger, the search space and the scorer. Inputs are checked first, before any model
loads (paths, formats, data)."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from core.errors import DataError, ModelLoadError
from core.files import fingerprint
from core.models import (
    DTYPES,
    model_format,
    resolve_device,
    resolve_dtype,
    resolve_model_path,
    store_dtype_name,
)
from eval.behaviour import Generation
from eval.data import load_pairs
from eval.judge import REFUSAL_OPENINGS
from eval.loss import Scorer, first_response_tokens
from optimize.config import Config, check_runtime, check_tracking
from optimize.memory import check_memory
from optimize.merge import InMemoryMerger
from optimize.methods import METHODS
from optimize.objective import check_minibatches
from optimize.sources import Base, load_base, load_task_vectors
from optimize.space import SearchSpace

SCORED = {"both": ("alignment", "domain"), "domain": ("domain",), "alignment": ("alignment",)}


VERIFIED_SETS = ("alignment", "helpfulness")  # the verified pick's harmful and benign prompts


def scored_sets(search) -> tuple[str, ...]:
    """The sets a search scores: `helpfulness` too when beta > 0 or its refusal mass is a constraint."""
    return SCORED[search.score] + (("helpfulness",) if search.beta or search.constrain.enabled else ())


def check_inputs(cfg: Config, memory: bool = True) -> dict[str, list[dict]]:
    """Everything that can be checked without loading a model: paths, formats, data, and (unless
    the models are already loaded: `memory` false) that they fit. Returns the raw rows of every
    set the search uses (alignment, domain, helpfulness)."""
    check_setup(cfg, memory)
    rows = load_data(cfg)
    check_minibatches(cfg.search, rows)
    if cfg.output.test_splits:  # read again at the end; a bad test split fails now, not after the trials
        judged = {k: judged_rows(cfg, k) for k in VERIFIED_SETS} if cfg.search.verify.top_k else {}
        warn_if_searched(rows | judged, load_test_data(cfg))
    return rows


def warn_if_searched(rows: dict[str, list[dict]], test: dict[str, list[dict]]) -> None:
    """Test prompts that are also search prompts make the report's held-out figures a search score."""
    for name, held_out in test.items():
        searched = {r["prompt"] for r in rows.get(name, ())}
        seen = sum(r["prompt"] in searched for r in held_out)
        if seen:
            print(
                f"[alignmerge] warning: {seen} of the {len(held_out)} prompts of the test split "
                f"{TEST_SPLITS[name]!r} are also {name} search prompts: the report's test figures of "
                "them are not held out. Give test splits disjoint from the search data (data.test_dir)",
                file=sys.stderr,
            )


def check_setup(cfg: Config, memory: bool = True) -> None:
    """`check_inputs` without the data: what the demo and the ablation check before synth writes
    the data (runtime, tracking, the models and that they fit)."""
    check_runtime(cfg)
    check_tracking(cfg)
    check_models(cfg)
    if memory:
        check_memory(cfg)


def check_models(cfg: Config) -> None:
    """The base and every source exist and are readable models (headers only, no weights)."""
    # real path -> label: the same model twice through a link, or the base as a source (allowed as
    # the alignment source: the paper's setting, where the aligned model is the base, docs/method.md)
    seen = {}
    roles = {f"source {s.name!r}": s.role for s in cfg.sources}
    for label, path in [("base", cfg.base)] + [(f"source {s.name!r}", s.path) for s in cfg.sources]:
        try:
            resolved = resolve_model_path(path)
            fmt = model_format(resolved, cfg.runtime.allow_pickle, cfg.runtime.trust_remote_code)
        except ModelLoadError as err:
            raise ModelLoadError(f"{label}: {err}") from None
        if label == "base" and fmt == "lora":
            raise ModelLoadError(f"base {path} is a LoRA adapter; the base must be a full model")
        same = seen.setdefault(os.path.realpath(resolved), label)
        if same != label and not (same == "base" and roles[label] == "alignment"):
            why = "its task vector is zero" if same == "base" else "it would be merged twice"
            raise ModelLoadError(
                f"{label}: {path} is the same model as the {same} ({os.path.realpath(resolved)}): {why}; "
                "list each fine-tuned model once as a source, and the model they were tuned from as base "
                "(the base may be a source only as the alignment one)"
            )


def model_fingerprints(cfg: Config) -> dict[str, str]:
    """A content fingerprint of the base and of every source (`core.files.fingerprint`)."""
    paths = {"base": cfg.base} | {s.name: s.path for s in cfg.sources}
    return {k: fingerprint(resolve_model_path(p)) for k, p in paths.items()}


@functools.cache  # once: every search of a demo, sweep or ablation loads the data again
def warn_fewer_rows(name: str, asked: int, found: int) -> None:
    print(
        f"[alignmerge] warning: data.n_{name} is {asked} but the {name} set has {found} rows: the "
        f"search scores those {found}",
        file=sys.stderr,
    )


def load_set(cfg: Config, name: str, n: int | None) -> list[dict]:
    """The first `n` rows (None: all) of the search set `name`: data.<name>'s file, else data.dir's
    split data.<name>_split."""
    path = getattr(cfg.data, name)
    return load_pairs(path or cfg.data_dir, None if path else getattr(cfg.data, f"{name}_split"), n)


def judged_rows(cfg: Config, name: str) -> list[dict]:
    """The rows of the search set `name` the verified pick judges (docs/method.md §4.1): the scored
    ones (data.n_*) and more, up to search.verify.n_prompts."""
    scored, n = getattr(cfg.data, f"n_{name}"), cfg.search.verify.n_prompts
    return load_set(cfg, name, scored if scored is None or n is None else max(scored, n))


def load_data(cfg: Config) -> dict[str, list[dict]]:
    """The search sets: alignment and domain always (the reports score both), helpfulness when
    the objective or the verified pick uses it."""

    def load(name):
        n = getattr(cfg.data, f"n_{name}")
        rows = load_set(cfg, name, n)
        if n and len(rows) < n:
            warn_fewer_rows(name, n, len(rows))
        return rows

    rows = {name: load(name) for name in ("alignment", "domain")}
    s = cfg.search
    if s.beta or s.verify.top_k or s.constrain.enabled:
        try:
            rows["helpfulness"] = load("helpfulness")
        except DataError as err:
            raise DataError(
                f"search.beta is {s.beta}, search.verify.top_k {s.verify.top_k} and "
                f"search.constrain.enabled {s.constrain.enabled}: the search needs benign prompts with "
                f"helpful answers, but {err}. Write them with synth.generate (synth.n_benign > 0), name "
                "a JSONL file in data.helpfulness, or set search.beta: 0, search.verify.top_k: 0 and "
                "search.constrain.enabled: false"
            ) from None
    return rows


TEST_SPLITS = {"alignment": "alignment_test", "domain": "domain_test", "helpfulness": "benign"}


def load_test_data(cfg: Config) -> dict[str, list[dict]]:
    """The held-out test splits, when the data folder has them (they are never searched on); a
    data.test_dir that was named must exist."""
    if cfg.data.test_dir and not cfg.test_dir.exists():
        raise DataError(
            f"data.test_dir {cfg.test_dir} does not exist; name the folder of the held-out splits "
            "(alignment_test, domain_test, benign), or remove data.test_dir to use data.dir's"
        )
    if not cfg.test_dir.exists():
        return {}
    sizes = None
    if (cfg.test_dir / "dataset_dict.json").is_file():
        import datasets

        with contextlib.suppress(Exception):  # unreadable: load_pairs below says what is wrong
            sizes = {k: len(v) for k, v in datasets.load_from_disk(str(cfg.test_dir)).items()}
    out = {}
    for name, split in TEST_SPLITS.items():
        if name == "helpfulness" and not cfg.search.beta:
            continue
        if sizes is not None and not sizes.get(split):  # absent, or empty (synth's test_fraction: 0)
            continue
        out[name] = load_pairs(cfg.test_dir, split)  # anything else there must load
    return out


def make_scorer(cfg: Config, tokenizer, rows: dict[str, list[dict]], device: str) -> Scorer:
    """A scorer of `rows` with the config's length and batch settings, which also measures the
    refusal-opening mass (`eval.loss`)."""
    refusal = first_response_tokens(tokenizer, REFUSAL_OPENINGS)
    return Scorer(tokenizer, rows, cfg.data.max_length, cfg.data.batch_tokens, device, refusal)


def warn_unscored(scorer: Scorer, rows: dict[str, list[dict]], max_length: int) -> None:
    """Rows whose prompt leaves no answer token within max_length are left out of the scores."""
    for name, n in scorer.skipped.items():
        if n:
            print(
                f"[alignmerge] warning: {n} of the {len(rows[name])} rows of the {name} search set are not "
                f"scored: their prompt leaves no answer token within data.max_length={max_length} "
                "(raise it, or shorten those prompts)",
                file=sys.stderr,
            )


@dataclass
class Context:
    """What a search needs in memory: built once, used by every trial."""

    cfg: Config
    base: Base
    merger: InMemoryMerger
    space: SearchSpace
    scorer: Scorer  # on the sets the objective uses
    rows: dict[str, list[dict]]
    generation: Generation  # greedy answers (the verified pick, comparisons), started on first use
    # search.constrain's bounds on the refusal masses of a trial (`optimize.objective.refusal_bounds`)
    refusal_bounds: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def scorer_for(self, rows: dict[str, list[dict]]) -> Scorer:
        """Another scorer on the same tokenizer, device and settings (test splits, subsets)."""
        return make_scorer(self.cfg, self.base.tokenizer, rows, self.scorer.device)


def prepare(cfg: Config, rows: dict[str, list[dict]] | None = None) -> Context:
    rows = rows if rows is not None else check_inputs(cfg)
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    device = resolve_device(cfg.runtime.device)
    generation = Generation(cfg.runtime.generation, cfg.base, device, cfg.runtime.trust_remote_code)
    dtype = resolve_dtype(cfg.runtime.dtype, device)
    store = DTYPES[store_dtype_name(cfg.runtime.store_dtype, dtype, resolve_model_path(cfg.base))]
    print(f"[alignmerge] {check_memory(cfg).describe()}", file=sys.stderr)  # what is about to load
    t0 = time.perf_counter()
    base = load_base(cfg.base, dtype, device, cfg.runtime.allow_pickle, cfg.runtime.trust_remote_code, store)
    # the objective's sets among `rows` (eval.run builds a context on test rows for its analysis),
    # tokenized before the sources load: a template or max_length that masks every answer fails now
    scored = {k: rows[k] for k in scored_sets(cfg.search) if k in rows}
    scorer = make_scorer(cfg, base.tokenizer, scored, device)
    warn_unscored(scorer, scored, cfg.data.max_length)
    method_cls = METHODS[cfg.merge.method]
    # The space decides the density grid, which the method caches masks for.
    space = SearchSpace(cfg, base.groups, method_cls.searched)
    t1 = time.perf_counter()
    tvs = load_task_vectors(cfg.sources, base, cfg.runtime.allow_pickle, cfg.runtime.trust_remote_code)
    t2 = time.perf_counter()
    method = method_cls(
        normalize=cfg.normalize,
        lambda_=cfg.merge.lambda_,
        seed=cfg.merge.seed,
        density_levels=space.density_levels,
        roles=tuple(src.role for src in cfg.sources),
    )
    return Context(
        cfg,
        base,
        InMemoryMerger(base, tvs, method),
        space,
        scorer,
        rows,
        generation,
        {"load_base_s": t1 - t0, "task_vectors_s": t2 - t1},
    )
