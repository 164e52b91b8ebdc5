"""Where checkpoints live: local files or TensorStore kvstore URLs (``gs://bucket/dir``,
``memory://``...), behind one small set of path functions.

Local paths use the OS (and atomic temporary-file + rename writes); URLs go through a TensorStore
kvstore, so a T5X checkpoint on GCS is read with the same code as one on disk.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import tensorstore as ts

# One TensorStore context per process: it owns the chunk cache and the concurrency limits, and
# makes ``memory://`` stores visible across opens (used by the tests of the remote-path code).
TS_CONTEXT = ts.Context()


def is_remote(path: str) -> bool:
    return "://" in str(path)


def kvstore_spec(path: str):
    """TensorStore kvstore spec for a local path or a kvstore URL."""
    path = str(path)
    if is_remote(path):
        return path
    spec = {"driver": "file", "path": os.path.abspath(path)}
    if path.endswith("/"):
        spec["path"] += "/"
    return spec


def join(path: str, *parts: str) -> str:
    return "/".join([str(path).rstrip("/")] + [p.strip("/") for p in parts])


def dirname(path: str) -> str:
    path = str(path).rstrip("/")
    return path.rsplit("/", 1)[0] if is_remote(path) else os.path.dirname(os.path.abspath(path))


def kvstore(directory: str) -> ts.KvStore:
    return ts.KvStore.open(kvstore_spec(str(directory).rstrip("/") + "/"),
                           context=TS_CONTEXT).result()


def read_bytes(path: str, length: Optional[int] = None) -> Optional[bytes]:
    """Contents of a file (first ``length`` bytes), or None if there is no such file."""
    path = str(path)
    if not is_remote(path):
        if not os.path.isfile(path):
            return None
        with open(path, "rb") as f:
            return f.read() if length is None else f.read(length)
    parent, name = path.rstrip("/").rsplit("/", 1)
    result = kvstore(parent).read(name).result()
    if result.state != "value":
        return None
    data = bytes(result.value)
    return data if length is None else data[:length]


def is_file(path: str) -> bool:
    return os.path.isfile(path) if not is_remote(path) else read_bytes(path) is not None


def listdir(path: str) -> list:
    """Names directly under a directory (files and sub-directories)."""
    if not is_remote(path):
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    keys = kvstore(path).list().result()
    return sorted({bytes(k).decode().split("/", 1)[0] for k in keys})


def is_dir(path: str) -> bool:
    return os.path.isdir(path) if not is_remote(path) else bool(listdir(path))


def read_json(path: str) -> Optional[Any]:
    """A local JSON file's value, or None when it is missing or unreadable (a file another
    process is rewriting, or one cut off by a kill): callers treat that as "no record"."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write a whole file; locally via a temporary file + rename so readers never see half."""
    path = str(path)
    if is_remote(path):
        parent, name = path.rstrip("/").rsplit("/", 1)
        kvstore(parent).write(name, data).result()  # object stores replace objects atomically
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_npy_atomic(path: str, array) -> None:
    """``np.save`` of ``array`` to ``path``, through ``write_bytes_atomic``."""
    import io

    import numpy as np
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    write_bytes_atomic(path, buffer.getvalue())
