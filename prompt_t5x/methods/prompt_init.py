"""Prompt initializers: where a soft prompt ``[P, D]`` starts.

The array initializers (``random_uniform``, ``sampled_vocab``, ``class_labels``, ``from_npy``) are
pure functions of an rng and the frozen embedding; the ``*_init`` factories bind their settings
into a ``PromptInit`` ``(rng, frozen params, length, d_model) -> [P, D]`` that a method calls.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from prompt_t5x.base.errors import InputError

Array = jax.Array
PyTree = Any
# (rng, frozen params, prompt length, d_model) -> prompt [P, D]
PromptInit = Callable[[jax.Array, PyTree, int, int], jax.Array]


def random_uniform(rng: Array, length: int, dim: int, scale: float = 0.5,
                   symmetric: bool = False, dtype=jnp.float32) -> Array:
    """Uniform prompt [P, D]: [0, scale) like the reference code, or [-scale, scale)."""
    low = -scale if symmetric else 0.0
    return jax.random.uniform(rng, (length, dim), dtype, minval=low, maxval=scale)


def sampled_vocab(rng: Array, embedding: Array, length: int, population: int = 5000) -> Array:
    """Prompt [P, D] whose rows are embeddings of tokens drawn from the first ``population`` ids.

    Drawn without replacement when ``length <= population``. T5's SentencePiece ids are roughly
    ordered by frequency, so the first 5000 are common tokens.
    """
    population = min(population, embedding.shape[0])
    ids = jax.random.choice(rng, population, (length,), replace=length > population)
    return jnp.take(jnp.asarray(embedding), ids, axis=0).astype(jnp.float32)


class SentencePieceEncoder:
    """Text -> ids with a SentencePiece model file (no TensorFlow involved)."""

    def __init__(self, path: Union[str, os.PathLike]):
        import sentencepiece as spm  # local import: only this initializer needs it

        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"SentencePiece model not found: {path}")
        self.processor = spm.SentencePieceProcessor(model_file=path)

    def encode(self, text: str) -> Sequence[int]:
        return self.processor.encode(text)


def class_labels(rng: Array, embedding: Array, length: int, labels: Sequence[str],
                 encode: Union[Callable[[str], Sequence[int]], SentencePieceEncoder, str],
                 population: int = 5000) -> Array:
    """Prompt [P, D]: row i < len(labels) is the mean embedding of label i's sub-tokens.

    The remaining rows are sampled from the vocabulary (``sampled_vocab``). ``encode`` is a
    function text -> ids, a ``SentencePieceEncoder``, or the path of a SentencePiece model.
    """
    if isinstance(encode, (str, os.PathLike)):
        encode = SentencePieceEncoder(encode)
    if isinstance(encode, SentencePieceEncoder):
        encode = encode.encode
    if len(labels) > length:
        raise InputError(f"{len(labels)} class labels do not fit in a prompt of length {length}")
    embedding = jnp.asarray(embedding)
    rows = []
    for label in labels:
        ids = list(encode(label))
        if not ids:
            raise InputError(f"class label {label!r} encodes to no tokens")
        if max(ids) >= embedding.shape[0]:
            raise InputError(f"class label {label!r} has token id {max(ids)} outside the "
                             f"embedding table of {embedding.shape[0]} rows (wrong vocabulary?)")
        rows.append(jnp.mean(jnp.take(embedding, jnp.asarray(ids), axis=0), axis=0))
    rest = sampled_vocab(rng, embedding, length - len(labels), population)
    label_rows = jnp.stack(rows).astype(jnp.float32) if rows else rest[:0]
    return jnp.concatenate([label_rows, rest], axis=0)


def from_npy(path: Union[str, os.PathLike], shape: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """Load a prompt [P, D] from a .npy file (never unpickles), optionally checking its shape."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"prompt file not found: {path}")
    try:
        prompt = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise InputError(f"{path}: not a plain numeric .npy array ({e})") from e
    if prompt.ndim != 2:
        raise InputError(f"{path}: a prompt must be 2-D [length, embed], got shape {prompt.shape}")
    if shape is not None and tuple(prompt.shape) != tuple(shape):
        raise InputError(f"{path}: prompt shape {tuple(prompt.shape)} != expected {tuple(shape)} "
                         "(prompt length and the model's d_model must match)")
    return prompt.astype(np.float32)


# ----------------------------------------------------------------------------- bound initializers

def sampled_vocab_init(population: int = 5000) -> PromptInit:
    def init(rng, frozen, length, dim):
        return sampled_vocab(rng, frozen["token_embedder"]["embedding"], length, population)
    return init


def random_uniform_init(scale: float = 0.5, symmetric: bool = False) -> PromptInit:
    def init(rng, frozen, length, dim):
        return random_uniform(rng, length, dim, scale, symmetric)
    return init


def class_labels_init(labels, encode, population: int = 5000) -> PromptInit:
    def init(rng, frozen, length, dim):
        return class_labels(rng, frozen["token_embedder"]["embedding"], length, labels, encode,
                            population)
    return init


def npy_init(path: str) -> PromptInit:
    def init(rng, frozen, length, dim):
        return from_npy(path, (length, dim))
    return init
