"""``prompt-t5x tasks`` and ``prompt-t5x show-task``: what is registered and what it produces.

  prompt-t5x tasks [--filter SUBSTR] [--task_module MOD] [--data_dir DIR] [--vocab PATH]
  prompt-t5x show-task NAME [--split validation] [-n 5] [--inputs_length 512]
                            [--targets_length 64] [--task_module MOD] [--data_dir DIR]
                            [--vocab PATH]

``--data_dir`` registers local-file tasks (see ``tasks.local_files``); ``--task_module`` imports a
user module that registers its own SeqIO tasks; ``--vocab`` overrides the SentencePiece model
(default ``$PROMPT_T5X_VOCAB`` or T5's GCS vocabulary). Tasks are opened as every other command
opens them (``prompt_t5x.data.task_registry``).

The generated tasks (``prompt_t5x.data.synthetic``: ``synthetic_*``) are listed and shown too,
in any install: they need no SeqIO, no download and no vocabulary file.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, TextIO

from prompt_t5x.base.errors import UsageError
from prompt_t5x.data import run_data, synthetic, task_registry


def _common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task_module", action="append", default=[],
                        help="import this module to register more tasks (repeatable)")
    parser.add_argument("--data_dir", help="register local-file tasks from this directory")
    parser.add_argument("--vocab", help="SentencePiece model path (overrides $PROMPT_T5X_VOCAB)")


def tasks_main(argv: List[str], out: TextIO = None) -> int:
    parser = argparse.ArgumentParser(
        prog="prompt-t5x tasks",
        description="List the tasks every command takes: the generated synthetic_* tasks (any "
                    "install) and the registered SeqIO tasks and mixtures (the data extra).")
    parser.add_argument("--filter", default="", help="only names containing this substring")
    _common_flags(parser)
    args = parser.parse_args(argv)
    out = out or sys.stdout
    generated = [n for n in synthetic.TASKS if args.filter in n]
    try:
        task_registry.register_tasks(args.vocab, args.data_dir, args.task_module)
    except task_registry.MissingDataExtra as e:
        if args.vocab or args.data_dir or args.task_module:
            raise   # the user asked for SeqIO tasks explicitly
        _print_generated(generated, max([len(n) for n in generated] + [10]), out)
        print(f"SeqIO tasks: not available in this install. {e}", file=out)
        return 0
    import seqio

    from tasks import families
    task_names = sorted(n for n in seqio.TaskRegistry.names() if args.filter in n)
    mixture_names = sorted(n for n in seqio.MixtureRegistry.names() if args.filter in n)
    width = max([len(n) for n in task_names + mixture_names + generated] + [10])
    _print_generated(generated, width, out)
    print(f"tasks ({len(task_names)}):", file=out)
    for name in task_names:
        task = seqio.get_mixture_or_task(name)
        info = families.TASK_INFO.get(name)
        kind = f"{info.source}/{info.variant}" if info else "user"
        print(f"  {name.ljust(width)}  {kind:<20} splits: {', '.join(task.splits)}", file=out)
    print(f"mixtures ({len(mixture_names)}):", file=out)
    for name in mixture_names:
        mixture = seqio.get_mixture_or_task(name)
        text = families.MIXTURE_NAMES.get(name) or f"{len(mixture.tasks)} tasks"
        print(f"  {name.ljust(width)}  {text}", file=out)
    return 0


def _print_generated(names: List[str], width: int, out: TextIO) -> None:
    print(f"generated tasks ({len(names)}; no download, no extra):", file=out)
    for name in names:
        print(f"  {name.ljust(width)}  {'generated':<20} splits: "
              f"{', '.join(run_data.SyntheticData.splits)}", file=out)


def _show_generated(args, out: TextIO) -> int:
    """show-task for a generated task: its records and their ids in the word vocabulary."""
    if args.split not in run_data.SyntheticData.splits:
        raise UsageError(f"generated task {args.name!r} has no split {args.split!r}; available: "
                         f"{', '.join(run_data.SyntheticData.splits)}")
    source = run_data.SyntheticData(args.name, args.inputs_length, args.targets_length,
                                    batch_size=args.num_examples, seed=args.seed)
    records = (source.eval_examples() if args.split == "validation"
               else source.train_examples(0))[:args.num_examples]
    lengths = {"inputs": args.inputs_length, "targets": args.targets_length}
    for i, record in enumerate(records):
        print(f"=== {args.name} [{args.split}] example {i}", file=out)
        for key in ("inputs", "targets"):
            ids = (synthetic.encode(record[key]) + [synthetic.EOS])[:lengths[key]]
            print(f"{key}: {record[key]}", file=out)
            print(f"{key}_ids ({len(ids)}): {ids}", file=out)
    return 0


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def show_task_main(argv: List[str], out: TextIO = None) -> int:
    parser = argparse.ArgumentParser(prog="prompt-t5x show-task",
                                     description="Print preprocessed examples of a task.")
    parser.add_argument("name", help="task or mixture name (see 'prompt-t5x tasks')")
    parser.add_argument("--split", default="validation")
    parser.add_argument("-n", "--num_examples", type=int, default=5)
    parser.add_argument("--inputs_length", type=int, default=512)
    parser.add_argument("--targets_length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="seed of random preprocessing")
    _common_flags(parser)
    args = parser.parse_args(argv)
    if args.num_examples < 1:
        raise UsageError(f"-n must be >= 1, got {args.num_examples}")
    out = out or sys.stdout
    if args.name in synthetic.TASKS:
        return _show_generated(args, out)
    provider = task_registry.open_task(args.name, (args.split,), vocabulary=args.vocab,
                         data_dir=args.data_dir, task_modules=args.task_module)
    import tensorflow as tf

    from prompt_t5x.data import seqio_bridge

    try:
        from tasks import vocab
        vocab.check_provider_vocab(provider)
        lengths = {"inputs": args.inputs_length, "targets": args.targets_length}
        kwargs = dict(split=args.split, shuffle=False, seed=args.seed, num_epochs=1,
                      use_cached=False, try_in_mem_cache=False)
        if hasattr(provider, "tasks"):  # a mixture: keep the strings for display
            kwargs["copy_pretokenized"] = True
        ds = provider.get_dataset(lengths, **kwargs)
        examples = list(ds.take(args.num_examples).as_numpy_iterator())
    except (seqio_bridge.DataError, ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    except tf.errors.OpError as e:
        raise UsageError(f"task {args.name!r} split {args.split!r}: {e.message}") from None
    if not examples:
        raise UsageError(f"task {args.name!r} split {args.split!r} is empty.")

    features = provider.output_features
    for i, ex in enumerate(examples):
        print(f"=== {args.name} [{args.split}] example {i}", file=out)
        for key in ("inputs", "targets"):
            if key not in ex:
                continue
            ids = [int(t) for t in ex[key]]
            text = (_text(ex[f"{key}_pretokenized"]) if f"{key}_pretokenized" in ex
                    else features[key].vocabulary.decode(ids))
            print(f"{key}: {text}", file=out)
            print(f"{key}_ids ({len(ids)}): {ids}", file=out)
    return 0
