"""``prompt-t5x export``: a trained prompt -> ``.npy`` or a Hugging Face PEFT adapter, and back.

The formats live in ``prompt_t5x.checkpoints.prompt_export``; this is only the command line.
"""

from __future__ import annotations

import argparse
import os

from prompt_t5x.base.errors import UsageError
from prompt_t5x.checkpoints import method_export, peft_prefix, prompt_export, train_checkpoints


def main(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="prompt-t5x export",
        description="Export a trained prompt as .npy or a Hugging Face PEFT prompt-tuning adapter, "
                    "or import a PEFT prompt adapter back to .npy.")
    parser.add_argument("source", help="training model dir (or one of its checkpoints), a "
                                       "prompt .npy file, or a PEFT prompt adapter directory")
    parser.add_argument("--out", required=True,
                        help="output: a .npy file, or a directory for a PEFT adapter")
    parser.add_argument("--format", choices=("npy", "peft"), default=None,
                        help="output format (default: npy if --out ends in .npy, else peft); "
                             "--out x.safetensors (or any run of a method other than prompt "
                             "tuning) writes the method's inference tables + JSON config; "
                             "--format peft of a prefix-tuning run: a PEFT prefix adapter")
    parser.add_argument("--step", type=int, default=None,
                        help="training step to export (default: latest)")
    parser.add_argument("--base_model", default=None,
                        help="base_model_name_or_path recorded in the PEFT adapter config")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out (default: refuse, so an earlier export "
                             "is never lost by a repeated command)")
    args = parser.parse_args(argv)
    _refuse_existing(args.out, args.overwrite)
    kind = _run_kind(args)
    if args.format == "peft" and kind not in (None, "prompt_tuning", "prefix_tuning"):
        raise UsageError(f"{args.source} is a {kind} run, which has no PEFT form: export it "
                         "with --out x.safetensors (its tables + JSON config)")
    if args.format is not None and args.out.endswith(".safetensors"):
        raise UsageError(f"--format {args.format} but --out {args.out} is a .safetensors "
                         "path: drop --format (or pick an output of that format)")
    if args.format == "peft" and kind == "prefix_tuning":
        try:
            shape = peft_prefix.export_run(args.source, args.out, step=args.step,
                                           base_model_name_or_path=args.base_model)
        except (peft_prefix.PeftPrefixError, method_export.MethodExportError) as e:
            raise UsageError(str(e)) from e
        print(f"wrote PEFT prefix adapter (decoder self-attention {list(shape)}) to {args.out}")
        return 0
    if _method_export_wanted(args):
        try:
            tables, method_config = method_export.export_method(args.source, args.out,
                                                                step=args.step)
        except (method_export.MethodExportError, FileNotFoundError, ValueError) as e:
            raise UsageError(str(e)) from e
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in sorted(tables.items()))
        print(f"wrote {method_config['kind']} ({shapes}) to {args.out}")
        return 0
    try:
        fmt, prompt = prompt_export.export_prompt(args.source, args.out, fmt=args.format,
                                                  step=args.step,
                                                  base_model_name_or_path=args.base_model)
    except (prompt_export.ExportError, FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from e
    print(f"wrote {fmt} prompt [{prompt.shape[0]}, {prompt.shape[1]}] to {args.out}")
    return 0


def _refuse_existing(out: str, overwrite: bool) -> None:
    """An export names its output explicitly, and a repeated or mistyped command must not replace
    an earlier export (or any other file) silently: refuse unless --overwrite."""
    if overwrite or not os.path.exists(out):
        return
    if os.path.isdir(out) and not os.listdir(out):
        return   # an empty directory holds nothing to lose (e.g. made for the adapter)
    kind = "directory" if os.path.isdir(out) else "file"
    raise UsageError(f"--out {out} is an existing {kind}: pass --overwrite to replace it, or "
                     "choose another path.")


def _method_export_wanted(args) -> bool:
    """A .safetensors output, or a run of any method but prompt tuning (whose .npy/PEFT
    export stays as it was): the method's inference tables plus its JSON config."""
    if args.format == "peft":
        return False
    if args.out.endswith(".safetensors"):
        return True
    kind = _run_kind(args)
    return kind is not None and kind != "prompt_tuning"


def _run_kind(args):
    """The method kind of a training run ``args.source`` (None: not a run dir)."""
    model_dir = train_checkpoints.find_model_dir(args.source) \
        if os.path.isdir(args.source) else None
    if model_dir is None:
        return None
    try:
        manifest = train_checkpoints.TrainCheckpointer(model_dir, read_only=True).read_manifest(
            args.step)
    except train_checkpoints.TrainCheckpointError as e:
        raise UsageError(f"{args.source}: {e}") from None
    return method_export.manifest_method_config(manifest)["kind"]
