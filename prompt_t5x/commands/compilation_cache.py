"""The CLI's persistent JAX compilation cache: a second run of the same shapes loads its
executables from disk instead of compiling them again.

On by default for every ``prompt-t5x`` command but ``bench`` (whose figures include compile
time), in ``$XDG_CACHE_HOME/prompt_t5x/jax_compilation_cache`` (``~/.cache/...`` without
``XDG_CACHE_HOME``); ``--compilation_cache_dir DIR`` puts it elsewhere and
``--no_compilation_cache`` (or ``PROMPT_T5X_COMPILATION_CACHE=0`` in the environment: the test
suite's setting) turns it off. Both flags are taken off the command line before the
command parses its own (gin-style commands cannot declare them). A cache directory the user gave
JAX already (``JAX_COMPILATION_CACHE_DIR``) is left as it is.

The cache key is JAX's: the lowered program, the backend and its version, the XLA flags and the
device kind, so a changed model, shape, flag or jaxlib compiles anew instead of loading a stale
executable. Only process 0 of a multi-process run writes entries (JAX's rule).
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional, Sequence, Tuple

OFF_FLAG = "--no_compilation_cache"
DIR_FLAG = "--compilation_cache_dir"
ENV_SWITCH = "PROMPT_T5X_COMPILATION_CACHE"
# bench times compilation (compile_s); a cache would turn that figure into a disk read.
UNCACHED_COMMANDS = frozenset({"bench"})


def default_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "prompt_t5x", "jax_compilation_cache")


def take_flags(argv: Sequence[str]) -> Tuple[List[str], Optional[str]]:
    """``(argv without the cache flags, cache directory or None when turned off)``."""
    rest, path, off = [], default_dir(), False
    it = iter(argv)
    for a in it:
        if a == OFF_FLAG:
            off = True
        elif a == DIR_FLAG:
            path = next(it, None)
            if path is None:
                from prompt_t5x.base.errors import UsageError
                raise UsageError(f"{DIR_FLAG} needs a directory")
        elif a.startswith(DIR_FLAG + "="):
            path = a.split("=", 1)[1]
        else:
            rest.append(a)
    off = off or os.environ.get(ENV_SWITCH, "1") == "0"
    return rest, None if off else path


def enable(path: str) -> str:
    """Point JAX's persistent cache at ``path`` (unless JAX already has a directory); the
    directory in use.

    Before JAX is imported this only sets JAX's own environment variables: importing JAX here
    would fix its backends before a command sets what they read at start-up (``plan`` asks for N
    fake CPU devices through ``XLA_FLAGS``). Once JAX is imported, its config is updated.
    """
    # JAX by default skips programs that compiled in under a second; on a CPU most of a
    # command's programs do (the quickstart's 22 take 0.01 to 2.4 s), and together they are a
    # third of its run time. Reading an entry back costs milliseconds.
    settings = {"jax_compilation_cache_dir": path,
                "jax_persistent_cache_min_compile_time_secs": 0.0,
                "jax_persistent_cache_min_entry_size_bytes": 0}
    if "jax" not in sys.modules:
        path = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", path)
        for name, value in list(settings.items())[1:]:
            os.environ.setdefault(name.upper(), str(value))
        return path
    import jax
    settings["jax_compilation_cache_dir"] = jax.config.jax_compilation_cache_dir or path
    for name, value in settings.items():
        jax.config.update(name, value)
    return settings["jax_compilation_cache_dir"]


def configure(command: str, argv: Sequence[str]) -> List[str]:
    """Apply the cache flags for ``command``; the rest of ``argv`` for the command itself."""
    rest, path = take_flags(argv)
    if path is None:
        # Off for the command's child processes too (compare trains each method in one).
        os.environ[ENV_SWITCH] = "0"
    elif command not in UNCACHED_COMMANDS:
        enable(path)
    return rest
