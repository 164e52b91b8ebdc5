"""Opening a SeqIO task: registration with the run's vocabulary, local data and user modules.

Every command that reads a SeqIO task (``train``, ``eval``, ``infer``, ``tasks``, ``show-task``)
passes its three settings (``vocabulary``, ``data_dir``, ``task_modules``) through
:func:`register_tasks` / :func:`open_task`, so tasks are registered and a bad task, data dir or
vocabulary is reported the same way everywhere (one ``UsageError``). ``tasks/`` (and so SeqIO and
TensorFlow) is imported only when a SeqIO task is opened.
"""

from __future__ import annotations

import difflib
import os
from typing import Optional, Sequence

from prompt_t5x.base import extras
from prompt_t5x.base.errors import UsageError
from prompt_t5x.data import synthetic


class MissingDataExtra(UsageError):
    """SeqIO/TensorFlow are not installed: SeqIO tasks cannot be registered (generated can)."""


def generated_task_hint(name: str) -> Optional[str]:
    """For a name that is not a generated task but looks like one (``synthetic_contain``): the
    "unknown task, did you mean" message; None for any other name.

    Asked before "SeqIO needs the data extra" is said: a misspelt generated task is a typo, and
    installing TensorFlow would not fix it.
    """
    if name in synthetic.TASKS:
        return None
    close = difflib.get_close_matches(name, synthetic.TASKS, n=2, cutoff=0.75)
    if not (close or name.startswith("synthetic")):
        return None
    mean = f" Did you mean {' or '.join(close)}?" if close else ""
    return (f"unknown task {name!r}.{mean} Generated tasks (no download, no extra; train, eval, "
            f"infer and show-task take them): {', '.join(synthetic.TASKS)}.")


def register_tasks(vocabulary: Optional[str] = None, data_dir: Optional[str] = None,
                   task_modules: Sequence[str] = ()) -> None:
    """Import the task registry, re-registered with ``vocabulary`` and the local-file tasks of
    ``data_dir`` when either is given, then each user module of ``task_modules``.

    Raises UsageError (one message) for a bad data dir, a module that cannot be imported, or
    SeqIO/TensorFlow missing.
    """
    try:
        from prompt_t5x.data import seqio_bridge
        seqio_bridge.import_tensorflow()   # first, quietly (see there)
        import tasks
    except ImportError as e:
        # SeqIO/TensorFlow are the optional 'data' extra (the GPU image, for one, has neither).
        raise MissingDataExtra(f"SeqIO tasks need the data extra: {extras.install_hint('data')}"
                               f" (import failed: {e}); the generated synthetic_* tasks need "
                               "none.") from None
    try:
        if vocabulary or data_dir:
            tasks.register_all(vocab_path=vocabulary, data_dir=data_dir)
        for module in task_modules:
            tasks.load_task_module(module)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None


def open_task(name: str, splits: Sequence[str] = (), *, vocabulary: Optional[str] = None,
              data_dir: Optional[str] = None, task_modules: Sequence[str] = ()):
    """The registered SeqIO task or mixture ``name`` (after :func:`register_tasks` with the
    other arguments), checked to have every split of ``splits``; UsageError if not."""
    hint = generated_task_hint(name)
    if hint and not task_modules:
        # tasks/ registers no synthetic* names (only a user module could): no need to import
        # TensorFlow to say so.
        raise UsageError(hint)
    try:
        register_tasks(vocabulary, data_dir, task_modules)
    except MissingDataExtra:
        if hint:
            raise UsageError(hint) from None
        raise
    from prompt_t5x.data import seqio_bridge
    try:
        provider = seqio_bridge.get_task_or_mixture(name)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(hint or str(e)) from None
    try:
        for split in splits:
            seqio_bridge.check_split(provider, split)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    return provider


def check_vocabulary(path: Optional[str]) -> None:
    """UsageError unless ``path`` is a local file or a remote (``gs://``...) URL."""
    if path and "://" not in path and not os.path.isfile(path):
        raise UsageError(f"vocabulary {path!r} not found: set --gin.VOCABULARY to a "
                         "SentencePiece .model file (T5's cc_all.32000.100extra).")
    if path and "://" not in path:
        _check_sentencepiece(path)


def _check_sentencepiece(path: str) -> None:
    """UsageError naming ``path`` unless it parses as a SentencePiece model. SeqIO loads the
    vocabulary lazily, on first use deep inside the task, where a wrong file (a text vocab, a
    .json) is a protobuf ``DecodeError`` that does not say which file was wrong."""
    import sentencepiece  # a small C++ library (SeqIO's own dependency); no TensorFlow
    with open(path, "rb") as f:
        data = f.read()
    try:
        sentencepiece.SentencePieceProcessor().LoadFromSerializedProto(data)
    except (RuntimeError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"vocabulary {path!r} is not a SentencePiece model ({reason[:120]}): "
                         "set --gin.VOCABULARY to a SentencePiece .model file (T5's "
                         "cc_all.32000.100extra).") from None
