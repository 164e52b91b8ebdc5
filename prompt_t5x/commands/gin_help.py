"""``--help`` of the gin-configured commands (``train``, ``eval``, ``infer``, ``scaling``).

Written for the user, in T5X's manner: what the command does, the gin files to start from, the
``--gin.NAME`` knobs most runs set, and one example that runs as printed. The module docstrings
stay the developers' notes; nothing here names an internal function.

The gin flags are declared on the parser only to be listed: ``gin_cli.split_argv`` takes every
``--gin_file`` / ``--gin.NAME=VALUE`` / ``--gin_search_paths`` out of the command line before
argparse sees it.
"""

from __future__ import annotations

import argparse
import textwrap
from typing import Sequence, Tuple

MODEL_FILES: Sequence[Tuple[str, str]] = (
    ("models/quickstart.gin", "the bundled tiny T5 (offline; pair it with a synthetic_* task)"),
    ("models/{small,base,large,xl,xxl}.gin", "T5 1.1 LM-adapted sizes and their T5X checkpoints"),
    ("models/from_checkpoint.gin", "the config of --gin.CHECKPOINT, read from its weights"),
)
QUICKSTART_LENGTHS = "--gin.INPUTS_LENGTH=13 --gin.TARGETS_LENGTH=2"

HELP = {
    "train": dict(
        summary="Prompt-tune (or model-tune) a frozen T5, configured like T5X: a model gin file "
                "(the size and its checkpoint), a run gin file (the recipe), then --gin.NAME=VALUE"
                " bindings. Bad input (a binding, task, checkpoint or vocabulary) stops before "
                "anything is written; the same command run again resumes from the last "
                "checkpoint in MODEL_DIR.",
        files=MODEL_FILES + (
            ("runs/prompt_tuning.gin", "the paper's recipe: prompt 100, class-label init, lr 0.3"),
            ("runs/model_tuning.gin", "the model-tuning baseline (every weight trained)"),
            ("runs/bias_tuning.gin", "bias tuning with null prompts (TASK=null_<task>)"),
            ("prompts/{sampled_vocab,random_uniform,from_file}.gin",
             "another prompt init (after the run file)")),
        knobs="MODEL_DIR and TASK (required; 'prompt-t5x tasks' lists tasks), CHECKPOINT, "
              "TRAIN_STEPS, BATCH_SIZE, INPUTS_LENGTH, TARGETS_LENGTH, PROMPT_LENGTH, "
              "LEARNING_RATE, EVAL_EVERY, CHECKPOINT_EVERY, VOCABULARY, DATA_DIR, MESH ('4x2', "
              "'auto'); any line of the run file, e.g. --gin.train.early_stopping_patience=5",
        example="prompt-t5x train --gin_file=models/quickstart.gin "
                "--gin_file=runs/prompt_tuning.gin --gin.MODEL_DIR=/tmp/pt_quickstart "
                f"--gin.TASK=synthetic_contains {QUICKSTART_LENGTHS} --gin.PROMPT_LENGTH=8 "
                "--gin.TRAIN_STEPS=400 --gin.EVAL_EVERY=100"),
    "eval": dict(
        summary="Score a trained prompt (a training MODEL_DIR, a .npy or a PEFT adapter; or "
                "--ensemble of several) on a task split and write OUTPUT_DIR/<task>_<split>"
                "_metrics.json. A training run brings its own frozen checkpoint, model size and "
                "prompt mode; classification tasks are rank-classified, others decoded.",
        files=(("runs/eval.gin", "the default; every knob below is a line of it"),),
        knobs="PROMPT, TASK, OUTPUT_DIR (required), CHECKPOINT (for a .npy / adapter prompt), "
              "SPLIT, INPUTS_LENGTH, TARGETS_LENGTH, BATCH_SIZE, VOCABULARY, DATA_DIR, MODE "
              "('auto', 'rank', 'decode'), STRATEGY ('greedy', 'beam', 'sample'), MAX_EXAMPLES",
        example="prompt-t5x eval --gin.PROMPT=/tmp/pt_quickstart --gin.TASK=synthetic_contains "
                f"{QUICKSTART_LENGTHS} --gin.OUTPUT_DIR=/tmp/pt_quickstart/eval"),
    "infer": dict(
        summary="Predict a task split with a trained prompt (or --ensemble) and write "
                "OUTPUT_DIR/<task>_<split>_predictions.jsonl, one JSON line per example.",
        files=(("runs/infer.gin", "the default; every knob below is a line of it"),),
        knobs="PROMPT, TASK, OUTPUT_DIR (required), CHECKPOINT, SPLIT, INPUTS_LENGTH, "
              "TARGETS_LENGTH, BATCH_SIZE, VOCABULARY, DATA_DIR, MODE, STRATEGY, BEAM_SIZE, "
              "TEMPERATURE, MAX_EXAMPLES",
        example="prompt-t5x infer --gin.PROMPT=/tmp/pt_quickstart --gin.TASK=synthetic_contains"
                f" {QUICKSTART_LENGTHS} --gin.OUTPUT_DIR=/tmp/pt_quickstart/infer"),
    "scaling": dict(
        summary="Prompt tuning and model tuning over several model sizes (each optionally "
                "pretrained first), then scaling.csv and scaling.png: best validation metric "
                "against model parameters (chance level, and min-max over SEEDS), and the "
                "share of parameters trained. An interrupted sweep resumes.",
        files=(("runs/scaling.gin", "the default: three tiny T5s on a generated task, "
                                    "offline on CPU in minutes"),),
        knobs="OUTPUT_DIR, MODELS (a list of {'name', 'size', 'checkpoint', T5Config fields}), "
              "TASK, SEEDS, CHANCE, TRAIN_STEPS, PRETRAIN_STEPS, BATCH_SIZE, PROMPT_LENGTH, "
              "EVAL_EVERY",
        example="prompt-t5x scaling --gin_file=runs/scaling.gin "
                "--gin.OUTPUT_DIR=/tmp/prompt_t5x_scaling"),
    "compare": dict(
        summary="Several tuning methods on one task, each trained by its own run gin file (its "
                "paper recipe) with the shared settings and its own overrides on top, each in "
                "its own process; then compare.csv, compare.md and compare.png: best validation "
                "metric against trainable parameters, train time and peak memory per method. "
                "Run again, finished methods are not re-run.",
        files=(("runs/compare.gin", "the default: every method on the bundled tiny "
                                    "T5 on a generated task, offline on CPU in minutes"),),
        knobs="OUTPUT_DIR, METHODS (labels of compare.runs), MODEL_GIN, CHECKPOINT, TASK, "
              "DATA_DIR, VOCABULARY, TRAIN_STEPS, BATCH_SIZE, INPUTS_LENGTH, TARGETS_LENGTH, "
              "EVAL_EVERY, CHANCE; one method's entry, e.g. --gin.PROMPT_TUNING=\"['runs/"
              "prompt_tuning.gin', 'PROMPT_LENGTH = 20']\"",
        example="prompt-t5x compare --gin.OUTPUT_DIR=/tmp/prompt_t5x_compare"),
}


