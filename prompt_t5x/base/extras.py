"""The optional extras of ``setup.py`` and the check a command makes before it starts working.

A plain install (``pip install -e .``) has the core only: JAX, Flax, Orbax, gin, SentencePiece.
``data`` (SeqIO, TensorFlow, TFDS), ``plot`` (matplotlib) and ``reference`` (PyTorch, HF
transformers and PEFT) are extras. A command that needs one calls :func:`require` before any
work, so a missing extra is one message and exit status 2 at the start, never a traceback after
a long run (``scaling`` once trained its whole 17-minute sweep and then failed to import
matplotlib for the figure).

Modules are only *looked up* (``importlib.util.find_spec``), not imported: asking whether
TensorFlow is there must not cost TensorFlow's import time or its log lines.
"""

from __future__ import annotations

import importlib.util
from typing import Dict, List, Tuple

from prompt_t5x.base.errors import UsageError

# extra -> the top-level modules of its packages that our code imports (setup.py's lists).
EXTRAS: Dict[str, Tuple[str, ...]] = {
    "data": ("seqio", "tensorflow", "tensorflow_datasets"),
    "plot": ("matplotlib",),
    "reference": ("torch", "transformers", "peft"),
}


def missing(extra: str) -> List[str]:
    """The modules of ``extra`` that are not installed (empty when it is complete)."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; setup.py has {sorted(EXTRAS)}")
    gone = []
    for module in EXTRAS[extra]:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):   # a broken or half-removed installation
            found = False
        if not found:
            gone.append(module)
    return gone


def available(extra: str) -> bool:
    return not missing(extra)


def install_hint(extra: str) -> str:
    return f"pip install 'prompt_t5x[{extra}]' (from a checkout: pip install -e '.[{extra}]')"


def require(extra: str, purpose: str, alternative: str = "") -> None:
    """UsageError unless every module of ``extra`` is installed.

    ``purpose`` says what needs it ("scaling draws scaling.png"); ``alternative`` what the user
    can do instead without the extra ("or pass --no_plot").
    """
    gone = missing(extra)
    if gone:
        raise UsageError(f"{purpose} needs the '{extra}' extra ({', '.join(gone)} not "
                         f"installed): {install_hint(extra)}"
                         + (f"; {alternative}" if alternative else "") + ".")
