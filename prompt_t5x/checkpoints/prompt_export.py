"""Prompt export: get a trained prompt out (``.npy`` or a Hugging Face PEFT adapter) and
bring PEFT prompt adapters back.

A PEFT prompt-tuning adapter is a directory with ``adapter_config.json`` (``peft_type:
PROMPT_TUNING``) and ``adapter_model.safetensors`` holding one tensor, ``prompt_embeddings``
``[num_virtual_tokens * num_transformer_submodules, token_dim]`` float32 (facts checked against
peft 0.21's ``save_pretrained``). For ``SEQ_2_SEQ_LM`` PEFT prepends the first
``num_virtual_tokens`` rows to the encoder's input embeddings (with an all-ones mask) -- exactly our
``prompt_mode='prepend'`` -- so the adapter is written with ``num_transformer_submodules=1``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple

import numpy as np

from prompt_t5x.base import storage
from prompt_t5x.checkpoints import hf_checkpoint

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PROMPT_KEY = "prompt_embeddings"


class ExportError(ValueError):
    """The source holds no prompt we can export, or the destination is unusable."""


def write_peft_prompt_adapter(directory: str, prompt: Any, *,
                              base_model_name_or_path: Optional[str] = None,
                              num_layers: Optional[int] = None,
                              num_attention_heads: Optional[int] = None) -> str:
    """Write ``prompt`` [P, D] as a PEFT prompt-tuning adapter for a seq2seq (T5) model."""
    prompt = np.asarray(prompt, dtype=np.float32)
    if prompt.ndim != 2:
        raise ExportError(f"a prompt must be 2-D [length, d_model], got shape {prompt.shape}")
    config = {
        "peft_type": "PROMPT_TUNING", "task_type": "SEQ_2_SEQ_LM",
        "num_virtual_tokens": int(prompt.shape[0]), "token_dim": int(prompt.shape[1]),
        "num_transformer_submodules": 1, "num_layers": num_layers,
        "num_attention_heads": num_attention_heads, "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None, "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "inference_mode": True, "modules_to_save": None,
        "auto_mapping": None,
    }
    return write_peft_adapter(directory, {PEFT_PROMPT_KEY: prompt}, config)


def write_peft_adapter(directory: str, tensors: Dict[str, np.ndarray],
                       config: Dict[str, Any]) -> str:
    """A PEFT adapter directory: ``adapter_model.safetensors`` + ``adapter_config.json``, each
    written atomically (prompt and prefix adapters alike)."""
    os.makedirs(directory, exist_ok=True)
    hf_checkpoint.write_safetensors(os.path.join(directory, ADAPTER_WEIGHTS), tensors,
                                    metadata={"format": "pt"})
    storage.write_bytes_atomic(os.path.join(directory, ADAPTER_CONFIG),
                               json.dumps(config, indent=2).encode("utf-8"))
    return directory


def is_peft_adapter(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def read_peft_prompt_adapter(directory: str) -> Tuple[np.ndarray, Dict[str, Any]]:
    """The encoder prompt [P, D] (float32) of a PEFT prompt-tuning adapter, and its config."""
    config_path = os.path.join(directory, ADAPTER_CONFIG)
    if not os.path.isfile(config_path):
        raise ExportError(f"{directory} has no {ADAPTER_CONFIG}; not a PEFT adapter")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("peft_type") != "PROMPT_TUNING":
        raise ExportError(f"{directory} is a PEFT {config.get('peft_type')} adapter; only "
                          "PROMPT_TUNING adapters hold a soft prompt")
    weights = os.path.join(directory, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        raise ExportError(f"{directory} has no {ADAPTER_WEIGHTS} (only safetensors adapters "
                          "are read; convert adapter_model.bin with PEFT first)")
    tensors = hf_checkpoint.read_safetensors(weights)
    if PEFT_PROMPT_KEY not in tensors:
        raise ExportError(f"{weights} has no {PEFT_PROMPT_KEY!r} tensor (has {sorted(tensors)})")
    table = np.asarray(tensors[PEFT_PROMPT_KEY], dtype=np.float32)
    length = int(config.get("num_virtual_tokens") or table.shape[0])
    # Rows past num_virtual_tokens belong to the decoder submodule, which PEFT's seq2seq prompt
    # tuning never uses; the encoder prompt is the first block.
    return np.array(table[:length]), config


def load_prompt(source: str, *, step: Optional[int] = None) -> Tuple[np.ndarray, Dict[str, Any]]:
    """A prompt [P, D] from a .npy file, a PEFT adapter or a prompt_t5x training checkpoint.

    Returns ``(prompt, info)`` where ``info`` has ``kind``, ``step`` and, for training
    checkpoints, the saved ``model_config``.
    """
    from prompt_t5x.checkpoints import train_checkpoints
    from prompt_t5x.methods import prompt_init

    source = os.fspath(source)
    if os.path.isfile(source) and source.endswith(".npy"):
        return prompt_init.from_npy(source), {"kind": "npy", "step": None}
    if os.path.isdir(source) and is_peft_adapter(source):
        prompt, config = read_peft_prompt_adapter(source)
        return prompt, {"kind": "peft", "step": None, "peft_config": config}
    model_dir = train_checkpoints.find_model_dir(source) if os.path.isdir(source) else None
    if model_dir is None:
        raise ExportError(f"{source} is not a prompt .npy file, a PEFT prompt adapter or a "
                          "prompt_t5x training checkpoint (model dir with checkpoints/)")
    params, used_step = train_checkpoints.read_trainable(model_dir, step)
    if "prompt" not in params:
        raise ExportError(f"training checkpoint {model_dir} (step {used_step}) has no prompt; "
                          f"its trainable parameters are {sorted(params)[:5]}")
    manifest = train_checkpoints.TrainCheckpointer(
        model_dir, read_only=True).read_manifest(used_step)
    return np.asarray(params["prompt"], np.float32), {
        "kind": "training checkpoint", "step": used_step,
        "model_config": manifest.get("model_config")}


def export_prompt(source: str, out: str, *, fmt: Optional[str] = None, step: Optional[int] = None,
                  base_model_name_or_path: Optional[str] = None) -> Tuple[str, np.ndarray]:
    """Write the prompt of ``source`` to ``out`` as ``fmt`` ('npy' or 'peft'; default: by the
    extension of ``out``). Returns ``(fmt, prompt)``."""
    fmt = fmt or ("npy" if out.endswith(".npy") else "peft")
    if fmt not in ("npy", "peft"):
        raise ExportError(f"unknown export format {fmt!r}; choose 'npy' or 'peft'")
    prompt, info = load_prompt(source, step=step)
    if fmt == "npy":
        if not out.endswith(".npy"):
            raise ExportError(f"--format npy needs an output path ending in .npy, got {out}")
        storage.write_npy_atomic(out, prompt.astype(np.float32))
    else:
        if os.path.isfile(out):
            raise ExportError(f"a PEFT adapter is a directory; {out} is an existing file")
        model_config = info.get("model_config") or {}
        write_peft_prompt_adapter(out, prompt, base_model_name_or_path=base_model_name_or_path,
                                  num_layers=model_config.get("num_encoder_layers"),
                                  num_attention_heads=model_config.get("num_heads"))
    return fmt, prompt
