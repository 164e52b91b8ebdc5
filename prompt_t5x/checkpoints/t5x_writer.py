"""Write T5X checkpoints in the legacy format (msgpack + gzip'ed zarr), as T5X itself does.

``checkpoint_<step>/checkpoint`` is the flax msgpack blob ``{'version': 3, 'optimizer':
{'target': params, 'state': {'step', 'param_states'}}}`` (layout:
``prompt_t5x.checkpoints.t5x_reader``,
which reads it back). Partitioned weights (kernels, embeddings) become zarr arrays beside it,
named by their ``.``-joined keys, chunked so that chunks tile the array (T5X's partitioned writes
need that) and stay under 64 MiB; in the blob each is replaced by its TensorStore spec with a
path relative to the checkpoint directory. Paths may be local or a kvstore URL (``gs://...``).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from flax import serialization

from prompt_t5x.base import storage
from prompt_t5x.checkpoints import lazy_arrays, strict_loading

LEGACY_VERSION = 3
_CHUNK_BYTES = 64 * 1024 * 1024  # T5X's chunk target: large enough for GCS, small for partitions


def _chunk_shape(shape: Sequence[int], itemsize: int, target_bytes: int = _CHUNK_BYTES) -> list:
    """Largest chunk whose dims divide ``shape`` and whose size is <= ``target_bytes``.

    The largest dimension is shrunk to its next smaller divisor until the chunk fits, so chunks
    tile the array exactly (as T5X requires for partitioned writes).
    """
    chunk = list(shape)
    while chunk and int(np.prod(chunk, dtype=np.int64)) * itemsize > target_bytes:
        axis = int(np.argmax(chunk))
        size, full = chunk[axis], shape[axis]
        chunk[axis] = max(d for d in range(1, size) if full % d == 0) if size > 1 else 1
    return [max(1, c) for c in chunk]


def _zarr_dtype(dtype: np.dtype) -> str:
    return "bfloat16" if dtype == jnp.bfloat16 else np.dtype(dtype).str


def default_in_tensorstore(name: str, array: Any) -> bool:
    """T5X's layout for T5 1.1: partitioned weights (kernels, embeddings) go to TensorStore,
    layer-norm scales and relative-position tables stay inline in the msgpack file."""
    return len(array.shape) >= 2 and not name.endswith("rel_embedding")


def _write_zarr(ckpt_dir: str, name: str, array: Any, dtype) -> dict:
    stored = name.replace("/", ".")
    np_dtype = jnp.dtype(dtype) if dtype is not None else np.dtype(array.dtype)
    meta = {"shape": list(array.shape), "chunks": _chunk_shape(array.shape, np_dtype.itemsize),
            "dtype": _zarr_dtype(np_dtype), "compressor": {"id": "gzip", "level": 1}}
    store = ts.open({"driver": "zarr", "metadata": meta,
                     "kvstore": storage.kvstore_spec(storage.join(ckpt_dir, stored))},
                    create=True, delete_existing=True, context=storage.TS_CONTEXT).result()
    if isinstance(array, jax.Array) and (not array.is_fully_addressable
                                         or len(array.addressable_shards) > 1):
        # Shard by shard (one replica each), never gathering the whole array.
        for shard in array.addressable_shards:
            if shard.replica_id == 0:
                data = lazy_arrays.cast_floating(np.asarray(shard.data), dtype)
                store[shard.index].write(data).result()
    else:
        store.write(lazy_arrays.cast_floating(np.asarray(array), dtype)).result()
    kvstore = ({"driver": "gcs", "bucket": "t5x-dummy-bucket", "path": stored}
               if ckpt_dir.startswith("gs://") else {"driver": "file", "path": stored})
    return {"driver": "zarr", "kvstore": kvstore, "metadata": meta}


def save_t5x_checkpoint(path: str, params: Mapping[str, Any], *, step: int,
                        param_states: Optional[Mapping[str, Any]] = None,
                        single_file: bool = False, dtype=None,
                        in_tensorstore: Callable[[str, Any], bool] = default_in_tensorstore) -> str:
    """Write ``params`` (nested dict, our == T5X's tree) as a legacy T5X checkpoint.

    Args:
      path: the ``checkpoint_<step>`` directory to create (or, with ``single_file``, the msgpack
        file to write). Local or a kvstore URL (``gs://...``).
      step: stored as ``state/step`` (Adafactor's step offset on restore).
      param_states: optional optimizer slots (T5X layout) to store alongside.
      single_file: put every array inline in one msgpack file.
      dtype: cast floating weights before writing (e.g. ``'bfloat16'``).
      in_tensorstore: which parameters become gzip'ed zarr arrays beside the msgpack file.

    Returns the path of the msgpack file. It is written last (and atomically for local paths), so
    a crash mid-save never leaves a readable-but-incomplete checkpoint.

    One process only: every process would create (and delete) the same zarr arrays and nothing
    orders the msgpack file after the others' shards, so a multi-process run gets a clear
    RuntimeError instead of a checkpoint that may be incomplete. (Training saves orbax
    checkpoints, which are collective.)
    """
    if jax.process_count() > 1:
        raise RuntimeError(
            f"save_t5x_checkpoint is single-process only, but this run has "
            f"{jax.process_count()} processes (they would race on {path!r}); save from a "
            "one-process job, e.g. after gathering the params.")
    path = str(path).rstrip("/")
    file_path = path if single_file else storage.join(path, "checkpoint")
    target = {}
    for name, array in strict_loading.flatten(params).items():
        if not single_file and in_tensorstore(name, array):
            target[name] = _write_zarr(path, "target/" + name, array, dtype)
        else:
            target[name] = lazy_arrays.cast_floating(np.asarray(array), dtype)
    state = {"step": np.asarray(step, np.int32),
             "param_states": {k: np.asarray(v) for k, v in
                              strict_loading.flatten(param_states or {}).items()}}
    blob = {"version": LEGACY_VERSION,
            "optimizer": {"target": strict_loading.unflatten(target),
                          "state": {"step": state["step"],
                                    "param_states": strict_loading.unflatten(
                                        state["param_states"])}}}
    storage.write_bytes_atomic(file_path, serialization.msgpack_serialize(blob))
    return file_path
