"""Conversion between HF transformers' T5 (PyTorch state dict names) and our T5X tree.

HF ``nn.Linear`` weights are stored ``[out, in]``; T5X kernels are ``[in, out]``, so every
projection is transposed. The relative position table lives in HF's first block of each stack
(``block.0.layer.0.SelfAttention.relative_attention_bias.weight``, ``[buckets, heads]``) and in
T5X at the stack level (``relpos_bias/rel_embedding``, ``[heads, buckets]``).

Only T5 1.1 style models convert: gated-GELU MLP and an untied output projection.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping

import numpy as np

from prompt_t5x.model.t5 import T5Config

_ATTN = {"q": "query", "k": "key", "v": "value", "o": "out"}


def config_from_hf(hf: Mapping[str, Any], **overrides) -> T5Config:
    """T5Config from an HF ``config.json`` dict; refuses models that are not T5 1.1-shaped."""
    act = hf.get("feed_forward_proj", "relu")
    if act != "gated-gelu":
        raise ValueError(f"HF config has feed_forward_proj={act!r}; only T5 1.1 ('gated-gelu') "
                         "models are supported")
    if hf.get("tie_word_embeddings", True):
        raise ValueError("HF config ties the output projection to the embedding "
                         "(tie_word_embeddings=true); T5 1.1 has an untied logits_dense")
    kw = dict(vocab_size=hf["vocab_size"], emb_dim=hf["d_model"], num_heads=hf["num_heads"],
              head_dim=hf["d_kv"], mlp_dim=hf["d_ff"], num_encoder_layers=hf["num_layers"],
              num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
              dropout_rate=hf.get("dropout_rate", 0.1),
              relpos_buckets=hf.get("relative_attention_num_buckets", 32),
              relpos_max_distance=hf.get("relative_attention_max_distance", 128),
              layer_norm_eps=hf.get("layer_norm_epsilon", 1e-6))
    kw.update(overrides)
    return T5Config(**kw)


def hf_config_from(config: T5Config) -> Dict[str, Any]:
    """An HF ``config.json`` dict (T5ForConditionalGeneration) for ``config``."""
    return {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
        "vocab_size": config.vocab_size, "d_model": config.emb_dim, "d_kv": config.head_dim,
        "d_ff": config.mlp_dim, "num_layers": config.num_encoder_layers,
        "num_decoder_layers": config.num_decoder_layers, "num_heads": config.num_heads,
        "relative_attention_num_buckets": config.relpos_buckets,
        "relative_attention_max_distance": config.relpos_max_distance,
        "dropout_rate": config.dropout_rate, "layer_norm_epsilon": config.layer_norm_eps,
        "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
        "is_encoder_decoder": True, "pad_token_id": 0, "eos_token_id": 1,
        "decoder_start_token_id": 0,
    }


def _hf_to_ours_name(name: str) -> tuple:
    """HF parameter name -> (path tuple in our tree, transpose?)."""
    if name in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        return ("token_embedder", "embedding"), False
    if name == "lm_head.weight":
        return ("decoder", "logits_dense", "kernel"), True
    m = re.fullmatch(r"(encoder|decoder)\.final_layer_norm\.weight", name)
    if m:
        stack = m.group(1)
        return (stack, f"{stack}_norm", "scale"), False
    m = re.fullmatch(r"(encoder|decoder)\.block\.0\.layer\.0\.SelfAttention\."
                     r"relative_attention_bias\.weight", name)
    if m:
        return (m.group(1), "relpos_bias", "rel_embedding"), True
    m = re.fullmatch(r"(encoder|decoder)\.block\.(\d+)\.layer\.(\d)\.(.+)", name)
    if not m:
        raise KeyError(name)
    stack, block, sub, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    layer = f"layers_{block}"
    if stack == "encoder":
        parts = {0: ("attention", "pre_attention_layer_norm"), 1: ("mlp", "pre_mlp_layer_norm")}
    else:
        parts = {0: ("self_attention", "pre_self_attention_layer_norm"),
                 1: ("encoder_decoder_attention", "pre_cross_attention_layer_norm"),
                 2: ("mlp", "pre_mlp_layer_norm")}
    if sub not in parts:
        raise KeyError(name)
    module, norm = parts[sub]
    if rest == "layer_norm.weight":
        return (stack, layer, norm, "scale"), False
    m = re.fullmatch(r"(?:SelfAttention|EncDecAttention)\.([qkvo])\.weight", rest)
    if m and module != "mlp":
        return (stack, layer, module, _ATTN[m.group(1)], "kernel"), True
    m = re.fullmatch(r"DenseReluDense\.(wi_0|wi_1|wo)\.weight", rest)
    if m and module == "mlp":
        return (stack, layer, "mlp", m.group(1), "kernel"), True
    raise KeyError(name)


def params_from_hf_state_dict(state_dict: Mapping[str, Any], config: T5Config) -> Dict[str, Any]:
    """HF T5 state dict (name -> array-like, e.g. numpy or torch) -> our nested params (numpy).

    Raises one ValueError listing every HF name that has no place in a T5 1.1 tree. Shapes are
    checked by the strict loader (``prompt_t5x.checkpoints.t5x_reader``), not here.
    """
    params: Dict[str, Any] = {}
    unknown = []
    for name, value in state_dict.items():
        try:
            path, transpose = _hf_to_ours_name(name)
        except KeyError:
            unknown.append(name)
            continue
        if hasattr(value, "detach"):  # torch tensor, without importing torch here
            value = value.detach().float().cpu().numpy()
        array = np.asarray(value)
        if transpose:
            array = array.T
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.ascontiguousarray(array)
    if unknown:
        raise ValueError(f"{len(unknown)} HF parameters have no T5 1.1 counterpart: "
                         f"{sorted(unknown)[:20]}")
    del config  # the shapes carry everything; kept in the signature for symmetry/validation
    return params


def hf_state_dict_from_params(params: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    """Our nested params -> HF T5ForConditionalGeneration state dict (numpy, float32)."""
    out: Dict[str, np.ndarray] = {}
    arr = lambda x: np.asarray(x, dtype=np.float32)  # noqa: E731
    out["shared.weight"] = arr(params["token_embedder"]["embedding"])
    out["encoder.embed_tokens.weight"] = out["shared.weight"]
    out["decoder.embed_tokens.weight"] = out["shared.weight"]
    out["lm_head.weight"] = arr(params["decoder"]["logits_dense"]["kernel"]).T
    for stack in ("encoder", "decoder"):
        tree = params[stack]
        out[f"{stack}.final_layer_norm.weight"] = arr(tree[f"{stack}_norm"]["scale"])
        out[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = \
            arr(tree["relpos_bias"]["rel_embedding"]).T
        layers = sorted((k for k in tree if k.startswith("layers_")), key=lambda k: int(k[7:]))
        for name in layers:
            i, layer = int(name[7:]), tree[name]
            if stack == "encoder":
                subs = [(0, "SelfAttention", "attention", "pre_attention_layer_norm"),
                        (1, None, "mlp", "pre_mlp_layer_norm")]
            else:
                subs = [(0, "SelfAttention", "self_attention", "pre_self_attention_layer_norm"),
                        (1, "EncDecAttention", "encoder_decoder_attention",
                         "pre_cross_attention_layer_norm"),
                        (2, None, "mlp", "pre_mlp_layer_norm")]
            for sub, hf_mod, ours, norm in subs:
                prefix = f"{stack}.block.{i}.layer.{sub}"
                out[f"{prefix}.layer_norm.weight"] = arr(layer[norm]["scale"])
                if hf_mod is None:
                    for w in ("wi_0", "wi_1", "wo"):
                        out[f"{prefix}.DenseReluDense.{w}.weight"] = arr(layer["mlp"][w]["kernel"]).T
                else:
                    for short, long in _ATTN.items():
                        out[f"{prefix}.{hf_mod}.{short}.weight"] = arr(layer[ours][long]["kernel"]).T
    return out
