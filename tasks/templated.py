"""A registered GLUE/SuperGLUE task with its inputs rendered by a P-tuning template.

``templated_task(task, template, inputs_length)`` returns an unregistered copy of ``task`` whose
``inputs`` are the template (``prompt_t5x.methods.templates``) over the task's *raw* text fields
(RTE: ``premise``, ``hypothesis``; SST-2: ``sentence``) instead of T5's ``"rte premise: ..."``
string. Everything else stays the task's own: the source, the targets and metric fields (its
text preprocessors still run, per example), postprocessing, metrics, the task-index token and
EOS. Steps of the copy:

1. per example, the task's text preprocessors (which may drop, keep or multiply examples: WSC
   filters, ReCoRD expands), each output carrying the raw fields the template names; ``inputs``
   becomes the template shown as text (``[P]`` per pseudo token: ``inputs_pretokenized``);
2. SeqIO's ``tokenize`` (targets; the display text);
3. the template rendered to ids: anchors and pseudo tokens (the placeholder id) whole, the
   fields tokenised and cut longest first so that the task's later tokens (EOS, a task-index
   token) still fit ``inputs_length``; pure Python (``tf.numpy_function``), the same code that
   renders the generated tasks;
4. the task's own token preprocessors after ``tokenize``.
"""

from __future__ import annotations

from typing import Any, List, Sequence

import numpy as np
import seqio
import tensorflow as tf

from prompt_t5x.methods import templates
from tasks import families

FIELD_PREFIX = "p_tuning_field_"


def text_fields(task_name: str) -> List[str]:
    """The raw text fields of a registered GLUE/SuperGLUE task (what a template may name)."""
    info = families.TASK_INFO.get(task_name)
    if info is None or info.family is None:
        raise templates.TemplateError(
            f"task {task_name!r} has no raw text fields for a P-tuning template (GLUE and "
            "SuperGLUE tasks and the generated synthetic_* tasks have)")
    return [k for k, kind in info.family.schema.items() if kind == "text"]


def _split_at_tokenize(steps: Sequence[Any]):
    for i, step in enumerate(steps):
        if getattr(step, "func", step) is seqio.preprocessors.tokenize:
            return list(steps[:i]), list(steps[i + 1:])
    raise templates.TemplateError("task has no tokenize step to place a template before")


def templated_task(task, template: templates.InputTemplate, inputs_length: int) -> seqio.Task:
    """See the module docstring. TemplateError (a UsageError) for a mixture, a task without
    raw text fields, an unknown field, a tokenizer id as placeholder, or a template that does
    not fit ``inputs_length``."""
    if not isinstance(task, seqio.Task):
        raise templates.TemplateError(
            f"{task.name!r} is a mixture: P-tuning templates are per task; train on one task")
    vocabulary = task.output_features["inputs"].vocabulary
    render = template.renderer(task.name, text_fields(task.name), vocabulary.encode,
                               vocabulary.vocab_size, None)
    info = families.TASK_INFO[task.name]
    # Room for EOS and, in the task-index variant, the task token prepended after tokenize.
    budget = inputs_length - 1 - (1 if info.task_index is not None else 0)
    render.check_fits(budget)
    text_steps, token_steps = _split_at_tokenize(task.preprocessors)
    names = render.template.fields

    def with_fields(dataset: tf.data.Dataset) -> tf.data.Dataset:
        def per_example(raw):
            formatted = tf.data.Dataset.from_tensors(raw)
            for step in text_steps:
                formatted = step(formatted)
            keep = {FIELD_PREFIX + n: raw[n] for n in names}
            shown = []
            for kind, value in render.template.pieces:
                shown += (["[P]"] * int(value) if kind == "pseudo" else
                          [raw[value] if kind == "field" else str(value)])
            display = tf.strings.join(shown, separator=" ")
            return formatted.map(lambda x: {**x, **keep, "inputs": display})
        return dataset.flat_map(per_example)

    def to_ids(*values) -> np.ndarray:
        fields = {n: v.decode("utf-8") for n, v in zip(names, values)}
        return np.asarray(render(fields, budget), np.int32)

    def rendered(dataset: tf.data.Dataset) -> tf.data.Dataset:
        def convert(x):
            ids = tf.numpy_function(to_ids, [x[FIELD_PREFIX + n] for n in names], tf.int32,
                                    stateful=False)
            ids.set_shape([None])
            out = {k: v for k, v in x.items() if not k.startswith(FIELD_PREFIX)}
            out["inputs"] = tf.cast(ids, x["inputs"].dtype)
            return out
        return dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE)

    return seqio.Task(task.name, source=task.source, output_features=task.output_features,
                      preprocessors=[with_fields, seqio.preprocessors.tokenize, rendered,
                                     *token_steps],
                      postprocess_fn=task.postprocess_fn, metric_fns=list(task.metric_fns))
