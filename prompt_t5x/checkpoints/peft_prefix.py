"""Hugging Face PEFT prefix-tuning adapters for T5 <-> our ``prefix_tuning`` tables.

What PEFT 0.21 does with a ``PrefixTuningConfig`` on ``T5ForConditionalGeneration`` (read from
``peft_model.PeftModel.get_prompt``, checked against transformers' T5 in
tests/test_peft_prefix.py):

- The adapter holds one tensor, ``prompt_embeddings`` ``[P, L * 2 * token_dim]`` (with
  ``prefix_projection`` the saved tensor is already the MLP's output, so it reads the same).
  ``L`` is the config's ``num_layers`` (T5's *encoder* depth when PEFT infers it) and
  ``token_dim`` must be ``heads * d_kv`` (PEFT's default, ``d_model``, only fits T5 models where
  the two are equal: not T5 1.1).
- It is viewed as ``2L`` rows of ``[P, heads, d_kv]``, **concatenated with itself** (``4L`` rows:
  seq2seq has two "transformer submodules") and cut into ``L`` groups of 4 rows. Group ``j``
  becomes decoder layer ``j``'s (self key, self value, cross key, cross value).
- The cross-attention half is then replaced by an empty cache: **cross-attention prefixes are
  silently dropped**, and nothing reaches the encoder. Only decoder self-attention is prefixed.
- So decoder layer ``j`` uses rows ``(4j) mod 2L`` (key) and ``(4j + 1) mod 2L`` (value): for even
  ``L``, layers ``j`` and ``j + L/2`` **share one prefix**, and the rows ``4j + 2, 4j + 3`` are
  trained by nothing (they only fed the dropped cross cache). For odd ``L`` no two layers share
  and every row is used (one layer's "cross" rows are another layer's self-attention rows).
- The prefix is a past cache, so T5's relative position bias treats it as ``P`` real tokens
  before the decoder inputs: our ``prefix_bias='leading'``.

Hence a PEFT adapter is our ``prefix_tuning`` with ``parts=['decoder_self']``, direct tables
and ``prefix_bias='leading'``; exporting the other way needs exactly that method, with equal
tables on the layers PEFT shares.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from prompt_t5x.checkpoints import hf_checkpoint, prompt_export

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_KEY = "prompt_embeddings"


class PeftPrefixError(ValueError):
    pass


def decoder_rows(num_layers: int) -> Tuple[Tuple[int, int], ...]:
    """(key row, value row) of PEFT's ``2L`` rows that decoder layer j = 0..L-1 uses."""
    return tuple(((4 * j) % (2 * num_layers), (4 * j + 1) % (2 * num_layers))
                 for j in range(num_layers))


def prefixes_from_table(table: np.ndarray, num_layers: int, heads: int, head_dim: int
                        ) -> Tuple[np.ndarray, np.ndarray]:
    """PEFT ``[P, L * 2 * heads * head_dim]`` -> decoder self key, value ``[L, P, H, Dh]``."""
    length = table.shape[0]
    rows = np.asarray(table, np.float32).reshape(length, 2 * num_layers, heads, head_dim)
    rows = np.transpose(rows, (1, 0, 2, 3))                      # [2L, P, H, Dh]
    key_rows, value_rows = zip(*decoder_rows(num_layers))
    return rows[list(key_rows)], rows[list(value_rows)]


