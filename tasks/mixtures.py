"""SeqIO mixtures: several tasks sampled at rates proportional to their training-set sizes,
each size capped (T5's "examples-proportional mixing" with limit K), so that e.g. ReCoRD's 139k
examples do not drown CB's 250.

Registered (each also as ``taskless_*`` and ``*_task_index`` mixtures over the matching task
variants):
  super_glue_v102  boolq, cb, copa, multirc, record, rte, wic, wsc (simple, train)
  glue_v002        cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli
"""

from __future__ import annotations

from typing import Callable, List, Sequence

import seqio

from tasks import families as fam
from tasks import glue, superglue

DEFAULT_CAP = 2 ** 19   # T5's examples-proportional limit K for its multi-task mixtures


def capped_size_rate(cap: int = DEFAULT_CAP) -> Callable[[seqio.Task], float]:
    """Rate function: ``min(train examples, cap)`` from the task's family table (no TFDS call,
    so building a mixture needs neither network nor downloaded data)."""
    if cap <= 0:
        raise ValueError(f"mixture cap must be positive, got {cap}")

    def rate(task: seqio.Task) -> float:
        info = fam.TASK_INFO.get(task.name)
        if info is None or info.family is None or info.family.train_examples <= 0:
            raise ValueError(f"task {task.name!r} has no known training-set size; give the "
                             "mixture explicit rates instead.")
        return float(min(info.family.train_examples, cap))
    return rate


def register_proportional_mixture(name: str, task_names: Sequence[str], cap: int = DEFAULT_CAP,
                                  description: str = "") -> str:
    """Register ``name`` mixing ``task_names`` at capped size-proportional rates."""
    unknown = [t for t in task_names if t not in seqio.TaskRegistry.names()]
    if unknown:
        raise ValueError(f"mixture {name!r}: unknown task(s) {unknown}")
    fam.add_mixture(name, list(task_names),
                    description or f"{len(task_names)} tasks, size-proportional (cap {cap})",
                    default_rate=capped_size_rate(cap))
    return name


def register(cap: int = DEFAULT_CAP) -> List[str]:
    names = []
    for benchmark, families in (("super_glue_v102", superglue.TRAINABLE),
                                ("glue_v002", glue.TRAINABLE)):
        base = [f.task_name for f in families]
        for mixture, tasks in ((benchmark, base),
                               (f"taskless_{benchmark}", [f"taskless_{t}" for t in base]),
                               (f"{benchmark}_task_index", [f"{t}_task_index" for t in base])):
            names.append(register_proportional_mixture(
                mixture, tasks, cap,
                f"{', '.join(f.name for f in families)} (size-proportional, cap {cap})"))
    return names
