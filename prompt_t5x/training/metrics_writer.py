"""Training metrics to disk: a JSONL file (always) and TensorBoard scalars (no TensorFlow needed).

TensorBoard reads ``events.out.tfevents.*`` files: a TFRecord stream of ``Event`` protocol
buffers. Scalars need only a handful of proto fields, so this module encodes them by hand
(protobuf wire format + TFRecord framing with masked CRC-32C) instead of importing TensorFlow,
``tensorboardX`` or ``clu``. Measured, not assumed: ``import tensorboardX`` (2.6.5) imports
PyTorch whenever it is installed (its writer module tries ``import torch`` at import time), which
took 3.9 s on the 2-core CPU machine (6-7 s under load) against 0.05 s for this module; the test
environment and the GPU image both have PyTorch, and start-up time is a feature here. The event
file is checked against TensorFlow's own reader in tests/test_training_loop.py. Fields used
(tensorflow/core/util/event.proto, summary.proto):

  Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
  Summary { repeated Value value = 1; }
  Value   { string tag = 1; float simple_value = 2; }

The JSONL file (``metrics.jsonl``, one ``{"step": ..., "split": ..., name: value}`` object per
line) is the machine-readable record the scaling runs and tests read back.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import time
from typing import Mapping, Optional

from prompt_t5x.base.errors import keep_first_error

# --------------------------------------------------------------------------- CRC-32C ----
_CRC32C_POLY = 0x82F63B78  # Castagnoli, reflected


def _crc32c_table():
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _CRC32C_POLY if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    """TFRecord's CRC masking: rotate right by 15 and add a constant (mod 2^32)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """One TFRecord: length, masked CRC of the length, payload, masked CRC of the payload."""
    length = struct.pack("<Q", len(data))
    return (length + struct.pack("<I", _masked_crc(length)) + data
            + struct.pack("<I", _masked_crc(data)))


# ----------------------------------------------------------------- protobuf wire format ----
def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1  # int64 two's complement, as protobuf encodes negatives
    while True:
        bits = n & 0x7F
        n >>= 7
        if n:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint((number << 3) | 2) + _varint(len(payload)) + payload


def scalar_event(step: int, scalars: Mapping[str, float], wall_time: Optional[float] = None
                 ) -> bytes:
    """A serialized ``Event`` holding one ``simple_value`` per tag."""
    values = b"".join(
        _field_bytes(1, _field_bytes(1, tag.encode("utf-8"))
                     + _varint((2 << 3) | 5) + struct.pack("<f", float(value)))
        for tag, value in scalars.items())
    return (_varint((1 << 3) | 1) + struct.pack("<d", time.time() if wall_time is None
                                                 else wall_time)
            + _varint(2 << 3) + _varint(int(step)) + _field_bytes(5, values))


def version_event() -> bytes:
    return (_varint((1 << 3) | 1) + struct.pack("<d", time.time())
            + _field_bytes(3, b"brain.Event:2"))


# ---------------------------------------------------------------------------- writers ----
class MetricsWriter:
    """Writes scalars for one split (``train`` or ``validation``) to JSONL + TensorBoard.

    TensorBoard files go to ``<model_dir>/<split>/`` (one run per split in the TensorBoard UI,
    as T5X lays them out); the JSONL file is shared: ``<model_dir>/metrics.jsonl``.
    """

    def __init__(self, model_dir: str, split: str, tensorboard: bool = True,
                 enabled: bool = True):
        """``enabled=False`` (every host but process 0 of a multi-host run) writes nothing."""
        self.split = split
        self._jsonl = self._events = None
        if not enabled:
            return
        os.makedirs(model_dir, exist_ok=True)
        self._jsonl = open(os.path.join(model_dir, "metrics.jsonl"), "a", encoding="utf-8")
        self._events = None
        if tensorboard:
            event_dir = os.path.join(model_dir, split)
            os.makedirs(event_dir, exist_ok=True)
            name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
            self._events = open(os.path.join(event_dir, name), "ab")
            self._events.write(tfrecord(version_event()))

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if self._jsonl is None:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        record = {"step": int(step), "split": self.split}
        # JSON has no NaN/Inf: write them as strings so the file stays parseable.
        record.update({k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._events is not None:
            self._events.write(tfrecord(scalar_event(step, clean)))
            self._events.flush()

    def close(self) -> None:
        # Flushing can fail again on the full disk that is already being reported.
        if self._jsonl is not None:
            keep_first_error(self._jsonl.close, "metrics.jsonl")
        if self._events is not None:
            keep_first_error(self._events.close, "the event file")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def drop_records_after(model_dir: str, step: int) -> int:
    """On resuming from ``step``: remove the ``metrics.jsonl`` records a killed run wrote past its
    last checkpoint (the resumed run writes those steps again), and a last line cut off mid-write.
    Rewritten atomically; returns how many lines were dropped."""
    from prompt_t5x.base import storage
    path = os.path.join(model_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
        try:
            if int(json.loads(line)["step"]) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            pass   # a record cut off by the kill
    if len(kept) != len(lines):
        storage.write_bytes_atomic(path, "".join(kept).encode("utf-8"))
    return len(lines) - len(kept)


def read_jsonl(path: str):
    """All records of a ``metrics.jsonl`` file (NaN/Inf strings turned back into floats)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                out.append({k: (float(v) if isinstance(v, str) and v in ("nan", "inf", "-inf")
                                else v) for k, v in rec.items()})
    return out
