"""Shared pytest setup.

Eight fake CPU devices are requested *before* jax is imported anywhere, so the mesh tests can
build 1x8, 2x4, 4x2 and 8x1 meshes; single-device tests are unaffected (they use device 0).
"""

import os
import pathlib

# XLA's backend (LLVM) optimisation is off, as for tests/test_multiprocess.py's children: the
# tiny test models spend more time compiling than running (test_evaluation + test_decoding:
# 22% less CPU; a resume driver's compile: about half).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                                   "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TensorFlow (only used by tasks/ and the data bridge) must not grab GPU memory or spam logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Commands run in-process (cli.main) would turn on the CLI's persistent compilation cache in the
# user's cache directory; tests/test_compilation_cache.py turns it back on where it is tested.
os.environ.setdefault("PROMPT_T5X_COMPILATION_CACHE", "0")

import pytest  # noqa: E402

# Real third-party fixtures live beside the checkout, read-only; they are never copied in.
FIXTURES = pathlib.Path(
    os.environ.get("PROMPT_T5X_FIXTURES",
                   pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"shared fixtures not found at {FIXTURES} (set PROMPT_T5X_FIXTURES)")
    return FIXTURES


@pytest.fixture
def hide_modules(monkeypatch):
    """``hide_modules('matplotlib', ...)``: ``base.extras`` finds those modules not installed,
    as in a plain install (``pip install -e .``) that lacks an extra."""
    import importlib.util

    from prompt_t5x.base import extras
    real = importlib.util.find_spec

    def hide(*names):
        def find_spec(name, *args, **kwargs):
            if name.split(".")[0] in names:
                return None
            return real(name, *args, **kwargs)
        monkeypatch.setattr(extras.importlib.util, "find_spec", find_spec)
    return hide
