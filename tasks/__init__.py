"""SeqIO tasks and mixtures of prompt_t5x; importing this package registers them all.

Registered on import:
  * SuperGLUE and GLUE from TFDS (``super_glue_rte_v102``, ``glue_sst2_v002``, ...), each with a
    ``taskless_`` variant and a ``_task_index`` variant (see ``tasks.families``);
  * ``c4_prefix_lm``: T5's LM adaptation objective over C4;
  * mixtures ``super_glue_v102`` and ``glue_v002`` (and their variants);
  * local-file tasks for every family directory under ``$PROMPT_T5X_DATA_DIR`` if set.

The vocabulary path comes from ``$PROMPT_T5X_VOCAB`` (default: T5's GCS vocabulary); call
``register_all(vocab_path=..., data_dir=...)`` to re-register everything with other settings.
Users add their own tasks the SeqIO way in a module loaded with ``load_task_module("mymod")``
(CLI flag ``--task_module=mymod``).
"""

from __future__ import annotations

import importlib
import os
from typing import List, Optional

from tasks import families, glue, lm_adaptation, local_files, mixtures, superglue, vocab

DATA_DIR_ENV_VAR = "PROMPT_T5X_DATA_DIR"

try:  # gin is optional here: a binding `tasks.register_all.vocab_path = '...'` overrides
    import gin
    _configurable = gin.configurable("tasks.register_all")
except ImportError:  # pragma: no cover
    def _configurable(fn):
        return fn


@_configurable
def register_all(vocab_path: Optional[str] = None, data_dir: Optional[str] = None) -> List[str]:
    """(Re-)register every built-in task and mixture; return the task names registered.

    A given ``vocab_path`` also becomes the default for tasks registered afterwards.
    """
    if vocab_path:
        vocab.set_vocab_path(vocab_path)
    names = superglue.register(vocab_path, first_task_index=0)
    names += glue.register(vocab_path, first_task_index=len(superglue.FAMILIES))
    names.append(lm_adaptation.register(vocab_path))
    mixtures.register()
    data_dir = data_dir or os.environ.get(DATA_DIR_ENV_VAR)
    if data_dir:
        names += local_files.register_local_dir(data_dir, vocab_path=vocab_path)
    return names


def load_task_module(module_name: str):
    """Import a user module that registers extra SeqIO tasks/mixtures (``--task_module``)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ValueError(f"task module {module_name!r} could not be imported ({e}); make sure "
                         "it is on PYTHONPATH.") from e


register_all()

__all__ = ["families", "glue", "superglue", "lm_adaptation", "local_files", "mixtures", "vocab",
           "register_all", "load_task_module"]
