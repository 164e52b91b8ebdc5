"""Postprocessors: decoded strings (model outputs or targets) -> values the metrics compare.

SeqIO calls ``fn(text, example=None, is_target=False)``; ``example`` is the preprocessed example
as numpy (strings as bytes). Pure Python: no TensorFlow.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

INVALID_CLASS = -1


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


def class_id(label_names: Sequence[str]):
    """Label word -> class id; anything that is not a label word -> -1 (counted wrong)."""
    lookup = {name: i for i, name in enumerate(label_names)}

    def to_class_id(text: Any, example: Optional[Mapping[str, Any]] = None,
                    is_target: bool = False) -> int:
        del example, is_target
        return lookup.get(_text(text).strip(), INVALID_CLASS)
    return to_class_id


def to_float(text: Any, example: Optional[Mapping[str, Any]] = None,
             is_target: bool = False, default: float = -1.0) -> float:
    """STS-B: the predicted score, or -1 when the output is not a number."""
    del example, is_target
    try:
        return float(_text(text).strip())
    except ValueError:
        return default


def multirc(label_names: Sequence[str]):
    """MultiRC: ``{'group': (paragraph id, question id), 'value': class id}``."""
    to_id = class_id(label_names)

    def to_grouped(text: Any, example: Optional[Mapping[str, Any]] = None,
                   is_target: bool = False) -> dict:
        if example is None:
            raise ValueError("the MultiRC postprocessor needs the example (for its question id)")
        group = (int(example["idx/paragraph"]), int(example["idx/question"]))
        return {"group": group, "value": to_id(text)}
    return to_grouped


def record(text: Any, example: Optional[Mapping[str, Any]] = None,
           is_target: bool = False) -> dict:
    """ReCoRD: target -> ``{'group', 'answers'}``; prediction -> ``{'group', 'value'}``."""
    if example is None:
        raise ValueError("the ReCoRD postprocessor needs the example (for its query id)")
    group = (int(example["idx/passage"]), int(example["idx/query"]))
    if is_target:
        return {"group": group, "answers": [_text(a) for a in example["answers"]]}
    return {"group": group, "value": _text(text)}


# Determiners do not change which entity a WSC answer names ("the boy" == "boy").
_DETERMINERS = frozenset(
    "a an few her his each every many much my our some that the their these this those which "
    "whose your".split())


def _content_words(text: str) -> str:
    return " ".join(w for w in text.strip().lower().split(" ") if w and w not in _DETERMINERS)


def wsc_simple(text: Any, example: Optional[Mapping[str, Any]] = None,
               is_target: bool = False) -> int:
    """WSC simple: does the model's answer name the candidate referent (``span1_text``)?

    Target -> the gold label (1 if the candidate is the true referent). Prediction -> 1 when the
    answer's content words are a subset or superset of the candidate's (and both or neither are
    possessive), else 0; accuracy then compares the two.
    """
    if example is None:
        raise ValueError("the WSC postprocessor needs the example (for its candidate referent)")
    if is_target:
        return int(example["label"])
    prediction = _content_words(_text(text))
    candidate = _content_words(_text(example["targets_pretokenized"]))
    if ("'" in prediction) != ("'" in candidate):
        return 0
    p, c = set(prediction.split(" ")), set(candidate.split(" "))
    return int(p.issubset(c) or c.issubset(p))


def identity_text(text: Any, example: Optional[Mapping[str, Any]] = None,
                  is_target: bool = False) -> str:
    del example, is_target
    return _text(text)

