"""lm-evaluation-harness on a model folder or on a model held in memory (`eval.lm_eval.tasks`)."""

from __future__ import annotations

import functools
from pathlib import Path

from core.errors import ConfigError
from eval.settings import LmEvalSettings

# Tasks shipped with alignmerge (e.g. alignmerge_domain_mcq: the default world's held-out domain
# questions as multiple choice), found by lm-eval beside its own and the user's include_path.
TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"


@functools.cache
def task_manager(tasks: tuple[str, ...], include_path: tuple[str, ...]):
    from lm_eval.tasks import TaskManager

    return TaskManager(
        include_path=[str(TASKS), *include_path],
        # lm-eval's own thousands of task files take minutes to index on a small CPU: only
        # when a task is not one of ours
        include_defaults=not set(tasks) <= {p.stem for p in TASKS.glob("*.yaml")},
    )


def check_tasks(spec: LmEvalSettings) -> None:
    """Every task is one lm-eval knows (a task, group or tag name) or a task YAML file: before any
    model loads, not after the whole evaluation."""
    known = task_manager(tuple(spec.tasks), tuple(spec.include_path)).all_tasks
    unknown = [
        t
        for t in spec.tasks
        if t not in known and not (Path(t).suffix in (".yaml", ".yml") and Path(t).expanduser().is_file())
    ]
    if unknown:
        raise ConfigError(
            f"eval.lm_eval.tasks: {', '.join(map(repr, unknown))} is neither an lm-eval task, group or tag "
            "nor a task YAML file; `lm-eval ls tasks` lists the names (a folder of your own task YAMLs: "
            "--set eval.lm_eval.include_path=[DIR])"
        )


def run_lm_eval(spec: LmEvalSettings, model, tokenizer, device: str, folder: Path | None, dtype: str) -> dict:
    """lm-evaluation-harness on the model folder (`hf` model), or on the in-memory model."""
    import lm_eval

    if folder is not None:
        model, model_args = "hf", {"pretrained": str(folder), "dtype": dtype}
    else:
        from lm_eval.models.huggingface import HFLM

        model, model_args = (
            HFLM(pretrained=model, tokenizer=tokenizer, batch_size=spec.batch_size),
            None,
        )
    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=list(spec.tasks),
        num_fewshot=spec.num_fewshot,
        limit=spec.limit,
        batch_size=spec.batch_size,
        device=device,
        apply_chat_template=spec.apply_chat_template,
        task_manager=task_manager(tuple(spec.tasks), tuple(spec.include_path)),
    )
    return {
        task: {k: v for k, v in scores.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for task, scores in out["results"].items()
    }
