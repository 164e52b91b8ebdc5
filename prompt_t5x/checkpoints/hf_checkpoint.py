"""Hugging Face T5 directories: import (``config.json`` + safetensors) and export.

Import reads ``model.safetensors`` or a sharded set listed by ``model.safetensors.index.json``.
PyTorch pickles (``pytorch_model.bin``) are refused unless the caller asks for them explicitly,
and even then are opened with ``torch.load(weights_only=True)`` (no arbitrary code).

Safetensors are parsed here (8-byte little-endian header length, JSON header of
``{name: {dtype, shape, data_offsets}}``, then raw little-endian data) and memory-mapped, so
bfloat16 files load (the ``safetensors`` numpy backend cannot represent bfloat16) and only the
tensors actually converted are touched.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Dict, Optional, Sequence

import ml_dtypes
import numpy as np

from prompt_t5x.checkpoints import hf_interop, lazy_arrays, strict_loading

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
              "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
              "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class HFCheckpointError(ValueError):
    """The directory is not an HF T5 checkpoint we can read safely."""


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    """``{name: array}`` of a .safetensors file; arrays are read-only memory maps."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise HFCheckpointError(f"{path}: too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > size - 8:
            raise HFCheckpointError(f"{path}: header length {header_len} exceeds the file size "
                                    f"{size} (truncated or not safetensors)")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as e:
            raise HFCheckpointError(f"{path}: unreadable safetensors header ({e})") from e
    data_start = 8 + header_len
    out = {}
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start,
                     shape=(size - data_start,)) if size > data_start else np.zeros(0, np.uint8)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise HFCheckpointError(f"{path}: tensor {name!r} has unsupported dtype "
                                    f"{info['dtype']}")
        start, end = info["data_offsets"]
        if end > data.shape[0]:
            raise HFCheckpointError(f"{path}: tensor {name!r} ends at byte {end} but the data "
                                    f"section has {data.shape[0]} bytes (file truncated?)")
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        out[name] = data[start:end].view(dtype).reshape(info["shape"])
    return out


def write_safetensors(path: str, tensors: Dict[str, np.ndarray],
                      metadata: Optional[Dict[str, str]] = None) -> None:
    """Write ``tensors`` as a .safetensors file (atomically: temporary file + rename)."""
    header: Dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset, arrays = 0, []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if arr.dtype not in _ST_NAMES:
            raise ValueError(f"cannot store {name!r} of dtype {arr.dtype} in safetensors")
        header[name] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header so data starts 8-aligned
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())
    os.replace(tmp, path)


def is_hf_t5_dir(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, CONFIG_FILE)) and any(
        os.path.isfile(os.path.join(directory, f))
        for f in (SAFETENSORS_FILE, SAFETENSORS_INDEX, BIN_FILE, BIN_INDEX))


def read_hf_config(directory: str) -> Dict[str, Any]:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise HFCheckpointError(f"{directory} has no {CONFIG_FILE}; not an HF model directory")
    with open(path) as f:
        return json.load(f)


def _shard_files(directory: str, index_name: str) -> Sequence[str]:
    with open(os.path.join(directory, index_name)) as f:
        weight_map = json.load(f)["weight_map"]
    return sorted(set(weight_map.values()))


