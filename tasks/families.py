"""A dataset *family* (e.g. SuperGLUE RTE) and the SeqIO task variants registered for it.

A ``Family`` says everything that is the same whichever source the data comes from (TFDS or local
files): the raw record schema, the text-to-text format, label words, postprocessor and metrics.
``register_variants`` adds, for one source, the standard task plus its "taskless" variant (the
dataset-name prefix removed), its "null" variant (``null_<task>``: the fields alone, no task name
and no ``"<field>:"`` template words: the null prompts of Logan IV et al., 2022, used with bias
tuning) and its "task index" variant (a task id token first, for multi-task prompts).
``TASK_INFO`` records, per registered task name, its family and variant, so the CLI and rank
classification can find label words without parsing task names.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import seqio

from tasks import preprocessors as prep
from tasks import vocab as vocab_lib

# Schema kinds for one raw record field. A nested Mapping describes a dict field (e.g. ``idx``).
SchemaKind = Union[str, Mapping[str, str]]


@dataclasses.dataclass(frozen=True)
class Family:
    benchmark: str                    # 'glue' | 'super_glue'
    name: str                         # 'rte'
    tfds_name: str                    # 'super_glue/rte:1.0.2'
    version: str                      # T5's task-name suffix: 'v102' | 'v002'
    splits: Mapping[str, str]         # our split name -> TFDS split name
    schema: Mapping[str, SchemaKind]  # raw fields: 'text' | 'int' | 'float' | 'label' | 'text_list'
    text_preprocessor: Callable       # tf.data.Dataset -> tf.data.Dataset with inputs/targets
    postprocess_fn: Callable
    metric_fns: Tuple[Callable, ...]
    label_names: Optional[Tuple[str, ...]] = None   # None: free-text / regression targets
    train_examples: int = 0           # train-split size, for proportional mixtures
    task_suffix: str = ""             # e.g. '_simple_train' for the two WSC tasks

    @property
    def key(self) -> str:
        """Family key, e.g. 'super_glue_rte' (also the local data directory name)."""
        return f"{self.benchmark}_{self.name}"

    @property
    def task_name(self) -> str:
        return f"{self.benchmark}_{self.name}_{self.version}{self.task_suffix}"


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """What we know about one registered task beyond SeqIO's own fields."""
    name: str
    family: Optional[Family]          # None for LM tasks
    variant: str                      # 'standard' | 'taskless' | 'null' | 'task_index'
    source: str                       # 'tfds' | 'local'
    task_index: Optional[int] = None
    local_files: Optional[Mapping[str, str]] = None

    @property
    def label_names(self) -> Optional[Tuple[str, ...]]:
        return None if self.family is None else self.family.label_names


TASK_INFO: Dict[str, TaskInfo] = {}
MIXTURE_NAMES: Dict[str, str] = {}   # mixture name -> one-line description


def add_task(name: str, info: TaskInfo, **task_kwargs) -> seqio.Task:
    """Register a SeqIO task, replacing an earlier one of the same name (re-registration with a
    different vocabulary must not fail)."""
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    TASK_INFO[name] = info
    return seqio.TaskRegistry.add(name, **task_kwargs)


def add_mixture(name: str, tasks: Sequence, description: str, default_rate=None):
    if name in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(name)
    MIXTURE_NAMES[name] = description
    return seqio.MixtureRegistry.add(name, tasks, default_rate=default_rate)


def _token_preprocessors(task_index: Optional[int]) -> list:
    steps = [seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder()]
    if task_index is not None:
        steps.append(functools.partial(prep.prepend_task_index, task_index=task_index))
    steps.append(seqio.preprocessors.append_eos_after_trim)
    return steps


def register_variants(family: Family, source: seqio.DataSource, *, name: str, source_kind: str,
                      task_index: int, vocab_path: Optional[str] = None,
                      local_files: Optional[Mapping[str, str]] = None) -> Tuple[str, ...]:
    """Register ``name`` plus ``taskless_<name>``, ``null_<name>`` and ``<name>_task_index``;
    return the names."""
    features = vocab_lib.output_features(vocab_path)
    variants = (
        (name, "standard", [family.text_preprocessor], None),
        (f"taskless_{name}", "taskless", [family.text_preprocessor, prep.drop_task_name], None),
        (f"null_{name}", "null", [family.text_preprocessor, functools.partial(
            prep.null_prompt, template_words=tuple(family.schema))], None),
        (f"{name}_task_index", "task_index", [family.text_preprocessor], task_index),
    )
    for task_name, variant, text_steps, index in variants:
        add_task(
            task_name,
            TaskInfo(task_name, family, variant, source_kind, index, local_files),
            source=source,
            output_features=features,
            preprocessors=list(text_steps) + _token_preprocessors(index),
            postprocess_fn=family.postprocess_fn,
            metric_fns=list(family.metric_fns),
        )
    return tuple(v[0] for v in variants)


def tfds_source(family: Family) -> seqio.TfdsDataSource:
    return seqio.TfdsDataSource(tfds_name=family.tfds_name, splits=dict(family.splits))


def standard_splits(*names: str) -> Dict[str, str]:
    return {n: n for n in names}
