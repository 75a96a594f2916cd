"""The ablation's own config (`configs/ablations.yaml`): which rows, their grids and budgets,
and the search config they all run on."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from core.config import Name, Seed, Strict, read_yaml_mapping, validate
from core.errors import ConfigError
from eval.data import load_pairs
from optimize.config import Config, load_config, validate_config

ROWS = (
    "references",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "slerp",
    "mergealign",
    "lm_cocktail",
    "searches",
    "samplers",
)
COMPARED = ("tpe", "cmaes", "gp", "random", "nsga2", "gradient")
Share = Annotated[float, Field(gt=0, le=1)]
Unit = Annotated[float, Field(ge=0, le=1)]
Weight = Annotated[float, Field(ge=-100, le=100)]  # a task vector's weight (1e300 overflowed the merge)


class Grids(Strict):
    weights: list[Weight] = Field([0.25, 0.5, 1.0], min_length=1)  # TIES / DARE-TIES, N = 2
    densities: list[Share] = Field([0.25, 0.5, 1.0], min_length=1)
    normalize: bool = False  # TIES / DARE-TIES; the paper's genome used false
    slerp_t: list[Unit] = Field([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], min_length=1)
    mergealign_lambda: list[Unit] = Field([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], min_length=1)


class Searches(Strict):
    n_trials: int = Field(16, ge=1)  # each of the two searches


class Samplers(Strict):
    # gradient runs once: the descent from the initial point does not depend on the seed
    names: list[Literal[COMPARED]] = Field(["tpe", "cmaes", "random", "gp", "gradient"], min_length=1)
    seeds: list[Seed] = Field([0, 1, 2], min_length=3)
    n_trials: int = Field(16, ge=2)  # per study
    # Scored on the first N search examples of each set (null: as many as the searches).
    n_alignment: int | None = Field(12, ge=1)
    n_domain: int | None = Field(12, ge=1)


class Evaluation(Strict):
    max_new_tokens: int = Field(32, ge=1)
    limit: int | None = Field(None, ge=1)  # first N rows of each test split and of benign
    suites: list[
        str
    ] = []  # external prompt suites measured too (eval/suites.py), e.g. [weighted-safety-refusal]


class SearchData(Strict):
    # Search-split examples for every row (null: the search config's data.n_alignment / n_domain);
    # either set, the verified pick judges the scored rows alone (search.verify.n_prompts: null).
    n_alignment: int | None = Field(None, ge=1)
    n_domain: int | None = Field(None, ge=1)


class Ablation(Strict):
    name: Name = "ablation"
    out: str | None = None  # run folder; null -> runs/<name>
    search_config: str  # base, sources, data, method, search space; relative to this file
    rows: list[Literal[ROWS]] = Field(list(ROWS), min_length=1)
    uniform_weight: Weight = 1.0  # task arithmetic row
    # the paper's script: 1.0 (LM-Cocktail's: 5.0); softmax(-loss / T) is NaN for T near 0
    cocktail_temperature: float = Field(1.0, ge=0.01, le=100)
    grids: Grids = Grids()
    searches: Searches = Searches()
    samplers: Samplers = Samplers()
    evaluation: Evaluation = Evaluation()
    data: SearchData = SearchData()
    quick: dict[str, Any] | None = None  # --quick: these keys replace the ones above


def _overlay(raw: dict, over: dict) -> dict:
    out = dict(raw)
    for k, v in over.items():
        out[k] = _overlay(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_ablation(path: str | Path, quick: bool = False, out: str | None = None) -> tuple[Ablation, Config]:
    """The validated ablation config and the search config it runs on; no model is loaded."""
    path = Path(path)
    raw = read_yaml_mapping(path)
    abl = validate(Ablation, raw, str(path))
    fast = validate(Ablation, _overlay(raw, abl.quick or {}), f"{path} with its quick section")
    abl = fast if quick else abl
    abl = abl.model_copy(update={"out": out}) if out else abl
    return abl, search_config(abl, path.parent)


def search_config_path(abl: Ablation, folder: Path) -> Path:
    path = Path(abl.search_config)
    return path if path.is_absolute() else folder / path


def search_config(abl: Ablation, folder: Path) -> Config:
    """The search config moved into the ablation's run folder, with the safety-aware objective."""
    path = search_config_path(abl, folder)
    cfg = load_config(path)
    raw = cfg.model_dump(by_alias=True)
    raw.update(name=abl.name, out=abl.out or f"runs/{abl.name}", study_name=None)
    raw["search"].update(objective="weighted", score="both")
    caps = {k: v for k, v in abl.data.model_dump().items() if v is not None}
    raw["data"].update(caps)
    if caps:  # they bound every row's search examples, the verified pick's prompts too
        raw["search"]["verify"]["n_prompts"] = None
    raw["output"].update(save_model=False, mergekit=False, references=False, test_splits=False)
    cfg = validate_config(raw, f"{path} (the ablation's search config)")
    if "slerp" in abl.rows and len(cfg.sources) != 2:
        raise ConfigError(f"rows: slerp needs exactly 2 sources, {path} has {len(cfg.sources)}")
    if "mergealign" in abl.rows and sorted(s.role for s in cfg.sources) != ["alignment", "domain"]:
        raise ConfigError(f"rows: mergealign needs one alignment and one domain source ({path})")
    return cfg


def load_test(cfg: Config, limit: int | None) -> dict[str, list[dict]]:
    folder = cfg.test_dir
    return {
        "alignment": load_pairs(folder, "alignment_test", limit),
        "domain": load_pairs(folder, "domain_test", limit),
        "benign": load_pairs(folder, "benign", limit),
    }
