"""Any method's trained state as a file: ``.safetensors`` (or ``.npy``) plus its JSON config.

``export_method(model_dir, out)`` reads a training run's trainable tree and its manifest,
rebuilds the method (``methods.registry``) and writes ``method.export(trainable)``: the
inference form's flat named tables (prefix-tuning's MLP collapsed to the direct key/value table,
P-tuning's encoder to its output embeddings, ...) and the config of the method that runs them.

- ``.safetensors``: every table; the safetensors metadata holds ``prompt_t5x_method`` (the
  method config JSON) and ``model_config`` (the T5 config JSON).
- ``.npy``: only for a method whose inference form is one table; the JSON goes to a sidecar
  ``<out>.json``.

``read_method_file(path)`` reads either back; ``prompt_t5x.inference.prompted_model`` accepts
such a file wherever it accepts a prompt, so an exported method evaluates like its run dir.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Dict, Optional, Tuple

import numpy as np

from prompt_t5x.base import storage
from prompt_t5x.checkpoints import hf_checkpoint, train_checkpoints

METHOD_KEY = "prompt_t5x_method"
MODEL_KEY = "model_config"


class MethodExportError(ValueError):
    pass


def run_method(model_dir: str, step: Optional[int] = None):
    """(method, trainable numpy tree, manifest, step) of a training model dir."""
    from prompt_t5x.methods import registry
    from prompt_t5x.model import t5 as t5_lib
    found = train_checkpoints.find_model_dir(model_dir)
    if found is None:
        raise MethodExportError(f"{model_dir} is not a prompt_t5x training model dir")
    trainable, used = train_checkpoints.read_trainable(found, step)
    manifest = train_checkpoints.TrainCheckpointer(found, read_only=True).read_manifest(used)
    method_config = manifest_method_config(manifest)
    config = t5_lib.T5Config.from_dict(manifest["model_config"])
    try:
        method = registry.build(t5_lib.T5(config), method_config)
    except registry.UnknownMethodError as e:
        raise MethodExportError(f"{found}: {e}") from None
    return method, trainable, manifest, used


def manifest_method_config(manifest: Dict[str, Any]) -> Dict[str, Any]:
    """The method config a manifest records (runs from before it was recorded: prompt tuning
    or model tuning from the run info)."""
    run = manifest.get("run") or {}
    if run.get("method_config"):
        return dict(run["method_config"])
    kind = run.get("method", "prompt_tuning")
    if kind == "prompt_tuning":
        return {"kind": kind, "prompt_length": int(run.get("prompt_length", 100)),
                "prompt_mode": run.get("prompt_mode", "prepend")}
    return {"kind": kind}


def export_method(model_dir: str, out: str, *, step: Optional[int] = None
                  ) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    """Write the run's inference tables to ``out`` (.safetensors or .npy); returns them and
    the method config written."""
    method, trainable, manifest, _ = run_method(model_dir, step)
    tables, method_config = method.export(trainable)
    model_config = manifest["model_config"]
    if out.endswith(".safetensors"):
        hf_checkpoint.write_safetensors(
            out, {k: np.asarray(v, np.float32) for k, v in tables.items()},
            metadata={METHOD_KEY: json.dumps(method_config), MODEL_KEY: json.dumps(model_config),
                      "format": "np"})
    elif out.endswith(".npy"):
        if len(tables) != 1:
            raise MethodExportError(
                f"{method.kind} exports {len(tables)} tables ({', '.join(sorted(tables))}); "
                "a .npy holds one: export to a .safetensors file instead")
        (table,) = tables.values()
        storage.write_npy_atomic(out, np.asarray(table, np.float32))
        storage.write_bytes_atomic(out[:-4] + ".json", json.dumps(
            {METHOD_KEY: method_config, MODEL_KEY: model_config, "table": next(iter(tables))},
            indent=1).encode("utf-8"))
    else:
        raise MethodExportError(f"--out {out}: give a .safetensors or .npy path")
    return tables, method_config


def read_metadata(path: str) -> Dict[str, str]:
    """The ``__metadata__`` of a safetensors file."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return dict(header.get("__metadata__") or {})


def is_method_file(path: str) -> bool:
    """A file written by ``export_method`` (a safetensors file or a .npy with its sidecar)."""
    if path.endswith(".safetensors") and os.path.isfile(path):
        try:
            return METHOD_KEY in read_metadata(path)
        except (OSError, ValueError, struct.error):
            return False
    return path.endswith(".npy") and os.path.isfile(path[:-4] + ".json") and \
        METHOD_KEY in (storage.read_json(path[:-4] + ".json") or {})


def read_method_file(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, Any], Dict[str, Any]]:
    """(tables, method config, model config) of an exported method file."""
    if path.endswith(".safetensors"):
        meta = read_metadata(path)
        if METHOD_KEY not in meta:
            raise MethodExportError(f"{path} was not written by prompt-t5x export (no "
                                    f"{METHOD_KEY!r} metadata)")
        tables = {k: np.asarray(v, np.float32)
                  for k, v in hf_checkpoint.read_safetensors(path).items()}
        return tables, json.loads(meta[METHOD_KEY]), json.loads(meta.get(MODEL_KEY, "{}"))
    side = storage.read_json(path[:-4] + ".json") or {}
    if METHOD_KEY not in side:
        raise MethodExportError(f"{path} has no sidecar {path[:-4]}.json with its method config")
    return ({side.get("table", "prompt"): np.load(path).astype(np.float32)}, side[METHOD_KEY],
            side.get(MODEL_KEY) or {})
