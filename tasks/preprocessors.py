"""Text-to-text formats of T5 for GLUE / SuperGLUE and the prefix-LM objective, as SeqIO
preprocessors (tf.data ops). Written for this project from T5's documented formats.

The general GLUE/SuperGLUE format joins the benchmark name with ``"<feature>: <value>"`` pairs in
sorted feature order (or a fixed order for MultiRC and WiC) and maps the class id to its label
word, e.g. ``{"sentence": "it 's a charming journey .", "label": 1}`` ->
``inputs="sst2 sentence: it 's a charming journey ."``, ``targets="positive"``. An unlabelled
example (label ``-1``, the test splits) gets the target ``"<unk>"``.

Every preprocessor keeps the fields the postprocessors need for metrics (``idx``, ``label``, ...).
"""

from __future__ import annotations

import re
from typing import Mapping, Optional, Sequence

import seqio
import tensorflow as tf

UNLABELLED_TARGET = "<unk>"


def _label_word(label: tf.Tensor, label_names: Sequence[str]) -> tf.Tensor:
    """Label word of a class id; ``<unk>`` for -1 (no label, e.g. a test split)."""
    label = tf.cast(label, tf.int64)
    names = tf.constant(list(label_names))
    return tf.cond(tf.equal(label, -1), lambda: tf.constant(UNLABELLED_TARGET),
                   lambda: tf.gather(names, label))


def _join_fields(x: Mapping[str, tf.Tensor], benchmark_name: str,
                 feature_names: Sequence[str]) -> tf.Tensor:
    pieces = [benchmark_name]
    for key in feature_names:
        pieces += [f"{key}:", x[key]]
    return tf.strings.join(pieces, separator=" ")


def glue_format(dataset: tf.data.Dataset, benchmark_name: str, label_names: Sequence[str],
                feature_names: Sequence[str]) -> tf.data.Dataset:
    """The generic GLUE/SuperGLUE classification format (see the module docstring)."""
    def convert(x):
        return {
            "inputs": _join_fields(x, benchmark_name, feature_names),
            "targets": _label_word(x["label"], label_names),
            "label": tf.cast(x["label"], tf.int64),
            "idx": tf.cast(x["idx"], tf.int64),
        }
    return dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


def multirc_format(dataset: tf.data.Dataset, label_names: Sequence[str]) -> tf.data.Dataset:
    """MultiRC: ``multirc question: Q answer: A paragraph: P`` with HTML markup removed.

    One example per answer option; the paragraph/question/answer ids are kept for grouping in the
    exact-match metric.
    """
    def convert(x):
        joined = _join_fields(x, "multirc", ("question", "answer", "paragraph"))
        joined = tf.strings.regex_replace(joined, "<br>", " ")
        joined = tf.strings.regex_replace(joined, "<(/)?b>", "")
        return {
            "inputs": joined,
            "targets": _label_word(x["label"], label_names),
            "label": tf.cast(x["label"], tf.int64),
            "idx/paragraph": tf.cast(x["idx"]["paragraph"], tf.int64),
            "idx/question": tf.cast(x["idx"]["question"], tf.int64),
            "idx/answer": tf.cast(x["idx"]["answer"], tf.int64),
        }
    return dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


