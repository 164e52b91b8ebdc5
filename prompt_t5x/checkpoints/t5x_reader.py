"""Read T5X checkpoints: the legacy msgpack + TensorStore format and the Orbax format.

Layouts understood (facts from T5X's ``checkpoints.py``, checked against the real fixture):

* **Legacy** -- ``checkpoint_<step>/checkpoint`` is a flax msgpack blob
  ``{'version': 3, 'optimizer': {'target': params,
  'state': {'step': int32, 'param_states': ...}}}``.
  Small arrays are inline (msgpack ext type 1); partitioned ones are replaced by a TensorStore spec
  dict ``{'driver': 'zarr',
  'kvstore': {'driver': 'file'|'gfile'|'gcs', 'path': 'target.encoder...'},
  'metadata': {...}}`` whose path is *relative* to the checkpoint directory (gzip'ed zarr v2).
  A single msgpack file with every array inline is the same blob without specs.
* **Orbax** (current T5X) -- ``checkpoint_<step>/state/`` written by orbax's PyTree handler with the
  state dict ``{'target': params, 'state': {'step', 'param_states'}}``: ``_METADATA`` (JSON tree),
  one zarr array per leaf named by its ``.``-joined keys, or an OCDBT store (``manifest.ocdbt``);
  older orbax versions keep small leaves in an aggregate msgpack file ``state/checkpoint``.

Paths may be local or any TensorStore kvstore URL (``gs://bucket/dir``, ``memory://``...). Nothing
is read until asked: :class:`LazyArray` reads whole arrays, slices, or exactly the slices each
device of a ``jax.sharding.Sharding`` needs (so a model never has to fit on one host).
Leaves are ``prompt_t5x.checkpoints.lazy_arrays.LazyArray`` and parameters load through
``lazy_arrays.read_params``, the strict load HF imports share.
``prompt_t5x.checkpoints.t5x_writer`` writes
the legacy format.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from flax import serialization

from prompt_t5x.base import storage
from prompt_t5x.checkpoints import strict_loading
from prompt_t5x.checkpoints.lazy_arrays import CheckpointError, LazyArray, read_params

FORMAT_LEGACY = "T5X legacy"
FORMAT_ORBAX = "T5X Orbax"
_STEP_DIR = re.compile(r"^checkpoint_(\d+)$")


@dataclasses.dataclass
class T5XCheckpoint:
    """An opened checkpoint: every saved leaf as a :class:`LazyArray`, keyed by ``/`` names.

    ``arrays`` holds the whole saved state (``target/...`` parameters, ``state/step``,
    ``state/param_states/...``); :attr:`params` is the ``target`` subtree.
    """

    path: str
    format: str
    step: Optional[int]
    arrays: Dict[str, LazyArray]

    @property
    def params(self) -> Dict[str, LazyArray]:
        return {k[len("target/"):]: v for k, v in self.arrays.items() if k.startswith("target/")}

    def param_shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {k: v.shape for k, v in self.params.items()}

    def num_params(self) -> int:
        return int(sum(np.prod(s, dtype=np.int64) for s in self.param_shapes().values()))

    def infer_config(self, **overrides):
        return strict_loading.infer_config(self.param_shapes(), source=self.path, **overrides)

    def load_params(self, config=None, *, shardings: Any = None, dtype=None,
                    allow_missing: Sequence[str] = (), allow_unexpected: Sequence[str] = ()):
        """Strictly load the parameters for ``config`` (inferred from the shapes when None).

        Args:
          config: a ``t5.T5Config``; checked against the checkpoint's shapes (clear error if not).
          shardings: None (numpy arrays on the host), one ``Sharding`` for every parameter, a
            ``{name: Sharding}`` dict / nested tree, or ``fn(name, shape) -> Sharding``.
          dtype: cast floating weights to this dtype while reading (e.g. ``'bfloat16'``).
          allow_missing / allow_unexpected: glob patterns for intended partial loads; missing
            parameters are *absent* from the result (the caller fills them in explicitly).

        Returns:
          ``(params, config)``: nested parameter dict in our tree layout, and the config used.
        """
        shapes = self.param_shapes()
        if config is None:
            config = self.infer_config()
        else:
            strict_loading.check_config(shapes, config, source=self.path)
        params = read_params(self.params, config, source=self.path, shardings=shardings,
                             dtype=dtype, allow_missing=allow_missing,
                             allow_unexpected=allow_unexpected)
        return params, config


class Loaded(NamedTuple):
    params: Dict[str, Any]
    config: Any
    step: Optional[int]
    path: str
    format: str


def load_t5x(path: str, config=None, *, step: Optional[int] = None, shardings: Any = None,
             dtype=None, allow_missing: Sequence[str] = (),
             allow_unexpected: Sequence[str] = ()) -> Loaded:
    """Open the T5X checkpoint at ``path``; strictly load its parameters (see ``load_params``)."""
    ckpt = open_checkpoint(path, step=step)
    params, config = ckpt.load_params(config, shardings=shardings, dtype=dtype,
                                      allow_missing=allow_missing,
                                      allow_unexpected=allow_unexpected)
    return Loaded(params, config, ckpt.step, ckpt.path, ckpt.format)


# ----------------------------------------------------------------------------------------------
# Finding and opening checkpoints.


def checkpoint_steps(model_dir: str) -> list:
    """Steps of the ``checkpoint_<step>`` directories directly under ``model_dir``, ascending."""
    steps = set()
    for name in storage.listdir(model_dir):
        m = _STEP_DIR.match(name)
        if m:
            steps.add(int(m.group(1)))
    return sorted(steps)


def detect_format(path: str) -> Optional[str]:
    """``FORMAT_LEGACY`` / ``FORMAT_ORBAX`` for a checkpoint dir or msgpack file, else None."""
    if storage.is_file(path):
        head = storage.read_bytes(path, length=64)
        return FORMAT_LEGACY if head and _looks_like_msgpack_map(head) else None
    if storage.is_file(storage.join(path, "checkpoint")):
        return FORMAT_LEGACY
    if _orbax_state_dir(path) is not None:
        return FORMAT_ORBAX
    return None


def _looks_like_msgpack_map(head: bytes) -> bool:
    first = head[0]
    return 0x80 <= first <= 0x8F or first in (0xDE, 0xDF)  # fixmap / map16 / map32


def _orbax_state_dir(path: str) -> Optional[str]:
    for candidate in (storage.join(path, "state"), path):
        # Old orbax kept an aggregate msgpack 'checkpoint' inside state/ instead of _METADATA.
        if storage.is_file(storage.join(candidate, "_METADATA")) or (
                candidate.endswith("state") and storage.is_file(storage.join(candidate, "checkpoint"))):
            return candidate
    return None


def open_checkpoint(path: str, *, step: Optional[int] = None) -> T5XCheckpoint:
    """Open a T5X checkpoint lazily.

    ``path`` may be a model dir (the latest ``checkpoint_<step>`` is used unless ``step`` is
    given), a ``checkpoint_<step>`` dir (legacy or Orbax), an Orbax ``state`` dir, or a msgpack
    file.
    """
    path = str(path).rstrip("/") or str(path)
    fmt = detect_format(path)
    if fmt is None:
        steps = checkpoint_steps(path) if storage.is_dir(path) else []
        if not steps:
            raise CheckpointError(
                f"{path} is not a T5X checkpoint: expected a 'checkpoint' msgpack file (legacy "
                f"format), a 'state/_METADATA' (Orbax format) or checkpoint_<step> directories.")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise CheckpointError(f"no checkpoint_{step} under {path}; available steps: {steps}")
        return open_checkpoint(storage.join(path, f"checkpoint_{step}"))
    if fmt == FORMAT_LEGACY:
        return _open_legacy(path)
    return _open_orbax(path)


def _step_from_dirname(path: str) -> Optional[int]:
    parts = [p for p in path.split("/") if p]
    for part in reversed(parts[-2:]):
        m = _STEP_DIR.match(part)
        if m:
            return int(m.group(1))
    return None


def _is_ts_spec(node: Any) -> bool:
    return isinstance(node, dict) and "driver" in node and ("kvstore" in node or "path" in node)


def _flatten_state(tree: Any, prefix: str = "") -> Dict[str, Any]:
    """Flatten a restored state dict, treating TensorStore spec dicts as leaves."""
    if isinstance(tree, dict) and not _is_ts_spec(tree):
        flat = {}
        for key, value in tree.items():
            flat.update(_flatten_state(value, f"{prefix}/{key}" if prefix else str(key)))
        return flat
    return {} if tree is None else {prefix: tree}


def _legacy_spec(ckpt_dir: str, saved: dict, name: str) -> dict:
    """Turn a saved spec (relative path, writer's kvstore driver) into one readable from here."""
    kvstore = saved.get("kvstore") or {}
    relative = kvstore.get("path", saved.get("path"))
    if not relative:
        raise CheckpointError(f"TensorStore spec of {name!r} has no path: {saved}")
    meta = dict(saved.get("metadata") or {})
    if meta.get("dtype") == "<u2":
        raise CheckpointError(f"{name!r} is stored as uint16 (pre-2021 bfloat16 encoding, "
                              "checkpoint version 2); re-save it with a current T5X.")
    # chunks/compressor are read from the zarr metadata itself; keeping only the shape and dtype
    # lets a store written with other chunking still open.
    spec_meta = {k: meta[k] for k in ("shape", "dtype") if k in meta}
    return {"driver": saved.get("driver", "zarr"), "metadata": spec_meta,
            "kvstore": storage.kvstore_spec(storage.join(ckpt_dir, relative))}


def _open_legacy(path: str) -> T5XCheckpoint:
    file_path = path if storage.is_file(path) else storage.join(path, "checkpoint")
    ckpt_dir = storage.dirname(file_path)
    raw = storage.read_bytes(file_path)
    try:
        contents = serialization.msgpack_restore(raw)
    except Exception as e:
        raise CheckpointError(f"{file_path} is truncated or not a T5X msgpack checkpoint "
                              f"({type(e).__name__}: {e}); restore an intact copy.") from e
    if not isinstance(contents, dict):
        raise CheckpointError(f"{file_path} does not hold a T5X state dict")
    version = contents.get("version", 0)
    state = contents.get("optimizer") if version >= 1 else contents
    if not isinstance(state, dict) or "target" not in state:
        raise CheckpointError(f"{file_path} has no optimizer 'target' (found keys "
                              f"{sorted(contents)}); is it a T5X checkpoint?")
    arrays = {}
    for name, leaf in _flatten_state(state).items():
        if _is_ts_spec(leaf):
            arrays[name] = LazyArray(name, spec=_legacy_spec(ckpt_dir, leaf, name))
        else:
            arrays[name] = LazyArray(name, value=np.asarray(leaf))
    step = int(arrays["state/step"].read()) if "state/step" in arrays else _step_from_dirname(path)
    return T5XCheckpoint(path=path, format=FORMAT_LEGACY, step=step, arrays=arrays)


def _open_orbax(path: str) -> T5XCheckpoint:
    state_dir = _orbax_state_dir(path)
    meta_raw = storage.read_bytes(storage.join(state_dir, "_METADATA"))
    aggregate_raw = storage.read_bytes(storage.join(state_dir, "checkpoint"))
    aggregate = {}
    if aggregate_raw is not None:
        try:
            aggregate = _flatten_state(serialization.msgpack_restore(aggregate_raw))
        except Exception as e:
            raise CheckpointError(f"{state_dir}/checkpoint is corrupted: {e}") from e
    leaves: Dict[str, Optional[Any]] = {}  # name -> inline value, or None for a stored array
    use_ocdbt = use_zarr3 = False
    if meta_raw is not None:
        try:
            meta = json.loads(meta_raw)
            for entry in meta["tree_metadata"].values():
                keys = [str(k["key"]) for k in entry["key_metadata"]]
                name = "/".join(keys)
                skip = (entry.get("value_metadata") or {}).get("skip_deserialize", False)
                leaves[name] = aggregate[name] if skip and name in aggregate else None
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{state_dir}/_METADATA is corrupted: {e}") from e
        use_ocdbt = bool(meta.get("use_ocdbt", False))
        use_zarr3 = bool(meta.get("use_zarr3", False))
    else:  # pre-_METADATA orbax: the aggregate file holds the tree with placeholders
        for name, value in aggregate.items():
            is_placeholder = isinstance(value, str) and value.startswith("PLACEHOLDER://")
            leaves[name] = None if is_placeholder else value
        use_ocdbt = storage.is_file(storage.join(state_dir, "manifest.ocdbt"))
    arrays = {}
    for name, value in leaves.items():
        if value is not None:
            arrays[name] = LazyArray(name, value=np.asarray(value))
            continue
        stored = name.replace("/", ".")
        if use_ocdbt:
            kvstore = {"driver": "ocdbt", "base": storage.kvstore_spec(state_dir + "/"),
                       "path": stored}
        else:
            kvstore = storage.kvstore_spec(storage.join(state_dir, stored))
        arrays[name] = LazyArray(name, spec={"driver": "zarr3" if use_zarr3 else "zarr",
                                             "kvstore": kvstore})
    if not any(k.startswith("target/") for k in arrays):
        raise CheckpointError(f"{state_dir} holds no 'target' parameters; is it a T5X checkpoint?")
    step = int(arrays["state/step"].read()) if "state/step" in arrays else _step_from_dirname(path)
    return T5XCheckpoint(path=path, format=FORMAT_ORBAX, step=step, arrays=arrays)

