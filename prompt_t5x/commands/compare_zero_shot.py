"""Zero-shot transfer in ``prompt-t5x compare``: a method trained on a mixture, scored on a task
held out of it.

``compare.zero_shot = {'spt_held_out': 'synthetic_contains'}`` evaluates the run of the method
labelled ``spt_held_out`` (trained, e.g., on ``synthetic_skills_but_contains``) on the held-out
task's validation split. A method that says how it transfers (``zero_shot_variants(trainable)
-> {name: (method, trainable)}``, e.g. semi-parametric prompt tuning: the prompt retrieved from
its memory, against a random prompt and the mean of its bank) is scored once per variant, so the
figure has its baselines beside it; any other method is scored as trained.

The rows go to ``zero_shot.csv`` / ``zero_shot.md`` in the comparison's directory.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Mapping

from prompt_t5x.base import storage
from prompt_t5x.base.errors import UsageError
from prompt_t5x.commands import scaling

CSV = "zero_shot.csv"
FIELDS = ("method", "trained_on", "held_out_task", "variant", "metric", "value", "examples")


def variants(method, trainable) -> Dict[str, Any]:
    """{name: (method, trainable)}: the method's own zero-shot variants, else itself."""
    own = getattr(method, "zero_shot_variants", None)
    return dict(own(trainable)) if own is not None else {"trained": (method, trainable)}


def evaluate_held_out(label: str, run, task: str, metric: str, max_examples=None
                      ) -> List[Dict[str, Any]]:
    """Rows of one held-out evaluation: ``run`` is the method's ``run_train.RunConfig``."""
    from prompt_t5x.inference import evaluation
    cfg = evaluation.EvalConfig(task=task, output_dir=run.model_dir, prompt=run.model_dir,
                                inputs_length=run.inputs_length,
                                targets_length=run.targets_length, batch_size=run.batch_size,
                                max_examples=max_examples, vocabulary=run.vocabulary,
                                data_dir=run.data_dir, task_modules=tuple(run.task_modules))
    source = evaluation.setup_task(cfg)
    loaded = evaluation.load(cfg)
    rows = []
    for name, (method, trainable) in variants(loaded.method, loaded.trainable).items():
        variant = dataclasses.replace(loaded, method=method, trainable=trainable, prompts=None)
        preds = evaluation.predict(cfg, variant, source)
        values = source.metrics(preds.examples, preds.combined)
        if metric not in values:
            raise UsageError(f"compare.zero_shot[{label!r}]: task {task!r} reports "
                             f"{sorted(values)}, not the comparison's metric {metric!r}")
        rows.append({"method": label, "trained_on": run.task, "held_out_task": task,
                     "variant": name, "metric": metric, "value": float(values[metric]),
                     "examples": len(preds.examples)})
    return rows


def run_zero_shot(output_dir: str, zero_shot: Mapping[str, str], plans, log=print
                  ) -> List[Dict[str, Any]]:
    """Every ``compare.zero_shot`` entry (label -> held-out task), after the methods trained."""
    by_label = {p.label: p for p in plans}
    rows: List[Dict[str, Any]] = []
    for label, task in zero_shot.items():
        plan = by_label[label]
        log(f"[compare] {label}: zero-shot on {task}")
        rows += evaluate_held_out(label, plan.run, task, plan.run.loop.metric)
    if rows:
        scaling.write_csv(rows, os.path.join(output_dir, CSV), FIELDS)
        storage.write_bytes_atomic(os.path.join(output_dir, "zero_shot.md"),
                                   (markdown_table(rows) + "\n").encode("utf-8"))
    return rows


def markdown_table(rows) -> str:
    lines = ["| method | trained on | held-out task | prompt | metric | value |",
             "|---|---|---|---|---|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['trained_on']} | {r['held_out_task']} | "
                     f"{r['variant']} | {r['metric']} | {float(r['value']):.2f} |")
    return "\n".join(lines)