def table_from_prefixes(key: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Inverse of :func:`prefixes_from_table`; layers PEFT shares must hold equal tables, and
    the rows no decoder layer reads (PEFT's dropped cross-attention half) are zero."""
    num_layers, length, heads, head_dim = key.shape
    rows = np.zeros((2 * num_layers, length, heads, head_dim), np.float32)
    owner: Dict[int, int] = {}
    for j, pair in enumerate(decoder_rows(num_layers)):
        for row, source in zip(pair, (key[j], value[j])):
            if row in owner and not np.array_equal(rows[row], source):
                raise PeftPrefixError(
                    f"decoder layers {owner[row]} and {j} have different prefixes, but a PEFT "
                    f"adapter stores one prefix for both (its row {row} of {2 * num_layers})")
            owner[row] = j
            rows[row] = source
    return np.transpose(rows, (1, 0, 2, 3)).reshape(length, -1)


def method_config(prefix_length: int) -> Dict[str, Any]:
    """Our method config that computes what a PEFT prefix adapter does."""
    return {"kind": "prefix_tuning", "prefix_length": int(prefix_length),
            "parts": ["decoder_self"], "reparameterization": "direct", "init": "random",
            "prefix_bias": "leading"}


def check_exportable(config: Mapping[str, Any]) -> None:
    """Raise unless ``config`` (a prefix_tuning method config) is what PEFT can compute."""
    if config.get("kind") != "prefix_tuning":
        raise PeftPrefixError(f"a {config.get('kind')} run has no PEFT prefix adapter form")
    if list(config.get("parts", [])) != ["decoder_self"]:
        raise PeftPrefixError(f"PEFT prefixes only decoder self-attention; this run prefixes "
                              f"{list(config.get('parts', []))} (train with "
                              "parts=['decoder_self'])")
    if config.get("prefix_bias") != "leading":
        raise PeftPrefixError("PEFT's prefix takes T5's position bias of leading tokens; this "
                              "run was trained with prefix_bias='zero' (train with 'leading')")


def write_adapter(directory: str, key: np.ndarray, value: np.ndarray, *, heads: int,
                  head_dim: int, base_model_name_or_path: Any = None) -> str:
    """Decoder self key/value ``[L, P, H, Dh]`` -> a PEFT prefix-tuning adapter directory."""
    table = table_from_prefixes(np.asarray(key, np.float32), np.asarray(value, np.float32))
    num_layers, length = key.shape[:2]
    config = {
        "peft_type": "PREFIX_TUNING", "task_type": "SEQ_2_SEQ_LM",
        "num_virtual_tokens": int(length), "token_dim": int(heads * head_dim),
        "num_transformer_submodules": 2, "num_attention_heads": int(heads),
        "num_layers": int(num_layers), "encoder_hidden_size": int(heads * head_dim),
        "prefix_projection": False, "init_weights": None, "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path, "revision": None,
        "modules_to_save": None, "auto_mapping": None,
    }
    return prompt_export.write_peft_adapter(directory, {PEFT_KEY: table}, config)


def is_prefix_adapter(path: str) -> bool:
    config = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(config):
        return False
    with open(config) as f:
        return json.load(f).get("peft_type") == "PREFIX_TUNING"


def read_adapter(directory: str, *, num_decoder_layers: Optional[int] = None,
                 heads: Optional[int] = None, head_dim: Optional[int] = None
                 ) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    """A PEFT prefix adapter -> (our flat tables ``decoder_self/key|value``, method config).
    The model's dimensions, when given, are checked against the adapter's; else taken from
    it."""
    with open(os.path.join(directory, ADAPTER_CONFIG)) as f:
        config = json.load(f)
    if config.get("peft_type") != "PREFIX_TUNING":
        raise PeftPrefixError(f"{directory} is a PEFT {config.get('peft_type')} adapter, not "
                              "PREFIX_TUNING")
    num_layers = int(config["num_layers"])
    num_decoder_layers = num_decoder_layers or num_layers
    heads = heads or int(config["num_attention_heads"])
    head_dim = head_dim or int(config["token_dim"]) // heads
    if num_layers != num_decoder_layers or int(config["token_dim"]) != heads * head_dim \
            or int(config["num_attention_heads"]) != heads:
        raise PeftPrefixError(
            f"{directory}: adapter for {num_layers} layers x {config['num_attention_heads']} "
            f"heads, token_dim {config['token_dim']}; the model has {num_decoder_layers} decoder "
            f"layers x {heads} heads x {head_dim}")
    weights = os.path.join(directory, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        raise PeftPrefixError(f"{directory} has no {ADAPTER_WEIGHTS}")
    tensors = hf_checkpoint.read_safetensors(weights)
    if PEFT_KEY not in tensors:
        raise PeftPrefixError(f"{weights} has no {PEFT_KEY!r} tensor (has {sorted(tensors)})")
    table = np.asarray(tensors[PEFT_KEY], np.float32)
    key, value = prefixes_from_table(table, num_layers, heads, head_dim)
    return ({"decoder_self/key": key, "decoder_self/value": value},
            method_config(table.shape[0]))


def export_run(model_dir: str, out: str, *, step=None, base_model_name_or_path=None
               ) -> Tuple[int, ...]:
    """A prefix-tuning training run -> a PEFT adapter at ``out``; checked before anything is
    written. Returns the decoder key table's shape [L, P, H, Dh]."""
    from prompt_t5x.checkpoints import method_export
    method, trainable, _, _ = method_export.run_method(model_dir, step)
    check_exportable(method.method_config())
    tables, _ = method.export(trainable)
    key, value = tables["decoder_self/key"], tables["decoder_self/value"]
    table_from_prefixes(key, value)            # raises before the directory exists
    cfg = method.model.config
    write_adapter(out, key, value, heads=cfg.num_heads, head_dim=cfg.head_dim,
                  base_model_name_or_path=base_model_name_or_path)
    return tuple(key.shape)
