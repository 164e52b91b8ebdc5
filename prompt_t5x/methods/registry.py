"""Every method by its ``kind``: rebuilding a method from a manifest or an exported file.

A run directory records ``method.method_config()`` (``{'kind': 'prefix_tuning', ...}``) in its
training manifest; an exported file carries the same JSON. ``build(model, method_config)`` turns
it back into the ``Method`` that runs the saved state (a setting its own checks refuse is a
``UsageError``: one line, exit 2), so ``eval``/``infer``/``export`` need
nothing but the file. Method modules are imported on first use (``MODULES``): listing one here
is all a new method needs to be found.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict, Mapping, Type

from prompt_t5x.base.errors import UsageError
from prompt_t5x.methods.interface import Method
from prompt_t5x.model.t5 import T5

# kind -> module defining it (imported lazily: a method's module may be heavy).
MODULES: Dict[str, str] = {
    "prompt_tuning": "prompt_t5x.methods.prompt_tuning",
    "model_tuning": "prompt_t5x.methods.model_tuning",
    "bias_tuning": "prompt_t5x.methods.bias_tuning",
    "p_tuning": "prompt_t5x.methods.p_tuning",
    "deep_prompts": "prompt_t5x.methods.deep_prompts",
    "classification_head": "prompt_t5x.methods.classification_head",
    "prefix_tuning": "prompt_t5x.methods.prefix_tuning",
    "multitask_prompts": "prompt_t5x.methods.task_bank",
    "idpg": "prompt_t5x.methods.idpg",
    "spt": "prompt_t5x.methods.spt",
    "mpt_source": "prompt_t5x.methods.mpt",
    "mpt_target": "prompt_t5x.methods.mpt",
    "ipt": "prompt_t5x.methods.ipt",
}


class UnknownMethodError(ValueError):
    pass


def method_class(kind: str) -> Type[Method]:
    """The ``Method`` subclass whose ``kind`` is ``kind``."""
    if kind not in MODULES:
        raise UnknownMethodError(f"unknown method {kind!r}; known: {', '.join(sorted(MODULES))}")
    module = importlib.import_module(MODULES[kind])
    for value in vars(module).values():
        if (isinstance(value, type) and issubclass(value, Method)
                and getattr(value, "kind", "") == kind):
            return value
    raise UnknownMethodError(f"module {MODULES[kind]} defines no Method with kind {kind!r}")


def build(model: T5, method_config: Mapping[str, Any], **build_context) -> Method:
    """``method_config`` = ``{'kind': ..., **settings}`` -> the method (see module docstring)."""
    config = dict(method_config)
    kind = config.pop("kind", None)
    if not kind:
        raise UnknownMethodError(f"method config {method_config!r} has no 'kind'")
    cls = method_class(kind)
    try:
        return cls.from_config(model, config, **build_context)
    except TypeError as e:   # a setting this version does not know
        raise UnknownMethodError(f"method {kind!r}: bad settings {sorted(config)}: {e}") from None
    except UnknownMethodError:
        raise
    except ValueError as e:   # a method's own check of its settings (__post_init__)
        raise UsageError(f"method {kind!r}: {e}") from None
