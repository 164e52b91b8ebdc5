"""GLUE families (TFDS ``glue/*:2.0.0``) in T5's text-to-text formats.

  cola  ``cola sentence: S``                      -> unacceptable | acceptable   (MCC)
  sst2  ``sst2 sentence: S``                      -> negative | positive         (accuracy)
  mrpc  ``mrpc sentence1: A sentence2: B``        -> not_equivalent | equivalent (F1, accuracy)
  qqp   ``qqp question1: A question2: B``         -> not_duplicate | duplicate   (F1, accuracy)
  stsb  ``stsb sentence1: A sentence2: B``        -> "3.8" (score rounded to 0.2; Pearson, Spearman)
  mnli  ``mnli hypothesis: H premise: P``         -> entailment | neutral | contradiction
        (mnli_matched / mnli_mismatched: its two validation/test sets as separate eval tasks)
  qnli  ``qnli question: Q sentence: S``          -> entailment | not_entailment
  rte   ``rte sentence1: A sentence2: B``         -> entailment | not_entailment
  wnli  ``wnli sentence1: A sentence2: B``        -> not_entailment | entailment
"""

from __future__ import annotations

import functools
from typing import List, Optional

from prompt_t5x.data import metrics
from tasks import families as fam
from tasks import postprocessors as post
from tasks import preprocessors as prep

_SPLITS = fam.standard_splits("train", "validation", "test")


def _family(name: str, label_names, text_fields, *, metric_fns=(metrics.accuracy,),
            train_examples=0, tfds_config=None, benchmark_name=None, splits=_SPLITS):
    schema = {**{f: "text" for f in text_fields}, "label": "label", "idx": "int"}
    return fam.Family(
        benchmark="glue", name=name, tfds_name=f"glue/{tfds_config or name}:2.0.0",
        version="v002", splits=splits, schema=schema,
        text_preprocessor=functools.partial(
            prep.glue_format, benchmark_name=benchmark_name or name,
            label_names=tuple(label_names), feature_names=tuple(sorted(text_fields))),
        postprocess_fn=post.class_id(label_names),
        metric_fns=tuple(metric_fns), label_names=tuple(label_names),
        train_examples=train_examples)


_MNLI_LABELS = ("entailment", "neutral", "contradiction")
_F1_ACC = (metrics.f1_binary, metrics.accuracy)

FAMILIES: List[fam.Family] = [
    _family("cola", ("unacceptable", "acceptable"), ("sentence",),
            metric_fns=(metrics.matthews_corrcoef,), train_examples=8_551),
    _family("sst2", ("negative", "positive"), ("sentence",), train_examples=67_349),
    _family("mrpc", ("not_equivalent", "equivalent"), ("sentence1", "sentence2"),
            metric_fns=_F1_ACC, train_examples=3_668),
    _family("qqp", ("not_duplicate", "duplicate"), ("question1", "question2"),
            metric_fns=_F1_ACC, train_examples=363_849),
    fam.Family(
        benchmark="glue", name="stsb", tfds_name="glue/stsb:2.0.0", version="v002",
        splits=_SPLITS,
        schema={"sentence1": "text", "sentence2": "text", "label": "float", "idx": "int"},
        text_preprocessor=prep.stsb_format, postprocess_fn=post.to_float,
        metric_fns=(metrics.pearson_corrcoef, metrics.spearman_corrcoef), label_names=None,
        train_examples=5_749),
    _family("mnli", _MNLI_LABELS, ("premise", "hypothesis"), train_examples=392_702,
            splits=fam.standard_splits("train", "validation_matched", "validation_mismatched",
                                       "test_matched", "test_mismatched")),
    _family("mnli_matched", _MNLI_LABELS, ("premise", "hypothesis"), tfds_config="mnli",
            benchmark_name="mnli",
            splits={"validation": "validation_matched", "test": "test_matched"}),
    _family("mnli_mismatched", _MNLI_LABELS, ("premise", "hypothesis"), tfds_config="mnli",
            benchmark_name="mnli",
            splits={"validation": "validation_mismatched", "test": "test_mismatched"}),
    _family("qnli", ("entailment", "not_entailment"), ("question", "sentence"),
            train_examples=104_743),
    _family("rte", ("entailment", "not_entailment"), ("sentence1", "sentence2"),
            train_examples=2_490),
    _family("wnli", ("not_entailment", "entailment"), ("sentence1", "sentence2"),
            train_examples=635),
]

TRAINABLE = [f for f in FAMILIES if f.train_examples > 0]


def register(vocab_path: Optional[str] = None, first_task_index: int = 0) -> List[str]:
    """Register every GLUE task (and its variants) from TFDS; return the standard names."""
    names = []
    for i, family in enumerate(FAMILIES):
        fam.register_variants(family, fam.tfds_source(family), name=family.task_name,
                              source_kind="tfds", task_index=first_task_index + i,
                              vocab_path=vocab_path)
        names.append(family.task_name)
    return names
