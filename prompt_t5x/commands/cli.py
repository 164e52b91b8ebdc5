"""The ``prompt-t5x`` command line: one subcommand per job, each living in its own module.

Subcommands are looked up lazily (``module:function``) so that ``prompt-t5x bench`` on a GPU
machine never imports TensorFlow/SeqIO, which only the data-facing commands need. Each target is a
function ``main(argv: list[str]) -> int``; it parses its own flags (gin-style commands take
``--gin_file`` / ``--gin.X=...`` which argparse cannot express as declared options).

Quiet by default: the libraries under us log on every run (TensorFlow's oneDNN/CUDA probes and
``cuInit`` failure, GCS auth attempts, JAX's backend fallback), none of it about the user's run.
Before any of them is imported, their log levels are raised so that a command prints only its own
output, warnings of ours (``prompt_t5x.*`` loggers) included; ``--verbose`` (anywhere on the
command line) keeps everything. A log level the user set in the environment is kept.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from typing import Dict, List, Optional, Tuple

from prompt_t5x.base.errors import run_command

# name -> (module, function, one-line help)
COMMANDS: Dict[str, Tuple[str, str, str]] = {
    "bench": ("prompt_t5x.bench.bench", "main",
              "Time train/eval steps (examples/s, MFU, memory); --peer peft runs HF PEFT too."),
    "quickstart": ("prompt_t5x.commands.quickstart", "main",
                   "Prompt-tune a frozen tiny T5 on a generated task (offline, CPU, minutes)."),
    "export": ("prompt_t5x.commands.export_cmd", "main",
               "Export a trained prompt as .npy or an HF PEFT adapter (or import one back)."),
    "inspect": ("prompt_t5x.commands.inspect_cmd", "main",
                "Print what a checkpoint/prompt path holds: format, step, T5 config, size."),
    "tasks": ("prompt_t5x.commands.task_cli", "tasks_main",
              "List the tasks: generated synthetic_* (any install), SeqIO tasks and mixtures."),
    "train": ("prompt_t5x.commands.run_train", "main",
              "Prompt-tune (or model-tune) T5, gin-configured."),
    "plan": ("prompt_t5x.commands.plan", "main",
             "AOT per-device memory/FLOPs of the sharded train step."),
    "scaling": ("prompt_t5x.commands.scaling", "main",
                "Prompt/model tuning over model sizes -> scaling.csv + scaling.png."),
    "compare": ("prompt_t5x.commands.compare", "main",
                "Several tuning methods on one task -> compare.csv/.md/.png (metric, cost)."),
    "show-task": ("prompt_t5x.commands.task_cli", "show_task_main",
                  "Print preprocessed examples of a task (strings and token ids)."),
    "eval": ("prompt_t5x.commands.evaluate_cmd", "eval_main",
             "Evaluate a prompt (or --ensemble) on a task split -> metrics JSON, gin-configured."),
    "infer": ("prompt_t5x.commands.evaluate_cmd", "infer_main",
              "Predict a task split with a prompt (or --ensemble) -> predictions JSONL."),
    "neighbors": ("prompt_t5x.commands.neighbors_cmd", "main",
                  "Nearest vocabulary tokens (cosine) of each soft-prompt vector."),
}


# Python loggers of third-party libraries silenced below ERROR unless --verbose.
THIRD_PARTY_LOGGERS = ("absl", "jax", "orbax", "tensorflow", "tensorflow_datasets", "seqio",
                       "google", "gcsfs", "fsspec", "urllib3", "h5py")
VERBOSE_FLAG = "--verbose"


def quiet_libraries() -> None:
    """Raise the log levels of the libraries under us (call before importing them)."""
    # TensorFlow's C++ logging (oneDNN, cudart, cuInit, google_auth_provider): errors too, as
    # they are about probing hardware and credentials a run does not need.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:   # absl keeps its own verbosity besides the Python level (orbax logs through it)
        from absl import logging as absl_logging
        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:  # pragma: no cover - absl comes with JAX and Orbax
        pass
    # Deprecation/future notices of third-party code are for its developers, not our users.
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: prompt-t5x COMMAND [FLAGS]", "", "commands:"]
    for name, (_, _, text) in sorted(COMMANDS.items()):
        lines.append(f"  {name.ljust(width)}  {text}")
    lines.append("")
    lines.append("Run 'prompt-t5x COMMAND --help' for the flags of one command; add "
                 f"{VERBOSE_FLAG} to see the log lines of the libraries underneath.")
    lines.append("Every command but bench keeps compiled programs in a persistent cache "
                 "(--compilation_cache_dir DIR; --no_compilation_cache turns it off).")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if VERBOSE_FLAG in argv:
        argv.remove(VERBOSE_FLAG)
    else:
        quiet_libraries()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"prompt-t5x: unknown command {name!r}.\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = COMMANDS[name]

    def command(args: List[str]) -> int:
        from prompt_t5x.commands import compilation_cache
        args = compilation_cache.configure(name, args)   # a bad cache flag is a UsageError too
        return getattr(importlib.import_module(module_name), func_name)(args)

    return run_command(name, command, rest)
