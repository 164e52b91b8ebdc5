"""SuperGLUE families (TFDS ``super_glue/*:1.0.2``) in T5's text-to-text formats.

Formats (benchmark name, then ``feature: value`` pairs; label words as targets):
  boolq   ``boolq passage: P question: Q``                      -> False | True
  cb      ``cb hypothesis: H premise: P``                       -> entailment | contradiction | neutral
  copa    ``copa choice1: A choice2: B premise: P question: cause`` -> choice1 | choice2
  multirc ``multirc question: Q answer: A paragraph: P``        -> False | True (one per answer)
  record  ``record query: Q entities: e1, e2 passage: P``       -> an answer entity (one per answer)
  rte     ``rte hypothesis: H premise: P``                      -> entailment | not_entailment
  wic     ``wic sentence1: S1 sentence2: S2 word: W``           -> False | True
  wsc     ``wsc: The city councilmen refused ... *they* feared`` -> the candidate referent
  axb/axg cast as RTE (``rte sentence1: .. sentence2: ..`` / ``rte hypothesis: .. premise: ..``),
          test split only (labelled), eval only.
"""

from __future__ import annotations

import functools
from typing import List, Optional

from prompt_t5x.data import metrics
from tasks import families as fam
from tasks import postprocessors as post
from tasks import preprocessors as prep

_SPLITS = fam.standard_splits("train", "validation", "test")
_DIAGNOSTIC_SPLITS = fam.standard_splits("test")
_IDX = "int"


def _classification(name: str, label_names, schema, *, feature_names=None, benchmark_name=None,
                    metric_fns=(metrics.accuracy,), splits=_SPLITS, train_examples=0):
    text_fields = [k for k, v in schema.items() if v == "text"]
    return fam.Family(
        benchmark="super_glue", name=name, tfds_name=f"super_glue/{name}:1.0.2", version="v102",
        splits=splits, schema=schema,
        text_preprocessor=functools.partial(
            prep.glue_format, benchmark_name=benchmark_name or name,
            label_names=tuple(label_names),
            feature_names=tuple(feature_names or sorted(text_fields))),
        postprocess_fn=post.class_id(label_names),
        metric_fns=tuple(metric_fns),
        label_names=tuple(label_names),
        train_examples=train_examples,
    )


_BINARY = ("False", "True")
_RTE_LABELS = ("entailment", "not_entailment")

FAMILIES: List[fam.Family] = [
    _classification("boolq", _BINARY,
                    {"question": "text", "passage": "text", "label": "label", "idx": _IDX},
                    train_examples=9_427),
    _classification("cb", ("entailment", "contradiction", "neutral"),
                    {"premise": "text", "hypothesis": "text", "label": "label", "idx": _IDX},
                    metric_fns=(metrics.cb_metrics,), train_examples=250),
    _classification("copa", ("choice1", "choice2"),
                    {"premise": "text", "choice1": "text", "choice2": "text", "question": "text",
                     "label": "label", "idx": _IDX},
                    train_examples=400),
    fam.Family(
        benchmark="super_glue", name="multirc", tfds_name="super_glue/multirc:1.0.2",
        version="v102", splits=_SPLITS,
        schema={"paragraph": "text", "question": "text", "answer": "text", "label": "label",
                "idx": {"paragraph": "int", "question": "int", "answer": "int"}},
        text_preprocessor=functools.partial(prep.multirc_format, label_names=_BINARY),
        postprocess_fn=post.multirc(_BINARY), metric_fns=(metrics.multirc_metrics,),
        label_names=_BINARY, train_examples=27_243),
    fam.Family(
        benchmark="super_glue", name="record", tfds_name="super_glue/record:1.0.2",
        version="v102", splits=_SPLITS,
        schema={"passage": "text", "query": "text", "entities": "text_list",
                "answers": "text_list", "idx": {"passage": "int", "query": "int"}},
        text_preprocessor=prep.record_format, postprocess_fn=post.record,
        metric_fns=(metrics.record_metrics,), label_names=None, train_examples=138_854),
    _classification("rte", _RTE_LABELS,
                    {"premise": "text", "hypothesis": "text", "label": "label", "idx": _IDX},
                    train_examples=2_490),
    _classification("wic", _BINARY,
                    {"word": "text", "sentence1": "text", "sentence2": "text",
                     "start1": "int", "start2": "int", "end1": "int", "end2": "int",
                     "label": "label", "idx": _IDX},
                    feature_names=("sentence1", "sentence2", "word"), train_examples=5_428),
    _classification("axb", _RTE_LABELS,
                    {"sentence1": "text", "sentence2": "text", "label": "label", "idx": _IDX},
                    benchmark_name="rte", metric_fns=(metrics.matthews_corrcoef,),
                    splits=_DIAGNOSTIC_SPLITS),
    _classification("axg", _RTE_LABELS,
                    {"premise": "text", "hypothesis": "text", "label": "label", "idx": _IDX},
                    benchmark_name="rte", metric_fns=(metrics.accuracy,),
                    splits=_DIAGNOSTIC_SPLITS),
]

_WSC_SCHEMA = {"text": "text", "span1_index": "int", "span2_index": "int", "span1_text": "text",
               "span2_text": "text", "label": "label", "idx": _IDX}


def _wsc(correct_referent_only: bool, suffix: str, train_examples: int) -> fam.Family:
    return fam.Family(
        benchmark="super_glue", name="wsc", tfds_name="super_glue/wsc.fixed:1.0.2",
        version="v102", splits=_SPLITS, schema=_WSC_SCHEMA,
        text_preprocessor=functools.partial(prep.wsc_simple_format,
                                            correct_referent_only=correct_referent_only),
        postprocess_fn=post.wsc_simple, metric_fns=(metrics.accuracy,), label_names=None,
        train_examples=train_examples, task_suffix=suffix)


# WSC "simple": train on correct referents only (259 of 554), evaluate on every candidate.
WSC_TRAIN = _wsc(True, "_simple_train", 259)
WSC_EVAL = _wsc(False, "_simple_eval", 0)
FAMILIES += [WSC_TRAIN, WSC_EVAL]

# Families with a training split, in the order used for task indices and mixtures.
TRAINABLE = [f for f in FAMILIES if f.train_examples > 0]


def register(vocab_path: Optional[str] = None, first_task_index: int = 0) -> List[str]:
    """Register every SuperGLUE task (and its variants) from TFDS; return the standard names."""
    names = []
    for i, family in enumerate(FAMILIES):
        fam.register_variants(family, fam.tfds_source(family), name=family.task_name,
                              source_kind="tfds", task_index=first_task_index + i,
                              vocab_path=vocab_path)
        names.append(family.task_name)
    return names
