"""The best validation result and the early-stopping count, resumed from the checkpoint.

Why: the loop writes ``best.json`` (and ``prompts/best.npy``) as soon as an evaluation is done,
*before* that step's checkpoint. A run killed in between used to resume from the previous
checkpoint but read the newer ``best.json``: re-evaluating the same step then found "no
improvement" over itself, and early stopping fired one evaluation early per such kill. So the
tracker's state (best step, value, metrics, evaluations since the best) is saved in every
checkpoint's manifest (``TrainCheckpointer.save(best=...)``), and a resume takes it from the
checkpoint it resumes, rolling ``best.json`` and ``prompts/best.npy`` back to match. A
killed-and-resumed run thus makes exactly the decisions of an uninterrupted one.

``best.json`` is still what users and ``export`` read; it is only never trusted on resume when
the checkpoint knows better. Checkpoints written before the manifest held this state fall back
to ``best.json`` (the old behaviour). A run with no checkpoint starts with no best at all.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any, Dict, Mapping, Optional

import jax
import numpy as np

from prompt_t5x.base import storage

BEST_FILE = "best.json"


def is_better(value: Optional[float], best: Optional[float], mode: str) -> bool:
    if value is None or not math.isfinite(value):
        return False
    return best is None or (value > best if mode == "max" else value < best)


class BestTracker:
    """Best-by-``metric`` bookkeeping of one run (see the module docstring).

    ``resumed`` is the manifest of the checkpoint the run resumes (None for a new run);
    ``write`` is whether this process writes the files (process 0).
    """

    def __init__(self, model_dir: str, metric: str, mode: str,
                 resumed: Optional[Mapping[str, Any]] = None, write: bool = True):
        self.model_dir = model_dir
        self.path = os.path.join(model_dir, BEST_FILE)
        self.metric, self.mode = metric, mode
        self.step: Optional[int] = None
        self.value: Optional[float] = None
        self.metrics: Dict[str, float] = {}
        self.evals_since = 0
        if resumed is None:
            return   # a new run: any best.json here is a killed run's, and is replaced
        saved = resumed.get("best")
        if saved is None:
            saved = self._read_file()   # a checkpoint from before the manifest held it
        if saved and saved.get("metric") == metric:
            self.step, self.value = saved.get("step"), saved.get("value")
            self.metrics = dict(saved.get("metrics") or {})
            self.evals_since = int(saved.get("evaluations_since_best", 0))
        if write and "best" in resumed and self._read_file() != self.state():
            self._roll_back_files()

    def state(self) -> Dict[str, Any]:
        """What a checkpoint records (JSON), and what ``best.json`` holds."""
        return {"metric": self.metric, "mode": self.mode, "step": self.step, "value": self.value,
                "metrics": self.metrics, "evaluations_since_best": self.evals_since}

    def update(self, step: int, metrics: Mapping[str, float], trainable: Any,
               write: bool = True) -> bool:
        """Bookkeeping on every process; files only where ``write`` (process 0)."""
        value = metrics.get(self.metric)
        improved = is_better(value, self.value, self.mode)
        if improved:
            self.step, self.value, self.metrics = step, float(value), dict(metrics)
            self.evals_since = 0
            if write and isinstance(trainable, Mapping) and "prompt" in trainable:
                storage.write_npy_atomic(
                    os.path.join(self.model_dir, "prompts", "best.npy"),
                    np.asarray(jax.device_get(trainable["prompt"]), np.float32))
        else:
            self.evals_since += 1
        if write:
            self._write_file()
        return improved

    # -- files ---------------------------------------------------------------------------------
    def _read_file(self) -> Optional[Dict[str, Any]]:
        return storage.read_json(self.path)

    def _write_file(self) -> None:
        storage.write_bytes_atomic(self.path, json.dumps(self.state(), indent=1).encode("utf-8"))

    def _roll_back_files(self) -> None:
        """``best.json`` (and ``prompts/best.npy``) back to the resumed checkpoint's best: the
        prompt of that step is the one every checkpoint save wrote as ``step_<N>.npy``."""
        prompts = os.path.join(self.model_dir, "prompts")
        best_npy = os.path.join(prompts, "best.npy")
        step_npy = os.path.join(prompts, f"step_{self.step}.npy")
        if self.step is None:
            for path in (self.path, best_npy):
                if os.path.exists(path):
                    os.remove(path)
            return
        if os.path.exists(step_npy):
            tmp = f"{best_npy}.tmp-{os.getpid()}"
            shutil.copyfile(step_npy, tmp)
            os.replace(tmp, best_npy)
        self._write_file()