def _wrap(text: str, indent: str = "") -> str:
    return textwrap.fill(text, width=96, initial_indent=indent, subsequent_indent=indent)


def description(name: str) -> str:
    h = HELP[name]
    width = min(max(len(f) for f, _ in h["files"]), 30)
    lines = [_wrap(h["summary"]), "",
             _wrap("gin files to start from (looked up in --gin_search_paths, the current "
                   "directory and the package's gin/):")]
    for f, what in h["files"]:
        # A long file pattern gets its own line rather than pushing every description right.
        lines += ([f"  {f.ljust(width)}  {what}"] if len(f) <= width
                  else [f"  {f}", f"  {'':{width}}  {what}"])
    lines += ["", "common knobs (--gin.NAME=VALUE; a value that is not a Python literal is "
                  "taken as a string):", _wrap(h["knobs"], "  "), "",
              "example:", "  " + " \\\n    ".join(_split_example(h["example"]))]
    return "\n".join(lines)


def _split_example(command: str, width: int = 88) -> Sequence[str]:
    """The example's words in shell lines of at most ``width`` characters."""
    lines, current = [], ""
    for word in command.split():
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}".strip()
    return lines + [current]


def gin_parser(name: str, default_file: str = "") -> argparse.ArgumentParser:
    """The parser of gin command ``name`` with its help text and the gin flags listed first."""
    parser = argparse.ArgumentParser(
        prog=f"prompt-t5x {name}", description=description(name),
        usage=f"prompt-t5x {name} [--gin_file=FILE ...] [--gin.NAME=VALUE ...] [flags]",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    gin = parser.add_argument_group("gin")
    gin.add_argument("--gin_file", metavar="FILE", action="append",
                     help="a gin file (repeatable, read in order)"
                          + (f"; default {default_file}" if default_file else ""))
    gin.add_argument("--gin.NAME", metavar="VALUE", dest="gin_binding_shown_in_help",
                     help="bind a macro or a parameter (repeatable): --gin.TASK=rte, "
                          "--gin.train.batch_size=16")
    gin.add_argument("--gin_search_paths", metavar="DIR,...",
                     help="more directories to look gin files up in")
    return parser
