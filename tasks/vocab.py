"""The SentencePiece vocabulary and output features shared by every registered task.

The path defaults to T5's public vocabulary (32000 pieces + 100 sentinel ids, model vocab 32128).
Override it, in order of precedence, by passing ``vocab_path`` to ``tasks.register_all``, by the
gin binding ``tasks.register_all.vocab_path``, or by the environment variable ``PROMPT_T5X_VOCAB``
(read when ``tasks`` is first imported). Tests point it at the fixture copy of the same model.
"""

from __future__ import annotations

import functools
import os
from typing import Dict, Optional

import seqio

DEFAULT_VOCAB_PATH = "gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model"
VOCAB_ENV_VAR = "PROMPT_T5X_VOCAB"
EXTRA_IDS = 100


# Set by ``tasks.register_all(vocab_path=...)`` so that tasks registered later (a user's local
# task, a --task_module) get the same vocabulary as the built-in ones.
_configured_path: Optional[str] = None


def set_vocab_path(vocab_path: Optional[str]) -> None:
    global _configured_path
    _configured_path = vocab_path


def resolve_vocab_path(vocab_path: Optional[str] = None) -> str:
    """Explicit argument > ``register_all``'s path > ``$PROMPT_T5X_VOCAB`` > T5's GCS file."""
    return (vocab_path or _configured_path or os.environ.get(VOCAB_ENV_VAR)
            or DEFAULT_VOCAB_PATH)


def get_vocabulary(vocab_path: Optional[str] = None) -> seqio.SentencePieceVocabulary:
    """The vocabulary at ``resolve_vocab_path(vocab_path)``: resolved on every call (so a later
    ``register_all(vocab_path=...)`` is seen), one object per resolved path."""
    return _vocabulary_at(resolve_vocab_path(vocab_path))


@functools.lru_cache(maxsize=None)
def _vocabulary_at(path: str) -> seqio.SentencePieceVocabulary:
    # SentencePiece loads lazily, on first encode.
    return seqio.SentencePieceVocabulary(path, extra_ids=EXTRA_IDS)


def output_features(vocab_path: Optional[str] = None) -> Dict[str, seqio.Feature]:
    """``inputs`` / ``targets`` features, both with EOS appended, as T5 tasks use."""
    vocab = get_vocabulary(vocab_path)
    return {
        "inputs": seqio.Feature(vocabulary=vocab, add_eos=True, required=False),
        "targets": seqio.Feature(vocabulary=vocab, add_eos=True),
    }


def check_vocab_readable(vocab_path: Optional[str] = None) -> None:
    """Fail with one clear message when the vocabulary file cannot be read (e.g. a gs:// path
    without network access) instead of a TensorFlow traceback from inside tf.data."""
    import tensorflow as tf
    path = resolve_vocab_path(vocab_path)
    try:
        found = tf.io.gfile.exists(path)
        reason = "it does not exist"
    except tf.errors.OpError as e:
        found, reason = False, e.message.splitlines()[0]
    if not found:
        raise FileNotFoundError(
            f"cannot read the SentencePiece vocabulary {path!r} ({reason}). Point "
            f"${VOCAB_ENV_VAR} (or --vocab, or tasks.register_all(vocab_path=...)) at a local "
            "copy of cc_all.32000.100extra/sentencepiece.model.")


def check_provider_vocab(provider) -> None:
    """``check_vocab_readable`` for the SentencePiece vocabularies of a task or mixture."""
    for feature in provider.output_features.values():
        path = getattr(feature.vocabulary, "sentencepiece_model_file", None)
        if path:
            check_vocab_readable(path)