def stsb_format(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """STS-B regression as text: the score rounded to the nearest 0.2, one decimal (``"3.8"``)."""
    def convert(x):
        score = tf.cast(x["label"], tf.float32)
        return {
            "inputs": _join_fields(x, "stsb", ("sentence1", "sentence2")),
            "targets": tf.strings.as_string(tf.round(score * 5) / 5, precision=1),
            "label": score,
            "idx": tf.cast(x["idx"], tf.int64),
        }
    return dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


def record_format(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """ReCoRD: ``record query: Q entities: e1, e2 passage: P`` -> one example per gold answer.

    The ``@highlight`` lines of the passage become sentences. Unlabelled examples (no answers) give
    one example with target ``<unk>``. The full answer list rides along for the metric.
    """
    def expand(x):
        num_answers = tf.size(x["answers"])
        copies = tf.maximum(num_answers, 1)
        passage = tf.strings.regex_replace(x["passage"], r"(\.|\?|\!|\"|\')\n@highlight\n",
                                           r"\1 ")
        passage = tf.strings.regex_replace(passage, r"\n@highlight\n", ". ")
        inputs = tf.strings.join(
            ["record query:", x["query"], "entities:",
             tf.strings.reduce_join(x["entities"], separator=", "), "passage:", passage],
            separator=" ")
        targets = tf.cond(num_answers > 0, lambda: x["answers"],
                          lambda: tf.constant([UNLABELLED_TARGET]))
        return {
            "inputs": tf.fill([copies], inputs),
            "targets": targets,
            "answers": tf.broadcast_to(x["answers"], tf.stack([copies, num_answers])),
            "idx/passage": tf.fill([copies], tf.cast(x["idx"]["passage"], tf.int64)),
            "idx/query": tf.fill([copies], tf.cast(x["idx"]["query"], tf.int64)),
        }
    return dataset.map(expand, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


# --------------------------------------------------------------------------- WSC (simple) ----
def wsc_simple_inputs(text: str, span2_index: int, span2_text: str) -> str:
    """Mark the pronoun (word ``span2_index``) with asterisks: ``... if *he* could ...``.

    A handful of WSC records have an index that is off by a word or a pronoun glued to
    punctuation (``him,"``); the pronoun is then looked up next to the index and split from its
    punctuation. Anything else is a broken record and raises ValueError.
    """
    words = text.strip().split(" ")
    candidates = [span2_index] + [span2_index + d for d in (1, -1, 2, -2)]
    for i in candidates:
        if not 0 <= i < len(words):
            continue
        word = words[i]
        if word == span2_text:
            marked = f"*{word}*"
        elif word.startswith(span2_text) and not word[len(span2_text)].isalnum():
            marked = f"*{span2_text}* {word[len(span2_text):]}"
        else:
            continue
        return " ".join(words[:i] + [marked] + words[i + 1:])
    raise ValueError(f"WSC record: pronoun {span2_text!r} not found at word {span2_index} of "
                     f"{text!r}")


def wsc_simple_format(dataset: tf.data.Dataset, correct_referent_only: bool) -> tf.data.Dataset:
    """WSC as T5's "simple" formulation: ``wsc: <text with *pronoun*>`` -> the candidate referent.

    The target is always ``span1_text``, right or wrong; training keeps only correct referents
    (``correct_referent_only``), eval keeps all and the postprocessor decides whether the model's
    answer names the candidate.
    """
    def mark(text, index, pronoun):
        return wsc_simple_inputs(text.numpy().decode("utf-8"), int(index.numpy()),
                                 pronoun.numpy().decode("utf-8"))

    def convert(x):
        marked = tf.py_function(mark, [x["text"], x["span2_index"], x["span2_text"]], tf.string)
        return {
            "inputs": tf.strings.join(["wsc:", tf.reshape(marked, [])], separator=" "),
            "targets": tf.reshape(x["span1_text"], []),
            "label": tf.cast(x["label"], tf.int64),
            "idx": tf.cast(x["idx"], tf.int64),
        }
    if correct_referent_only:
        dataset = dataset.filter(lambda x: tf.equal(tf.cast(x["label"], tf.int64), 1))
    return dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


# ---------------------------------------------------------------------- task variants ----
def drop_task_name(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """"Taskless" variant: remove the first word of ``inputs`` (``"rte hypothesis: .."`` ->
    ``"hypothesis: .."``), so a learned prompt alone must tell the model what the task is."""
    def convert(x):
        x = dict(x)
        x["inputs"] = tf.strings.regex_replace(x["inputs"], r"^[^ ]* ", "", replace_global=False)
        return x
    return dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


def null_prompt(dataset: tf.data.Dataset, template_words: Sequence[str]) -> tf.data.Dataset:
    """"Null prompt" variant (Logan IV et al., 2022): the task's fields joined with no template
    at all: the task name and every ``"<word>:"`` of ``template_words`` (the family's field
    names) removed, ``"rte hypothesis: H premise: P"`` -> ``"H P"``. A field value that itself
    contains ``"premise: "`` would lose that word too (rare in these datasets; accepted)."""
    words = "|".join(re.escape(w) for w in sorted(template_words, key=len, reverse=True))

    def convert(x):
        x = dict(x)
        text = tf.strings.regex_replace(x["inputs"], r"^[^ ]* ", "", replace_global=False)
        if words:
            text = tf.strings.regex_replace(text, rf"(^| )(?:{words}): ", r"\1")
        x["inputs"] = text
        return x
    return dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


def task_index_token(vocabulary: seqio.Vocabulary, task_index: int) -> int:
    """Token id marking task ``task_index``: the sentinel ``<extra_id_{task_index}>``.

    Sentinels never occur in classification inputs, so the first encoder token unambiguously
    selects the task's prompt in multi-task prompt tuning.
    """
    extra = getattr(vocabulary, "extra_ids", 0)
    if not 0 <= task_index < extra:
        raise ValueError(f"task index {task_index} out of range: the vocabulary has {extra} "
                         "sentinel ids to use as task tokens.")
    return vocabulary.vocab_size - 1 - task_index


def prepend_task_index(dataset: tf.data.Dataset, output_features, task_index: int
                       ) -> tf.data.Dataset:
    """Token preprocessor (after tokenize): put the task's id token first in ``inputs``."""
    token = task_index_token(output_features["inputs"].vocabulary, task_index)

    def convert(x):
        x = dict(x)
        x["inputs"] = tf.concat([tf.constant([token], x["inputs"].dtype), x["inputs"]], axis=0)
        x["task_index"] = tf.constant(task_index, tf.int64)
        return x
    return dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


# ----------------------------------------------------------------------- prefix LM ----
def text_to_targets(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Keep only the document text, as ``targets``, ready for tokenization."""
    return dataset.map(lambda x: {"targets": x["text"]}, num_parallel_calls=tf.data.AUTOTUNE)


def _chunks(tokens: tf.Tensor, chunk_length: int) -> tf.RaggedTensor:
    """Split a 1-D token tensor into consecutive pieces of ``chunk_length`` (last one shorter)."""
    n = tf.size(tokens)
    num_chunks = (n + chunk_length - 1) // chunk_length
    lengths = tf.minimum(chunk_length, n - tf.range(num_chunks) * chunk_length)
    return tf.RaggedTensor.from_row_lengths(tokens, lengths)


def prefix_lm(dataset: tf.data.Dataset, sequence_length: Mapping[str, int], output_features,
              seed: Optional[int] = None) -> tf.data.Dataset:
    """Prefix-LM (T5's LM adaptation objective) over tokenized ``targets`` documents.

    Each document is cut into pieces of up to ``(L - 1) + (T - 1)`` tokens (L, T the inputs and
    targets lengths; one slot each for EOS). Every piece is split at a uniformly random point
    into a prefix (``inputs``) and its continuation (``targets``), with the point chosen so that
    both halves fit without trimming. Pieces shorter than 2 tokens are dropped. The split is a
    stateless function of the example and ``seed``, so the data order is reproducible.
    """
    del output_features
    inputs_room = sequence_length["inputs"] - 1
    targets_room = sequence_length["targets"] - 1
    if inputs_room < 1 or targets_room < 1:
        raise ValueError(f"prefix_lm needs inputs and targets lengths >= 2, got {sequence_length}")
    chunk_length = inputs_room + targets_room

    pieces = dataset.flat_map(
        lambda x: tf.data.Dataset.from_tensor_slices(_chunks(x["targets"], chunk_length)))
    pieces = pieces.filter(lambda t: tf.size(t) >= 2)
    base_seed = tf.constant([0 if seed is None else seed, 0], tf.int64)

    def split(index, tokens):
        n = tf.size(tokens)
        low = tf.maximum(1, n - targets_room)
        high = tf.minimum(n - 1, inputs_room)
        point = tf.random.stateless_uniform([], seed=base_seed + tf.stack([0, index]),
                                            minval=low, maxval=high + 1, dtype=tf.int32)
        return {"inputs": tokens[:point], "targets": tokens[point:]}
    return pieces.enumerate().map(split, num_parallel_calls=tf.data.AUTOTUNE)

