"""lm-evaluation-harness on a model folder or on a model held in memory (`eval.lm_eval.tasks`)."""

from __future__ import annotations

from pathlib import Path

from eval.settings import LmEvalSettings

# Tasks shipped with alignmerge (e.g. alignmerge_domain_mcq: the default world's held-out domain
# questions as multiple choice), found by lm-eval beside its own and the user's include_path.
TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"


def run_lm_eval(spec: LmEvalSettings, model, tokenizer, device: str, folder: Path | None, dtype: str) -> dict:
    """lm-evaluation-harness on the model folder (`hf` model), or on the in-memory model."""
    import lm_eval
    from lm_eval.tasks import TaskManager

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
        task_manager=TaskManager(
            include_path=[str(TASKS), *spec.include_path],
            # lm-eval's own thousands of task files take minutes to index on a small CPU: only
            # when a task is not one of ours
            include_defaults=not set(spec.tasks) <= {p.stem for p in TASKS.glob("*.yaml")},
        ),
    )
    return {
        task: {k: v for k, v in scores.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for task, scores in out["results"].items()
    }
