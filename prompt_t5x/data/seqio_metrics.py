"""A SeqIO task's (or mixture's) metrics on predicted strings, and its label words.

``compute_metrics`` runs the task's postprocessor on targets and predictions and then its metric
functions; for a mixture, each sub-task's on its own examples (their ``task`` field, set by
``seqio_bridge.eval_examples``) as ``<task>/<metric>``, and each metric's unweighted mean over the
tasks present as ``<metric>``, so a run's ``metric='accuracy'`` picks its best step on a mixture
too. Imports SeqIO (through ``seqio_bridge``); the core never imports it.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from prompt_t5x.data.seqio_bridge import DataError, get_task_or_mixture, is_mixture


def _task_metrics(task, examples: Sequence[Mapping[str, Any]], predictions: Sequence[str]
                  ) -> Dict[str, float]:
    """One task's postprocessor and metric functions on its own examples."""
    post = task.postprocess_fn or (lambda text, example=None, is_target=False: text)
    targets = [post(ex["targets_pretokenized"], example=ex, is_target=True) for ex in examples]
    preds = [post(p, example=ex, is_target=False) for p, ex in zip(predictions, examples)]
    results: Dict[str, float] = {}
    for fn in task.metric_fns:
        results.update(fn(targets, preds))
    return results


def compute_metrics(name: str, examples: Sequence[Mapping[str, Any]],
                    predictions: Sequence[str]) -> Dict[str, float]:
    """Postprocess targets and predicted strings and run the task's metric functions. For a
    mixture: each sub-task's on the examples of that task (their ``task`` field), as
    ``<task>/<metric>``, and each metric's unweighted mean over the tasks present as
    ``<metric>`` (so a run's ``metric='accuracy'`` picks its best step on a mixture too)."""
    provider = get_task_or_mixture(name)
    if len(examples) != len(predictions):
        raise DataError(f"task {name!r}: {len(predictions)} predictions for {len(examples)} "
                        "examples.")
    if not is_mixture(provider):
        return _task_metrics(provider, examples, predictions)
    tasks = {task.name: task for task in provider.tasks}
    rows: Dict[str, List[int]] = {}
    for i, ex in enumerate(examples):
        task = ex.get("task")
        task = task.decode() if isinstance(task, bytes) else task
        if task not in tasks:
            raise DataError(f"mixture {name!r}: example {i} has task {task!r}, not one of "
                            f"{sorted(tasks)} (score examples of eval_examples).")
        rows.setdefault(task, []).append(i)
    per_task: Dict[str, float] = {}
    by_metric: Dict[str, List[float]] = {}
    for task in sorted(rows):
        own = _task_metrics(tasks[task], [examples[i] for i in rows[task]],
                            [predictions[i] for i in rows[task]])
        for metric, value in own.items():
            per_task[f"{task}/{metric}"] = value
            by_metric.setdefault(metric, []).append(float(value))
    results: Dict[str, float] = {k: float(np.mean(v)) for k, v in by_metric.items()}
    results.update(per_task)
    return results


def label_names(name: str) -> Optional[Sequence[str]]:
    """The label words of a classification task (None for free-text or regression tasks)."""
    from tasks import families
    get_task_or_mixture(name)
    info = families.TASK_INFO.get(name)
    return None if info is None else info.label_names
