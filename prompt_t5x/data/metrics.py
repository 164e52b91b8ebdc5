"""Evaluation metrics for the GLUE / SuperGLUE tasks, written for this project.

Every metric has the SeqIO metric signature ``fn(targets, predictions) -> {name: value}`` and
works on *postprocessed* values (see ``tasks/postprocessors.py``): class ids for classification
(``-1`` marks a prediction that matched no label word), floats for STS-B, and small dicts for the
grouped tasks (MultiRC, ReCoRD). Values are percentages (0-100), as T5 reports them; so is the
teacher-forced ``token_accuracy`` of validation, and :func:`format_metrics` prints them with a
``%``.

This module imports no TensorFlow (scikit-learn / scipy only), so the core and benchmark code may
use it.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Any, Dict, Hashable, List, Sequence

import numpy as np

Metrics = Dict[str, float]


def is_percent(name: str) -> bool:
    """Whether metric ``name`` is a percentage: every task metric and ``token_accuracy`` are (as
    T5 reports them); losses are not (mean nats per target token)."""
    return "loss" not in name


def format_metrics(values: Dict[str, float]) -> str:
    """``accuracy=87.50%, loss=0.4213, token_accuracy=93.75%``: the one way commands print
    metrics, so every percentage reads as one and no fraction is mistaken for one."""
    return ", ".join(f"{k}={v:.2f}%" if is_percent(k) else f"{k}={v:.4f}"
                     for k, v in sorted(values.items()))


def _check_lengths(targets: Sequence[Any], predictions: Sequence[Any]) -> None:
    if len(targets) != len(predictions):
        raise ValueError(f"metric got {len(targets)} targets but {len(predictions)} predictions; "
                         "they must be aligned one to one.")
    if not len(targets):
        raise ValueError("metric got no examples; an empty split cannot be scored.")


def accuracy(targets: Sequence[Any], predictions: Sequence[Any]) -> Metrics:
    """Percentage of predictions equal to their target."""
    _check_lengths(targets, predictions)
    hits = sum(1 for t, p in zip(targets, predictions) if t == p)
    return {"accuracy": 100.0 * hits / len(targets)}


def _invalid_as_wrong(targets: Sequence[int], predictions: Sequence[int]) -> np.ndarray:
    """Binary predictions with invalid ones (-1, no label word matched) flipped to the wrong class.

    Counting an unparseable answer as wrong (rather than dropping it) keeps F1 honest: a model
    that emits garbage must not score as if it had abstained.
    """
    t = np.asarray(targets, dtype=np.int64)
    p = np.asarray(predictions, dtype=np.int64)
    return np.where(p < 0, 1 - t, p)


def f1_binary(targets: Sequence[int], predictions: Sequence[int]) -> Metrics:
    """F1 of the positive class (label id 1); invalid predictions count as wrong."""
    from sklearn.metrics import f1_score
    _check_lengths(targets, predictions)
    p = _invalid_as_wrong(targets, predictions)
    return {"f1": 100.0 * float(f1_score(np.asarray(targets), p, pos_label=1,
                                         zero_division=0.0))}


def matthews_corrcoef(targets: Sequence[int], predictions: Sequence[int]) -> Metrics:
    """Matthews correlation (CoLA, AX-b), in percent."""
    from sklearn.metrics import matthews_corrcoef as mcc
    _check_lengths(targets, predictions)
    return {"matthews_corrcoef": 100.0 * float(mcc(np.asarray(targets), np.asarray(predictions)))}


def _correlation(kind: str, targets: Sequence[float], predictions: Sequence[float]) -> float:
    from scipy import stats
    t = np.asarray(targets, dtype=np.float64)
    p = np.asarray(predictions, dtype=np.float64)
    if np.all(p == p[0]) or np.all(t == t[0]):
        return 0.0  # correlation with a constant is undefined; report no correlation
    fn = stats.pearsonr if kind == "pearson" else stats.spearmanr
    return float(fn(t, p)[0])


def pearson_corrcoef(targets: Sequence[float], predictions: Sequence[float]) -> Metrics:
    _check_lengths(targets, predictions)
    return {"pearson_corrcoef": 100.0 * _correlation("pearson", targets, predictions)}


def spearman_corrcoef(targets: Sequence[float], predictions: Sequence[float]) -> Metrics:
    _check_lengths(targets, predictions)
    return {"spearman_corrcoef": 100.0 * _correlation("spearman", targets, predictions)}


def macro_f1(num_classes: int):
    """Unweighted mean of per-class F1 over ``num_classes`` classes (CB uses 3).

    Invalid predictions (-1) are kept as their own non-class, so they hurt recall of the true class.
    """
    def mean_class_f1(targets: Sequence[int], predictions: Sequence[int]) -> Metrics:
        from sklearn.metrics import f1_score
        _check_lengths(targets, predictions)
        score = f1_score(np.asarray(targets), np.asarray(predictions),
                         labels=list(range(num_classes)), average="macro", zero_division=0.0)
        return {f"mean_{num_classes}class_f1": 100.0 * float(score)}
    mean_class_f1.__name__ = f"mean_{num_classes}class_f1"
    return mean_class_f1


def cb_metrics(targets: Sequence[int], predictions: Sequence[int]) -> Metrics:
    """CommitmentBank: macro-F1 over its 3 classes and accuracy."""
    return {**macro_f1(3)(targets, predictions), **accuracy(targets, predictions)}


def multirc_metrics(targets: Sequence[Dict[str, Any]],
                    predictions: Sequence[Dict[str, Any]]) -> Metrics:
    """MultiRC: F1 over all answer options (F1a) and per-question exact match (EM).

    Each target / prediction is ``{'group': hashable question id, 'value': 0|1}`` for one answer
    option. EM counts a question right only when every one of its options is right.
    """
    _check_lengths(targets, predictions)
    t = [x["value"] for x in targets]
    p = [x["value"] for x in predictions]
    f1a = f1_binary(t, p)["f1"]
    by_question: Dict[Hashable, List[bool]] = collections.defaultdict(list)
    for target, pred in zip(targets, predictions):
        by_question[target["group"]].append(target["value"] == pred["value"])
    em = float(np.mean([all(v) for v in by_question.values()]))
    return {"f1a": f1a, "exact_match": 100.0 * em}


# ----------------------------------------------------------------------------------- ReCoRD ----
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, drop punctuation and articles, squeeze spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_score(gold: str, predicted: str) -> float:
    return float(normalize_answer(gold) == normalize_answer(predicted))


def token_f1_score(gold: str, predicted: str) -> float:
    """Bag-of-tokens F1 between two normalised answers."""
    gold_tokens = normalize_answer(gold).split()
    pred_tokens = normalize_answer(predicted).split()
    common = collections.Counter(gold_tokens) & collections.Counter(pred_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def record_metrics(targets: Sequence[Dict[str, Any]],
                   predictions: Sequence[Dict[str, Any]]) -> Metrics:
    """ReCoRD exact match and token F1, each the max over the gold answers of a query.

    The ReCoRD task emits one training example per gold answer, so a query appears several times;
    each query (``'group'``) is scored once, from its first prediction.
    Targets: ``{'group': id, 'answers': [str, ...]}``; predictions: ``{'group': id, 'value': str}``.
    """
    _check_lengths(targets, predictions)
    seen = set()
    ems, f1s = [], []
    for target, pred in zip(targets, predictions):
        if target["group"] in seen:
            continue
        seen.add(target["group"])
        answers = list(target["answers"]) or [""]
        ems.append(max(exact_match_score(a, pred["value"]) for a in answers))
        f1s.append(max(token_f1_score(a, pred["value"]) for a in answers))
    return {"em": 100.0 * float(np.mean(ems)), "f1": 100.0 * float(np.mean(f1s))}
