"""The CLI's persistent compilation cache: on by default, off with a flag, hit by a second run."""

import os
import subprocess
import sys

import pytest

from prompt_t5x.base import errors
from prompt_t5x.commands import compilation_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(tmp_path, **extra):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg"), **extra)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env.pop(compilation_cache.ENV_SWITCH, None)   # conftest's off switch for the other tests
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_flags_are_taken_off_the_command_line(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(compilation_cache.ENV_SWITCH, raising=False)
    default = str(tmp_path / "prompt_t5x" / "jax_compilation_cache")
    assert compilation_cache.take_flags(["--steps", "3"]) == (["--steps", "3"], default)
    assert compilation_cache.take_flags(["--no_compilation_cache", "--x=1"]) == (["--x=1"], None)
    assert compilation_cache.take_flags(["--compilation_cache_dir", "/c", "a"]) == (["a"], "/c")
    assert compilation_cache.take_flags(["--compilation_cache_dir=/c"]) == ([], "/c")
    with pytest.raises(errors.UsageError):
        compilation_cache.take_flags(["--compilation_cache_dir"])
    monkeypatch.setenv(compilation_cache.ENV_SWITCH, "0")
    assert compilation_cache.take_flags(["a"]) == (["a"], None)


@pytest.mark.parametrize("command, flags, expected", [
    ("quickstart", [], "default"),
    ("quickstart", ["--no_compilation_cache"], None),
    ("train", ["--compilation_cache_dir=/elsewhere"], "/elsewhere"),
    ("bench", [], None),   # bench reports compile time: never cached
])
def test_cli_enables_the_cache_by_default(tmp_path, command, flags, expected):
    # Configured before JAX is imported (as the CLI does: a command may still set XLA_FLAGS),
    # then read back from JAX itself.
    code = ("import sys; from prompt_t5x.commands import compilation_cache; "
            f"rest = compilation_cache.configure({command!r}, {flags + ['--keep']!r}); "
            "assert rest == ['--keep'], rest; assert 'jax' not in sys.modules; import jax; "
            "print(jax.config.jax_compilation_cache_dir)")
    out = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path), check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    if expected == "default":
        expected = str(tmp_path / "xdg" / "prompt_t5x" / "jax_compilation_cache")
    assert out == str(expected)


def test_second_run_loads_every_program_from_the_cache(tmp_path):
    """Two quickstart runs of the same shapes: the first writes entries to the default cache
    directory, the second compiles nothing (every program is a cache hit, no new entry)."""
    cache = tmp_path / "xdg" / "prompt_t5x" / "jax_compilation_cache"
    # --verbose: JAX's compile log lines are library logging, which the CLI hides by default.
    cmd = [sys.executable, "-m", "prompt_t5x", "quickstart", "--steps", "2", "--batch_size", "4",
           "--verbose"]
    env = _env(tmp_path, JAX_LOG_COMPILES="1")
    runs = []
    for _ in range(2):
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(tmp_path))
        assert "validation accuracy: before" in p.stdout, p.stderr[-3000:]
        runs.append((p.stderr, sorted(os.listdir(cache))))
    (first_log, first_files), (second_log, second_files) = runs
    assert len(first_files) >= 4 and "cache hit" not in first_log
    programs = second_log.count("Finished XLA compilation of")
    assert programs >= 4 and second_log.count("Persistent compilation cache hit") == programs
    assert second_files == first_files
