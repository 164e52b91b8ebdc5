"""Matmul FLOP accounting for prompt tuning a frozen T5: the analytic count and the compiled one.

MFU in ``prompt-t5x bench`` (and in the performance issue) is

    (matmul FLOPs of the forward pass + matmul FLOPs of the activation-gradient backward pass)
    / step time / peak FLOP/s

with no weight gradients (the T5 is frozen) and no recomputation (remat is a cost, not work).
A matmul ``[M, K] x [K, N]`` is ``2 M K N`` FLOPs. Embedding lookups are gathers, not matmuls.

The backward pass is counted *exactly as reverse-mode autodiff builds it* when only the prompt is
differentiated (what ``prompt_t5x.training.train`` and PyTorch autograd both do):

- ``x @ W`` with ``W`` frozen: one matmul for ``dx = dy @ W^T`` (1x its forward);
- ``q @ k^T`` and ``p @ v`` (both operands activations): two matmuls (2x), one per operand;
- anything that does not depend on the prompt has no backward at all: the decoder's first
  self-attention block (decoder tokens never see the prompt before the first cross-attention) and
  the first cross-attention's query projection (and so its ``dq``).

The performance issue's table is consistent with the simpler convention ``backward = forward``
(``StepFlops.issue_convention``): the exact count is 0.9% (xxl) to 4.3% (base) larger at batch 32,
encoder 512, decoder 16, because attention matmuls need two gradient matmuls. Throughput targets
(examples/s) are convention-free; ``bench`` prints both MFUs.

The measured counterpart, ``hlo_dot_flops``, sums ``2 * |output| * |contraction|`` over every
``dot`` in an optimized HLO module; ``tests/test_bench.py`` checks that it equals the analytic count
for the compiled train step and that ``compiled.cost_analysis()['flops']`` (which also counts
element-wise work) is not below it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Dict, List, Tuple

from prompt_t5x.model.t5 import T5Config


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """Matmul FLOPs of one step, split by pass; ``parts`` names each contribution."""

    forward: int
    backward: int
    parts: Dict[str, Tuple[int, int]]  # name -> (forward, backward)

    @property
    def total(self) -> int:
        return self.forward + self.backward

    @property
    def issue_convention(self) -> int:
        """``2 x forward``: the convention the performance issue's PEFT table is consistent with."""
        return 2 * self.forward


def _mm(m: int, k: int, n: int) -> int:
    return 2 * m * k * n


def _check(**dims: int) -> None:
    for name, value in dims.items():
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def encoder_layer_flops(cfg: T5Config, batch: int, enc_len: int) -> Tuple[int, int]:
    """(forward, backward) of one encoder layer over [batch, enc_len] positions."""
    d, hk, f = cfg.emb_dim, cfg.num_heads * cfg.head_dim, cfg.mlp_dim
    rows = batch * enc_len
    proj = 4 * _mm(rows, d, hk)                      # query, key, value, out
    attn = 2 * _mm(rows, enc_len, hk)                # q k^T and p v, summed over heads
    mlp = 2 * _mm(rows, d, f) + _mm(rows, f, d)      # wi_0, wi_1, wo
    return proj + attn + mlp, proj + 2 * attn + mlp


def decoder_layer_flops(cfg: T5Config, batch: int, dec_len: int, enc_len: int,
                        first: bool, self_kv_len: int | None = None) -> Tuple[int, int]:
    """(forward, backward) of one decoder layer; ``first`` applies the prompt-gradient pruning.

    ``self_kv_len`` is the number of self-attention keys (``dec_len`` teacher-forced; the cache
    length when decoding one token at a time).
    """
    d, hk, f = cfg.emb_dim, cfg.num_heads * cfg.head_dim, cfg.mlp_dim
    rows = batch * dec_len
    kv_len = dec_len if self_kv_len is None else self_kv_len
    self_proj = 4 * _mm(rows, d, hk)
    self_attn = 2 * _mm(rows, kv_len, hk)
    cross_q_out = 2 * _mm(rows, d, hk)
    cross_kv = 2 * _mm(batch * enc_len, d, hk)
    cross_attn_one = _mm(rows, enc_len, hk)          # one of q k^T, p v
    mlp = 2 * _mm(rows, d, f) + _mm(rows, f, d)
    fwd = self_proj + self_attn + cross_q_out + cross_kv + 2 * cross_attn_one + mlp
    if first:
        # No prompt dependence until the cross-attention keys/values: the self-attention block
        # and the cross query have no gradient; q k^T needs only dk, p v needs dp and dv.
        bwd = cross_q_out // 2 + cross_kv + 3 * cross_attn_one + mlp
    else:
        bwd = self_proj + 2 * self_attn + cross_q_out + cross_kv + 4 * cross_attn_one + mlp
    return fwd, bwd


