"""Strict comparison of a loaded parameter tree against the tree a model expects.

A checkpoint that does not fit the model must fail loudly, in one error that lists *every*
problem at once (missing, unexpected and mis-shaped parameters, with both shapes), instead of the
first ``KeyError`` -- or worse, a silently random-initialised weight. Intended partial loads
(e.g. a checkpoint without ``decoder/logits_dense`` that the caller fills in itself) are declared
explicitly with glob patterns on ``/``-joined parameter names.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Dict, Iterable, Mapping, Sequence, Tuple

Shape = Tuple[int, ...]


class CheckpointMismatchError(ValueError):
    """The loaded tree and the expected tree differ (message lists every difference)."""

    def __init__(self, message: str, *, missing=(), unexpected=(), mismatched=()):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)


def flatten(tree: Mapping[str, Any], sep: str = "/") -> Dict[str, Any]:
    """Nested dicts -> ``{'encoder/layers_0/mlp/wo/kernel': leaf}`` (leaves are non-dicts)."""
    flat: Dict[str, Any] = {}

    def walk(node, prefix):
        if isinstance(node, Mapping):
            for key, value in node.items():
                walk(value, f"{prefix}{sep}{key}" if prefix else str(key))
        else:
            flat[prefix] = node

    walk(tree, "")
    return flat


def unflatten(flat: Mapping[str, Any], sep: str = "/") -> Dict[str, Any]:
    """Inverse of :func:`flatten`."""
    tree: Dict[str, Any] = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split(sep)
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def shape_of(leaf: Any) -> Shape:
    """Shape of an array, ShapeDtypeStruct, lazy array or plain shape tuple."""
    if isinstance(leaf, tuple) and all(isinstance(d, int) for d in leaf):
        return leaf
    return tuple(int(d) for d in leaf.shape)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def check_tree(found: Mapping[str, Any], expected: Mapping[str, Any], *,
               allow_missing: Sequence[str] = (), allow_unexpected: Sequence[str] = (),
               source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointMismatchError` unless ``found`` matches ``expected`` exactly.

    Args:
      found: flat or nested tree of what was loaded (arrays / anything with ``.shape``).
      expected: flat or nested tree the model needs (e.g. ``t5.param_shapes(config)``).
      allow_missing: glob patterns of expected names that may be absent (the caller supplies them).
      allow_unexpected: glob patterns of loaded names that may be ignored.
      source: what ``found`` came from, for the message (usually the checkpoint path).
    """
    found_flat = flatten(found) if _is_nested(found) else dict(found)
    expected_flat = flatten(expected) if _is_nested(expected) else dict(expected)
    missing = sorted(n for n in expected_flat if n not in found_flat
                     and not _matches(n, allow_missing))
    unexpected = sorted(n for n in found_flat if n not in expected_flat
                        and not _matches(n, allow_unexpected))
    mismatched = []
    for name in sorted(set(found_flat) & set(expected_flat)):
        got, want = shape_of(found_flat[name]), shape_of(expected_flat[name])
        if got != want:
            mismatched.append((name, got, want))
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{source} does not match the model's parameters "
             f"({len(missing)} missing, {len(unexpected)} unexpected, "
             f"{len(mismatched)} with the wrong shape):"]
    lines += [f"  missing:    {n}  (model expects {shape_of(expected_flat[n])})" for n in missing]
    lines += [f"  unexpected: {n}  (checkpoint has {shape_of(found_flat[n])})" for n in unexpected]
    lines += [f"  shape:      {n}  checkpoint {got} vs model {want}" for n, got, want in mismatched]
    lines.append("Check that the model config matches the checkpoint (or let it be inferred); "
                 "for an intended partial load pass allow_missing=/allow_unexpected= globs.")
    raise CheckpointMismatchError("\n".join(lines), missing=missing, unexpected=unexpected,
                                  mismatched=mismatched)


def merge_partial(loaded: Mapping[str, Any], fallback: Mapping[str, Any],
                  expected: Mapping[str, Any]) -> Dict[str, Any]:
    """Fill the parameters missing from ``loaded`` from ``fallback``, then check strictly.

    The fallback is explicit (e.g. freshly initialised weights the caller chose on purpose), and
    the result must still match ``expected`` exactly -- nothing is filled in silently.
    """
    merged = flatten(fallback) if _is_nested(fallback) else dict(fallback)
    merged.update(flatten(loaded) if _is_nested(loaded) else dict(loaded))
    check_tree(merged, expected, source="checkpoint merged with its fallback")
    return unflatten(merged)


