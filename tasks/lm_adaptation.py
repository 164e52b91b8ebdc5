"""LM adaptation: the prefix-LM objective over C4, as used to adapt T5 1.1 before prompt tuning.

Given a span of natural text, the encoder reads a prefix and the decoder must produce the
continuation (no sentinels), see ``tasks.preprocessors.prefix_lm``. ``c4_prefix_lm`` reads TFDS
``c4/en``; ``register_local_text`` builds the same objective over local ``.txt`` files (one
document per non-empty line), e.g. WikiText-2.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Mapping, Optional

import seqio

from tasks import families as fam
from tasks import preprocessors as prep
from tasks import vocab as vocab_lib

C4_TASK = "c4_prefix_lm"
C4_TFDS_NAME = "c4/en:3.1.0"


def _lm_preprocessors():
    return [prep.text_to_targets, seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
            prep.prefix_lm, seqio.preprocessors.append_eos_after_trim]


def register(vocab_path: Optional[str] = None) -> str:
    fam.add_task(
        C4_TASK, fam.TaskInfo(C4_TASK, None, "standard", "tfds"),
        source=seqio.TfdsDataSource(tfds_name=C4_TFDS_NAME,
                                    splits={"train": "train", "validation": "validation"}),
        output_features=vocab_lib.output_features(vocab_path),
        preprocessors=_lm_preprocessors(),
        metric_fns=[])
    return C4_TASK


def _text_dataset(split: str, shuffle_files: bool, seed: Optional[int] = None, *,
                  files: Mapping[str, str], task_name: str):
    import tensorflow as tf
    del shuffle_files, seed
    path = pathlib.Path(files[split])
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    documents = [line for line in lines if line]
    if not documents:
        raise ValueError(f"task {task_name!r}: split {split!r} is empty: {path} has no "
                         "non-blank line.")
    return tf.data.Dataset.from_tensor_slices({"text": documents})


def register_local_text(name: str, files: Mapping[str, str],
                        vocab_path: Optional[str] = None) -> str:
    """Prefix-LM task ``name`` over local text files ``{split: path}``."""
    missing = {s: p for s, p in files.items() if not pathlib.Path(p).is_file()}
    if missing:
        raise FileNotFoundError(f"task {name!r}: missing text file(s): {missing}")
    fam.add_task(
        name, fam.TaskInfo(name, None, "standard", "local", local_files=dict(files)),
        source=seqio.FunctionDataSource(
            functools.partial(_text_dataset, files=dict(files), task_name=name),
            splits=list(files)),
        output_features=vocab_lib.output_features(vocab_path),
        preprocessors=_lm_preprocessors(),
        metric_fns=[])
    return name
