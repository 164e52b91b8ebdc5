"""Which dims Adafactor factors its second moment over, per parameter (``optim.adafactor``).

Adafactor (Shazeer & Stern, 2018) keeps, for a matrix, a row and a column statistic instead of
the full second moment. T5X's Adafactor applies that to 2-D parameters and *refuses* to guess for
rank > 2: it needs factor rules keyed by the parameter's logical axis names. Ours, with no rule,
factors over the two largest dims and treats the other dims as a batch (unchanged behaviour).
Methods with 3-D/4-D parameters (prefix-tuning's keys/values ``[layers, P, heads, head_dim]``,
deep prompts ``[layers, P, D]``) should choose deliberately; a rule says how.

A rule is ``pattern -> factoring`` (first match wins; gin:
``optim.adafactor.factor_rules = {'axes:layers,prefix,heads,kv': 'batch,row,col,col'}``):

- pattern ``'axes:a,b,c'``: the parameter's logical axis names (``Method.logical_axes``), one per
  dim, ``*`` for any name (or none); any other pattern is a regular expression searched in the
  parameter's path (``'prefixes/encoder/key'``);
- factoring ``'none'`` (full second moment), ``'default'`` (the two largest dims) or one role per
  dim: ``row`` dims index the row statistic, ``col`` dims the column statistic (several dims of one
  role act as one merged dim, e.g. heads x head_dim), ``batch`` dims index both, i.e. every
  batch index is its own matrix. A role factoring whose row or column size is below
  ``min_dim_size_to_factor`` is not factored, exactly as the 2-D rule would do per matrix.
  Only the second moment is per matrix: update clipping stays per parameter, as in T5X.

After the user's rules come :data:`DEFAULT_FACTOR_RULES`: a parameter whose first axis is named
``layers`` is a stack of per-layer matrices, factored per layer over (axis 1, the rest merged):
``[layers, P, heads, head_dim]`` -> per layer ``[P, heads*head_dim]``. **A method opts in** by
naming its stacked axis ``'layers'`` in ``logical_axes`` (and its others as it likes, for rules
written against them); the axis names reach the optimizer through ``with_logical_axes``, which
the train step applies with the method's own ``logical_axes(trainable)``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import jax
import numpy as np

ROLES = ("batch", "row", "col")
NONE, DEFAULT = "none", "default"
AXES_PREFIX = "axes:"
AnyAxis = "*"

# (row dims, col dims) of a factored parameter; None: unfactored.
Factoring = Optional[Tuple[Tuple[int, ...], Tuple[int, ...]]]
Rules = Union[Mapping[str, str], Sequence[Tuple[str, str]]]


@dataclasses.dataclass(frozen=True)
class FactorRule:
    pattern: str     # 'axes:layers,*,*' or a path regular expression
    factoring: str   # 'none' | 'default' | 'batch,row,col,...'

    def __post_init__(self):
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError(f"factor rule pattern {self.pattern!r} must be a non-empty string")
        if not isinstance(self.factoring, str):
            raise ValueError(f"factor rule {self.pattern!r}: factoring {self.factoring!r} must "
                             "be a string")
        if self.axes is None:
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"factor rule {self.pattern!r} is not a regular expression: "
                                 f"{e}") from None
        roles = self.roles
        if roles is not None:
            if set(roles) - set(ROLES):
                raise ValueError(f"factor rule {self.pattern!r}: factoring {self.factoring!r} "
                                 f"must be 'none', 'default' or roles from {', '.join(ROLES)}")
            if "row" not in roles or "col" not in roles:
                raise ValueError(f"factor rule {self.pattern!r}: factoring {self.factoring!r} "
                                 "needs at least one 'row' and one 'col' dim")
            if self.axes is not None and len(self.axes) != len(roles):
                raise ValueError(f"factor rule {self.pattern!r}: {len(self.axes)} axes but "
                                 f"{len(roles)} roles in {self.factoring!r}")

    @property
    def axes(self) -> Optional[Tuple[str, ...]]:
        if not self.pattern.startswith(AXES_PREFIX):
            return None
        return tuple(a.strip() for a in self.pattern[len(AXES_PREFIX):].split(","))

    @property
    def roles(self) -> Optional[Tuple[str, ...]]:
        if self.factoring in (NONE, DEFAULT):
            return None
        return tuple(r.strip() for r in self.factoring.split(","))

    def matches(self, path: str, axes: Optional[Tuple[Optional[str], ...]], rank: int) -> bool:
        if self.axes is None:
            return re.search(self.pattern, path) is not None
        if axes is None or len(axes) != rank or len(self.axes) != rank:
            return False
        return all(want == AnyAxis or want == got for want, got in zip(self.axes, axes))


DEFAULT_FACTOR_RULES = (
    FactorRule("axes:layers,*,*", "batch,row,col"),        # deep prompts [layers, P, D]
    FactorRule("axes:layers,*,*,*", "batch,row,col,col"),  # prefixes [layers, P, heads, kv]
    # A task bank (methods.task_bank) stacks a method's state per task: factored per task.
    FactorRule("axes:tasks,*", "none"),                              # e.g. an MLP bias [T, h]
    FactorRule("axes:tasks,*,*", "batch,row,col"),                   # prompts [T, P, D]
    FactorRule("axes:tasks,layers,*,*", "batch,batch,row,col"),      # deep [T, layers, P, D]
    FactorRule("axes:tasks,layers,*,*,*", "batch,batch,row,col,col"),  # prefixes
    FactorRule("axes:memory,*,*", "batch,row,col"),      # SPT's memory of prompts [N, P, D]
)


def parse(rules: Optional[Rules]) -> Tuple[FactorRule, ...]:
    """``{pattern: factoring}`` (or pairs, or FactorRules) -> rules; ValueError on a bad one."""
    if rules is None:
        return ()
    if isinstance(rules, Mapping):
        rules = list(rules.items())
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
        raise ValueError(f"factor_rules must be a dict {{pattern: factoring}}, got {rules!r}")
    out = []
    for rule in rules:
        if isinstance(rule, FactorRule):
            out.append(rule)
        elif isinstance(rule, (tuple, list)) and len(rule) == 2:
            out.append(FactorRule(*rule))
        else:
            raise ValueError(f"factor rule {rule!r} must be a (pattern, factoring) pair")
    return tuple(out)


def default_factoring(shape: Tuple[int, ...], min_dim_size_to_factor: int) -> Factoring:
    """The two largest dims: the second-largest is the row, the largest the column (T5X's
    2-D rule); any other dims are a batch."""
    if len(shape) < 2:
        return None
    order = np.argsort(shape, kind="stable")
    if shape[order[-2]] < min_dim_size_to_factor:
        return None
    return (int(order[-2]),), (int(order[-1]),)


def factoring_of(rule: Optional[FactorRule], path: str, shape: Tuple[int, ...],
                 min_dim_size_to_factor: int) -> Factoring:
    """What ``rule`` (None: no rule matched) means for a parameter of ``shape``."""
    if rule is None or rule.factoring == DEFAULT:
        return default_factoring(shape, min_dim_size_to_factor)
    roles = rule.roles
    if roles is None:
        return None
    if len(roles) != len(shape):
        raise ValueError(f"factor rule {rule.pattern!r} gives {len(roles)} roles to {path!r} "
                         f"of shape {tuple(shape)}")
    rows = tuple(i for i, r in enumerate(roles) if r == "row")
    cols = tuple(i for i, r in enumerate(roles) if r == "col")
    size = lambda dims: int(np.prod([shape[d] for d in dims]))  # noqa: E731
    if min(size(rows), size(cols)) < min_dim_size_to_factor:
        return None
    return rows, cols


def path_name(key_path) -> str:
    """A tree path -> 'a/b/c' (what path patterns are matched against)."""
    parts = []
    for key in key_path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _axis_names(spec: Any) -> Optional[Tuple[Optional[str], ...]]:
    if spec is None:
        return None
    return tuple(None if a is None else str(a) for a in spec)


def resolve(params: Any, rules: Sequence[FactorRule], logical_axes: Any = None,
            factored: bool = True, min_dim_size_to_factor: int = 128) -> list:
    """The ``Factoring`` of every leaf of ``params`` (flatten order): the user's rules, then
    :data:`DEFAULT_FACTOR_RULES`, then the two largest dims. ``logical_axes``: a tree of
    ``PartitionSpec`` like ``params`` (``Method.logical_axes``), or None (axis rules never
    match)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    if logical_axes is None:
        specs = [None] * len(leaves)
    else:
        specs = treedef.flatten_up_to(logical_axes)
    out = []
    for (key_path, leaf), spec in zip(leaves, specs):
        shape = tuple(np.shape(leaf))
        if not factored:
            out.append(None)
            continue
        path, axes = path_name(key_path), _axis_names(spec)
        rule = next((r for r in tuple(rules) + DEFAULT_FACTOR_RULES
                     if r.matches(path, axes, len(shape))), None)
        out.append(factoring_of(rule, path, shape, min_dim_size_to_factor))
    return out
