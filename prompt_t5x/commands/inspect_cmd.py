"""``prompt-t5x inspect PATH``: say what a path holds -- format, step, T5 config, parameter count.

Understood: T5X legacy and Orbax checkpoints (a model dir, a ``checkpoint_<step>`` dir or a
msgpack file; local or ``gs://``), Hugging Face T5 directories, prompt_t5x training checkpoints,
prompt ``.npy`` files and PEFT prompt adapters. Anything else exits with status 2.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Dict, List, Optional

import numpy as np

CONFIG_LABELS = (("emb_dim", "d_model"), ("num_heads", "heads"), ("head_dim", "d_kv"),
                 ("mlp_dim", "d_ff"), ("num_encoder_layers", "encoder layers"),
                 ("num_decoder_layers", "decoder layers"), ("vocab_size", "vocab"),
                 ("relpos_buckets", "relpos buckets"))


def _config_lines(config: Any) -> List[str]:
    get = (lambda k: config.get(k)) if isinstance(config, dict) else (
        lambda k: getattr(config, k, None))
    return [f"  {label:<15} {get(field)}" for field, label in CONFIG_LABELS
            if get(field) is not None]


def describe(path: str) -> Dict[str, Any]:
    """``{'format', 'step', 'config', 'num_params', 'details'}`` for ``path``.

    Raises ``ValueError`` when the path is not something we understand.
    """
    from prompt_t5x.base import storage
    from prompt_t5x.checkpoints import (
        hf_checkpoint,
        prompt_export,
        strict_loading,
        t5x_reader,
        train_checkpoints,
    )

    remote = storage.is_remote(path)
    if not remote and not os.path.exists(path):
        raise ValueError(f"{path} does not exist")
    if not remote and os.path.isfile(path) and path.endswith(".npy"):
        prompt = np.load(path, allow_pickle=False, mmap_mode="r")
        return {"format": "prompt .npy", "step": None, "config": None,
                "num_params": int(prompt.size),
                "details": [f"  shape           {list(prompt.shape)} ({prompt.dtype})"]}
    if not remote and os.path.isdir(path) and prompt_export.is_peft_adapter(path):
        prompt, config = prompt_export.read_peft_prompt_adapter(path)
        return {"format": "PEFT prompt-tuning adapter", "step": None, "config": None,
                "num_params": int(prompt.size),
                "details": [f"  prompt          [{prompt.shape[0]}, {prompt.shape[1]}]",
                            f"  task_type       {config.get('task_type')}",
                            f"  base model      {config.get('base_model_name_or_path')}"]}
    if not remote and os.path.isdir(path) and hf_checkpoint.is_hf_t5_dir(path):
        from prompt_t5x.checkpoints import hf_interop

        config = hf_interop.config_from_hf(hf_checkpoint.read_hf_config(path))
        return {"format": "HF T5 (transformers)", "step": None, "config": config,
                "num_params": config.num_params, "details": []}
    model_dir = None if remote or not os.path.isdir(path) else train_checkpoints.find_model_dir(
        path)
    if model_dir is not None:
        ckpt = train_checkpoints.TrainCheckpointer(model_dir, read_only=True)
        manifest = ckpt.read_manifest()
        params, step = train_checkpoints.read_trainable(model_dir, manifest["step"])
        sizes = {k: list(np.shape(v)) for k, v in strict_loading.flatten(params).items()}
        details = [f"  steps saved     {ckpt.all_steps()}",
                   f"  frozen model    {manifest.get('frozen_checkpoint')}",
                   f"  trainable       {sizes if len(sizes) <= 4 else f'{len(sizes)} arrays'}"]
        return {"format": "prompt_t5x training checkpoint", "step": step,
                "config": manifest.get("model_config"),
                "num_params": int(sum(np.prod(s, dtype=np.int64) for s in sizes.values())),
                "details": details}
    try:
        ckpt = t5x_reader.open_checkpoint(path)
    except t5x_reader.CheckpointError as e:
        raise ValueError(
            f"{path} is not a checkpoint prompt-t5x understands (T5X legacy/Orbax, HF T5 "
            f"directory, prompt_t5x training checkpoint, prompt .npy or PEFT adapter): {e}") from e
    try:
        config = ckpt.infer_config()
    except ValueError as e:
        config, note = None, [f"  config          not inferable: {e}"]
    else:
        note = []
    return {"format": ckpt.format, "step": ckpt.step, "config": config,
            "num_params": ckpt.num_params(), "details": [f"  path            {ckpt.path}"] + note}


def format_description(path: str, info: Dict[str, Any]) -> str:
    lines = [f"{path}", f"  format          {info['format']}"]
    if info.get("step") is not None:
        lines.append(f"  step            {info['step']}")
    lines += info.get("details", [])
    if info.get("config") is not None:
        lines.append("  T5 config:")
        lines += ["  " + line for line in _config_lines(info["config"])]
    lines.append(f"  parameters      {info['num_params']:,}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    from prompt_t5x.base.errors import UsageError

    parser = argparse.ArgumentParser(prog="prompt-t5x inspect",
                                     description="Print what a checkpoint / prompt path holds.")
    parser.add_argument("path", help="T5X checkpoint, HF T5 dir, prompt_t5x model dir, "
                                     "prompt .npy or PEFT adapter (local or gs://)")
    args = parser.parse_args(argv)
    try:
        info = describe(args.path)
    except Exception as e:  # any failure to understand the path is a usage error (exit 2)
        raise UsageError(str(e)) from e
    print(format_description(args.path, info))
    return 0