def train_step_flops(cfg: T5Config, batch: int, encoder_len: int, decoder_len: int) -> StepFlops:
    """Matmul FLOPs of one prompt-tuning train step.

    ``encoder_len`` counts every encoder position *including* the prompt (inputs + prompt).
    """
    _check(batch=batch, encoder_len=encoder_len, decoder_len=decoder_len)
    parts: Dict[str, Tuple[int, int]] = {}
    ef, eb = encoder_layer_flops(cfg, batch, encoder_len)
    parts["encoder_layers"] = (cfg.num_encoder_layers * ef, cfg.num_encoder_layers * eb)
    f0, b0 = decoder_layer_flops(cfg, batch, decoder_len, encoder_len, first=True)
    fn, bn = decoder_layer_flops(cfg, batch, decoder_len, encoder_len, first=False)
    rest = cfg.num_decoder_layers - 1
    parts["decoder_layers"] = (f0 + rest * fn, b0 + rest * bn)
    logits = _mm(batch * decoder_len, cfg.emb_dim, cfg.vocab_size)
    parts["logits"] = (logits, logits)
    return StepFlops(sum(p[0] for p in parts.values()), sum(p[1] for p in parts.values()), parts)


def encoder_forward_flops(cfg: T5Config, batch: int, encoder_len: int) -> int:
    return cfg.num_encoder_layers * encoder_layer_flops(cfg, batch, encoder_len)[0]


def decoder_forward_flops(cfg: T5Config, batch: int, decoder_len: int, encoder_len: int,
                          self_kv_len: int | None = None, with_cross_kv: bool = True) -> int:
    """Teacher-forced decoder + logits forward FLOPs (``with_cross_kv=False``: keys/values of
    the encoded inputs already cached, as in incremental decoding)."""
    f = decoder_layer_flops(cfg, batch, decoder_len, encoder_len, first=False,
                            self_kv_len=self_kv_len)[0]
    if not with_cross_kv:
        f -= 2 * _mm(batch * encoder_len, cfg.emb_dim, cfg.num_heads * cfg.head_dim)
    return cfg.num_decoder_layers * f + _mm(batch * decoder_len, cfg.emb_dim, cfg.vocab_size)


def rank_classification_flops(cfg: T5Config, batch: int, encoder_len: int, decoder_len: int,
                              num_candidates: int) -> int:
    """Scoring ``num_candidates`` label sequences per example: encode once, decode each."""
    _check(batch=batch, encoder_len=encoder_len, decoder_len=decoder_len,
           num_candidates=num_candidates)
    return (encoder_forward_flops(cfg, batch, encoder_len)
            + decoder_forward_flops(cfg, batch * num_candidates, decoder_len, encoder_len))


def greedy_decode_flops(cfg: T5Config, batch: int, encoder_len: int, decode_len: int,
                        cross_kv_cached: bool = False) -> int:
    """Encode once, then ``decode_len`` single-token steps against a KV cache of ``decode_len``.

    Every step attends over the whole (masked) cache, as the fixed-shape cached decoder does.
    ``cross_kv_cached=False`` counts re-projecting the encoded inputs at every step (what a
    decoder without a cross-attention cache computes).
    """
    _check(batch=batch, encoder_len=encoder_len, decode_len=decode_len)
    per_step = decoder_forward_flops(cfg, batch, 1, encoder_len, self_kv_len=decode_len,
                                     with_cross_kv=not cross_kv_cached)
    total = encoder_forward_flops(cfg, batch, encoder_len) + decode_len * per_step
    if cross_kv_cached:
        total += cfg.num_decoder_layers * 2 * _mm(batch * encoder_len, cfg.emb_dim,
                                                  cfg.num_heads * cfg.head_dim)
    return total


# ------------------------------------------------------------------ counting compiled matmuls

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\][^ ]*\s+(\S+?)\((.*)$")


def _dims(text: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def hlo_dots(hlo_text: str) -> List[Dict]:
    """Every ``dot`` in an HLO module's text: name, output shape, lhs/rhs shapes, FLOPs.

    Operand shapes are looked up by instruction name (optimized HLO prints fused operands as
    bare names), so the whole module text is needed.
    """
    shapes: Dict[str, Tuple[int, ...]] = {}
    dot_lines = []
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name, _, dims, op, rest = m.groups()
        shapes[name] = _dims(dims)
        if op == "dot":
            dot_lines.append((name, _dims(dims), rest))
    dots = []
    for name, out_shape, rest in dot_lines:
        args = rest.split(")", 1)[0]
        operands = re.findall(r"%([\w.\-]+)", args)[:2]
        lhs, rhs = (shapes.get(o) for o in operands)
        contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
        if lhs is None or rhs is None or contract is None:
            raise ValueError(f"cannot read the operands of HLO dot {name!r}: {rest[:200]}")
        k = math.prod(lhs[i] for i in _dims(contract.group(1)))
        dots.append({"name": name, "out": out_shape, "lhs": lhs, "rhs": rhs,
                     "flops": 2 * math.prod(out_shape) * k})
    return dots


def hlo_dot_flops(hlo_text: str) -> int:
    """Sum of ``2 * |output| * |contraction|`` over every dot of an HLO module."""
    return sum(d["flops"] for d in hlo_dots(hlo_text))


def cost_analysis_flops(compiled) -> float:
    """``compiled.cost_analysis()['flops']`` across jax versions (dict or list of dicts)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))