def read_hf_state_dict(directory: str, *, allow_bin: bool = False) -> Dict[str, np.ndarray]:
    """All tensors of an HF model directory (single or sharded safetensors; .bin on request)."""
    join = lambda name: os.path.join(directory, name)  # noqa: E731
    if os.path.isfile(join(SAFETENSORS_FILE)):
        return read_safetensors(join(SAFETENSORS_FILE))
    if os.path.isfile(join(SAFETENSORS_INDEX)):
        state = {}
        for shard in _shard_files(directory, SAFETENSORS_INDEX):
            if not os.path.isfile(join(shard)):
                raise HFCheckpointError(f"{directory}: shard {shard} listed in "
                                        f"{SAFETENSORS_INDEX} is missing")
            state.update(read_safetensors(join(shard)))
        return state
    bins = ([BIN_FILE] if os.path.isfile(join(BIN_FILE)) else
            _shard_files(directory, BIN_INDEX) if os.path.isfile(join(BIN_INDEX)) else [])
    if not bins:
        raise HFCheckpointError(f"{directory} holds no model weights ({SAFETENSORS_FILE}, "
                                f"{SAFETENSORS_INDEX} or {BIN_FILE})")
    if not allow_bin:
        raise HFCheckpointError(
            f"{directory} only has PyTorch pickle weights ({bins[0]}); they are not loaded by "
            "default. Convert them to safetensors, or pass allow_bin=True (needs torch; loads "
            "with torch.load(weights_only=True)).")
    try:
        import torch
    except ImportError as e:
        raise HFCheckpointError("allow_bin=True needs PyTorch installed (pip install torch)") from e
    state = {}
    for name in bins:
        loaded = torch.load(join(name), map_location="cpu", weights_only=True)
        state.update({k: v.detach().float().numpy() if v.dtype == torch.bfloat16 else
                      v.detach().numpy() for k, v in loaded.items()})
    return state


def load_hf_t5(directory: str, config=None, *, dtype=None, shardings: Any = None,
               allow_bin: bool = False, allow_missing: Sequence[str] = (),
               allow_unexpected: Sequence[str] = ()):
    """Import an HF T5 1.1 directory into our tree: returns ``(params, config)``.

    ``config`` defaults to the one in ``config.json``; when given, the weights must fit it
    (strict check, one error listing every difference). ``dtype`` casts floating weights;
    ``shardings`` (one Sharding, a tree/dict of them, or ``fn(name, shape)``) places each
    parameter (``lazy_arrays.read_params``, as for T5X checkpoints).
    """
    directory = os.fspath(directory)
    hf_config = read_hf_config(directory)
    if config is None:
        try:
            config = hf_interop.config_from_hf(hf_config)
        except (ValueError, KeyError) as e:
            raise HFCheckpointError(f"{directory}/{CONFIG_FILE}: {e}") from e
    params = hf_interop.params_from_hf_state_dict(
        read_hf_state_dict(directory, allow_bin=allow_bin), config)
    arrays = {name: lazy_arrays.LazyArray(name, value=value)
              for name, value in strict_loading.flatten(params).items()}
    params = lazy_arrays.read_params(arrays, config, source=directory, shardings=shardings,
                                     dtype=dtype, allow_missing=allow_missing,
                                     allow_unexpected=allow_unexpected)
    return params, config


def save_hf_t5(directory: str, params: Dict[str, Any], config, *,
               max_shard_bytes: Optional[int] = None) -> str:
    """Write ``params`` as an HF ``T5ForConditionalGeneration`` directory (float32 safetensors).

    With ``max_shard_bytes`` the weights are split into ``model-0000i-of-0000n.safetensors``
    files plus ``model.safetensors.index.json``, as ``save_pretrained`` does for large models.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    state = hf_interop.hf_state_dict_from_params(params)
    # HF ties both stacks' embed_tokens to ``shared``; save_pretrained stores ``shared`` only.
    for tied in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        state.pop(tied, None)
    hf_config = dict(hf_interop.hf_config_from(config), torch_dtype="float32")
    if max_shard_bytes is None:
        write_safetensors(os.path.join(directory, SAFETENSORS_FILE), state)
    else:
        shards, current, size = [], {}, 0
        for name in sorted(state):
            if current and size + state[name].nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[name] = state[name]
            size += state[name].nbytes
        shards.append(current)
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(os.path.join(directory, fname), shard)
            weight_map.update({name: fname for name in shard})
        index = {"metadata": {"total_size": int(sum(v.nbytes for v in state.values()))},
                 "weight_map": weight_map}
        with open(os.path.join(directory, SAFETENSORS_INDEX), "w") as f:
            json.dump(index, f, indent=2)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(hf_config, f, indent=2)
    return directory
