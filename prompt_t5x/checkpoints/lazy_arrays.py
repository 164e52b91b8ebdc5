"""Saved arrays read on demand, and the one strict load of a set of them into the model's tree.

A :class:`LazyArray` is one saved array, either already in memory (inline in a msgpack blob, a
memory-mapped safetensors tensor) or behind a TensorStore spec (a zarr array of a T5X checkpoint,
local or ``gs://``). Nothing is read until asked: whole arrays, slices, or exactly the slices each
device of a ``jax.sharding.Sharding`` needs, so a model never has to fit on one host.

:func:`read_params` checks a flat ``{name: LazyArray}`` against the parameters a ``T5Config``
needs (one error listing every difference), then reads each one cast and placed as asked. The T5X
reader (``prompt_t5x.checkpoints.t5x_reader``) and the HF importer
(``prompt_t5x.checkpoints.hf_checkpoint``) both load
through it.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts

from prompt_t5x.base import storage
from prompt_t5x.checkpoints import strict_loading


class CheckpointError(ValueError):
    """A path is not a checkpoint we can read, or the checkpoint is damaged."""


def cast_floating(x: np.ndarray, dtype) -> np.ndarray:
    """Cast floating arrays to ``dtype`` (integers such as the step are never cast)."""
    if dtype is None or not jnp.issubdtype(x.dtype, jnp.floating):
        return x
    return x.astype(jnp.dtype(dtype))


def _index_key(index: Tuple[slice, ...]) -> tuple:
    return tuple((s.start, s.stop, s.step) for s in index)


class LazyArray:
    """One saved array, inline (already in memory) or behind a TensorStore spec (read on demand)."""

    def __init__(self, name: str, *, value: Optional[np.ndarray] = None,
                 spec: Optional[dict] = None):
        if (value is None) == (spec is None):
            raise ValueError("LazyArray needs exactly one of value= or spec=")
        self.name = name
        self._value = None if value is None else np.asarray(value)
        self._spec = spec
        self._store = None

    def _open(self):
        if self._store is None:
            try:
                self._store = ts.open(self._spec, open=True, read=True,
                                      context=storage.TS_CONTEXT).result()
            except Exception as e:  # tensorstore raises ValueError/OSError subclasses
                raise CheckpointError(f"cannot open array {self.name!r} of the checkpoint "
                                      f"({self._spec.get('kvstore')}): {e}") from e
        return self._store

    @property
    def is_inline(self) -> bool:
        return self._value is not None

    @property
    def shape(self) -> Tuple[int, ...]:
        return self._value.shape if self.is_inline else tuple(self._open().shape)

    @property
    def dtype(self) -> np.dtype:
        return self._value.dtype if self.is_inline else np.dtype(self._open().dtype.numpy_dtype)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def read(self, index: Tuple[slice, ...] = (), dtype=None) -> np.ndarray:
        """Read ``self[index]`` (only the chunks covering it are fetched), cast to ``dtype``."""
        if self.is_inline:
            return cast_floating(self._value[index], dtype)
        try:
            data = self._open()[index].read().result()
        except Exception as e:
            raise CheckpointError(f"cannot read array {self.name!r} of the checkpoint: {e}") from e
        return cast_floating(np.asarray(data), dtype)

    def to_jax(self, sharding: jax.sharding.Sharding, dtype=None) -> jax.Array:
        """A global ``jax.Array`` laid out by ``sharding``.

        Each host reads only the slices its own devices hold (and each distinct slice once).
        """
        cache: Dict[tuple, np.ndarray] = {}  # replicated shards are read once, not once per device

        def fetch(index):
            key = _index_key(index)
            if key not in cache:
                cache[key] = self.read(index, dtype)
            return cache[key]

        return jax.make_array_from_callback(self.shape, sharding, fetch)

    def __repr__(self):
        where = "inline" if self.is_inline else "tensorstore"
        return f"LazyArray({self.name!r}, {where})"


def read_params(arrays: Mapping[str, LazyArray], config, *, source: str, shardings: Any = None,
                dtype=None, allow_missing: Sequence[str] = (),
                allow_unexpected: Sequence[str] = ()) -> Dict[str, Any]:
    """Check the flat ``{'/'-name: LazyArray}`` against ``config``'s parameters, then read them.

    One error lists every missing / unexpected / mis-shaped parameter (``source`` names where they
    came from); the other arguments are those of ``checkpoints.T5XCheckpoint.load_params``.
    Returns the nested parameter tree: numpy arrays, or ``jax.Array`` laid out by ``shardings``
    (each host reading only its devices' slices); allowed unexpected names are dropped.
    """
    from prompt_t5x.model import t5  # lazily: the model module is only needed for the shape check

    expected = strict_loading.flatten(t5.param_shapes(config))
    strict_loading.check_tree(arrays, expected, allow_missing=allow_missing,
                              allow_unexpected=allow_unexpected, source=source)
    sharding_of = _sharding_lookup(shardings)
    out = {}
    for name, arr in arrays.items():
        if name not in expected:
            continue
        sharding = sharding_of(name, arr.shape)
        out[name] = arr.read((), dtype) if sharding is None else arr.to_jax(sharding, dtype)
    return strict_loading.unflatten(out)


def _sharding_lookup(shardings) -> Callable[[str, tuple], Optional[jax.sharding.Sharding]]:
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return lambda name, shape: shardings
    if callable(shardings):
        return shardings
    flat = strict_loading.flatten(shardings) if any(
        isinstance(v, Mapping) for v in shardings.values()) else dict(shardings)

    def lookup(name, shape):
        if name not in flat:
            raise CheckpointError(f"no sharding given for parameter {name!r}")
        return flat[name]

    return lookup