def _is_nested(tree: Mapping[str, Any]) -> bool:
    return any(isinstance(v, Mapping) for v in tree.values())


# ----------------------------------------------------------------------------------------------
# Model config from parameter shapes.

# Fields that the parameter shapes determine (the rest -- dropout, dtypes -- are run settings).
SHAPE_FIELDS = ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim",
                "num_encoder_layers", "num_decoder_layers", "relpos_buckets")


def _count_layers(shapes: Mapping[str, Shape], stack: str) -> int:
    indices = set()
    for name in shapes:
        parts = name.split("/")
        if len(parts) > 1 and parts[0] == stack and parts[1].startswith("layers_"):
            indices.add(int(parts[1][len("layers_"):]))
    if indices and indices != set(range(len(indices))):
        raise ValueError(f"{stack} layers are not numbered 0..n-1: {sorted(indices)}")
    return len(indices)


def infer_shape_fields(shapes: Mapping[str, Shape], source: str = "checkpoint") -> Dict[str, int]:
    """The shape-determined T5Config fields of a flat ``{name: shape}`` T5 1.1 parameter tree."""
    shapes = {k: shape_of(v) for k, v in shapes.items()}
    if "encoder/layers_0/mlp/wi/kernel" in shapes:
        raise ValueError(f"{source} is a T5 1.0 checkpoint (ReLU MLP 'wi'); prompt_t5x implements "
                         "T5 1.1 (gated-GELU 'wi_0'/'wi_1'), e.g. the t5_1_1_lm100k_* checkpoints.")
    needed = ["token_embedder/embedding", "encoder/relpos_bias/rel_embedding",
              "encoder/layers_0/attention/query/kernel", "encoder/layers_0/mlp/wi_0/kernel"]
    absent = [n for n in needed if n not in shapes]
    if absent:
        raise ValueError(f"cannot infer the T5 config of {source}: it lacks {absent} "
                         f"(found {len(shapes)} parameters, e.g. {sorted(shapes)[:5]}).")
    vocab, emb = shapes["token_embedder/embedding"]
    heads, buckets = shapes["encoder/relpos_bias/rel_embedding"]
    joined = shapes["encoder/layers_0/attention/query/kernel"][1]
    if joined % heads:
        raise ValueError(f"{source}: attention width {joined} is not a multiple of {heads} heads")
    return dict(vocab_size=vocab, emb_dim=emb, num_heads=heads, head_dim=joined // heads,
                mlp_dim=shapes["encoder/layers_0/mlp/wi_0/kernel"][1],
                num_encoder_layers=_count_layers(shapes, "encoder"),
                num_decoder_layers=_count_layers(shapes, "decoder"), relpos_buckets=buckets)


def infer_config(shapes: Mapping[str, Shape], source: str = "checkpoint", **overrides):
    """A ``t5.T5Config`` whose parameter shapes are ``shapes`` (run settings from ``overrides``)."""
    from prompt_t5x.model import t5  # the model module; imported here so this module stays light

    fields = infer_shape_fields(shapes, source)
    clash = {k: (v, fields[k]) for k, v in overrides.items() if k in fields and v != fields[k]}
    if clash:
        raise ValueError(f"overrides contradict the shapes of {source}: "
                         + ", ".join(f"{k}={a} but checkpoint has {b}"
                                     for k, (a, b) in clash.items()))
    return t5.T5Config(**{**fields, **overrides})


def check_config(shapes: Mapping[str, Shape], config, source: str = "checkpoint") -> None:
    """Raise one ValueError naming every shape field where ``config`` disagrees with ``shapes``."""
    fields = infer_shape_fields(shapes, source)
    wrong = [(k, getattr(config, k), v) for k, v in fields.items() if getattr(config, k) != v]
    if wrong:
        raise ValueError(f"the given model config does not match {source}: "
                         + "; ".join(f"{k}: config {a} vs checkpoint {b}" for k, a, b in wrong)
                         + ". Pass config=None to infer it from the checkpoint.")
