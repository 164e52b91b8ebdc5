"""Evaluation and inference: a task split through a frozen T5 and a prompt (or an ensemble).

The library side of ``prompt-t5x eval`` / ``infer`` (``prompt_t5x.commands.evaluate_cmd``):
``evaluate(task=..., output_dir=..., prompt=..., checkpoint=...)`` and ``infer(...)``.

The prompt is a ``.npy`` [P, D], a PEFT prompt adapter, or a prompt_t5x training model dir (its
latest or ``step`` checkpoint); the frozen T5 is ``checkpoint`` or, for a training model dir, the
one its manifest records (see ``prompt_t5x.inference.prompted_model``).

Predictions are rank classification (score every label word, take the best) for tasks with label
words and ``mode='auto'``, otherwise decoding (``prompt_t5x.inference.decoding``: greedy, beam or
sampling).
A SeqIO mixture is evaluated sub-task after sub-task (``seqio_bridge.eval_batches``): each
example keeps its task, which routes it to its prompt in a task bank (``task_router``), and the
metrics come per task (``<task>/<metric>``) and as each metric's mean over the tasks.
``eval`` writes ``<output_dir>/<task>_<split>_metrics.json`` (the task's metrics, per prompt too
when ensembling); ``infer`` writes ``<output_dir>/<task>_<split>_predictions.jsonl``. Every input
is checked before anything is computed or written; bad input is one ``UsageError`` (exit 2).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np

from prompt_t5x.base import storage
from prompt_t5x.base.errors import UsageError
from prompt_t5x.data import run_data, synthetic
from prompt_t5x.inference import decoding, ensemble, prompted_model
from prompt_t5x.methods import task_bank, templates
from prompt_t5x.model import t5 as t5_lib

MODES = ("auto", "decode", "rank")
ENSEMBLE_RULES = ("vote", "sum")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Every knob of one eval/infer run, checked when built (bad input: one UsageError).

    The fields are the parameters of the gin configurables ``evaluate`` / ``infer`` and of the
    Python API; ``prompts`` and ``decode`` are derived from them.
    """

    task: str
    output_dir: str
    prompt: Optional[str] = None           # one prompt source ...
    ensemble: Tuple[str, ...] = ()         # ... or several (also 'a.npy,b.npy'), which win
    checkpoint: Optional[str] = None       # frozen T5; None: from the training manifest
    model: Optional[t5_lib.T5Config] = None
    prompt_mode: Optional[str] = None      # None: training manifest's, else 'prepend'
    step: Optional[int] = None             # training checkpoint step (None: latest)
    split: str = "validation"
    vocabulary: Optional[str] = None
    data_dir: Optional[str] = None
    task_modules: Tuple[str, ...] = ()
    batch_size: int = 32
    inputs_length: int = 512
    targets_length: int = 8
    max_examples: Optional[int] = None
    mode: str = "auto"
    length_normalize: bool = False
    ensemble_rule: str = "vote"
    strategy: str = "greedy"               # decoding (decoding.DecodeSpec) ...
    beam_size: int = 4
    alpha: float = 0.6
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0                     # ... its max_decode_len is targets_length
    seed: int = 0
    prompts: Tuple[str, ...] = dataclasses.field(init=False)   # the sources, one per prompt
    decode: decoding.DecodeSpec = dataclasses.field(init=False)

    def __post_init__(self):
        ensemble = self.ensemble.split(",") if isinstance(self.ensemble, str) else self.ensemble
        ensemble = tuple(str(p) for p in ensemble if p)
        sources = ensemble or ((str(self.prompt),) if self.prompt else ())
        if not sources:
            raise UsageError("no prompt given: set --gin.PROMPT=\"'prompt.npy'\" (a .npy, a PEFT "
                             "adapter or a training model dir) or --ensemble a.npy,b.npy")
        if self.mode not in MODES:
            raise UsageError(f"mode={self.mode!r}; choose from {MODES}")
        if self.ensemble_rule not in ENSEMBLE_RULES:
            raise UsageError(f"ensemble_rule={self.ensemble_rule!r}; choose from {ENSEMBLE_RULES}")
        for name in ("batch_size", "inputs_length", "targets_length"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        try:
            spec = decoding.DecodeSpec(strategy=self.strategy, max_decode_len=self.targets_length,
                                       beam_size=self.beam_size, alpha=self.alpha,
                                       temperature=self.temperature, top_k=self.top_k,
                                       top_p=self.top_p)
        except ValueError as e:
            raise UsageError(str(e)) from None
        normalized = dict(ensemble=ensemble, prompts=sources, decode=spec,
                          output_dir=os.path.expanduser(str(self.output_dir)),
                          task_modules=tuple(self.task_modules))
        for name, value in normalized.items():  # frozen: set once, here
            object.__setattr__(self, name, value)


class SeqioSource:
    """What ``predict`` needs of a registered SeqIO task (through
    ``prompt_t5x.data.seqio_bridge``)."""

    def __init__(self, cfg: EvalConfig, provider):
        from prompt_t5x.data import seqio_bridge, seqio_metrics
        self._metrics = seqio_metrics
        self._data, self.task, self.split = seqio_bridge, cfg.task, cfg.split
        self.vocabulary = provider.output_features["targets"].vocabulary
        self.label_words = seqio_metrics.label_names(cfg.task)

    def batches_and_examples(self, spec):
        try:
            return (list(self._data.eval_batches(self.task, spec, split=self.split)),
                    self._data.eval_examples(self.task, spec, split=self.split))
        except self._data.DataError as e:
            raise UsageError(str(e)) from None

    def metrics(self, examples, predictions) -> Dict[str, float]:
        try:
            return {k: float(v) for k, v in
                    self._metrics.compute_metrics(self.task, examples, predictions).items()}
        except self._data.DataError as e:
            raise UsageError(str(e)) from None


class SyntheticSource:
    """A generated task of ``prompt_t5x.data.synthetic`` (offline, no TensorFlow): the same
    validation examples the training loop scores, so eval reproduces its accuracy."""

    def __init__(self, cfg: EvalConfig):
        self._cfg = cfg
        self._data = run_data.SyntheticData(cfg.task, cfg.inputs_length, cfg.targets_length,
                                            cfg.batch_size, seed=cfg.seed)
        self.label_words = list(self._data.label_words)
        self.vocabulary = _WordVocabulary(synthetic.encode, synthetic.decode)

    def batches_and_examples(self, spec):
        data = self._data
        if spec.template is not None:   # P-tuning: the run's template over the inputs
            cfg = self._cfg
            data = run_data.SyntheticData(cfg.task, cfg.inputs_length, cfg.targets_length,
                                          cfg.batch_size, seed=cfg.seed, template=spec.template)
        examples = [{**e, "inputs_pretokenized": e["inputs"], "targets_pretokenized": e["targets"]}
                    for e in data.eval_examples()]
        return data.eval_batches(), examples

    def metrics(self, examples, predictions) -> Dict[str, float]:
        return {k: float(v) for k, v in self._data.compute_metrics(examples, predictions).items()}


@dataclasses.dataclass(frozen=True)
class _WordVocabulary:
    encode: Callable[[str], List[int]]
    decode: Callable[[Sequence[int]], str]


def setup_task(cfg: EvalConfig):
    """Register tasks with the run's vocabulary/data; the task's (or mixture's) source for
    ``predict``."""
    from prompt_t5x.data import task_registry
    if cfg.task in synthetic.TASKS:
        return SyntheticSource(cfg)
    task_registry.check_vocabulary(cfg.vocabulary)
    provider = task_registry.open_task(cfg.task, (cfg.split,), vocabulary=cfg.vocabulary,
                                  data_dir=cfg.data_dir, task_modules=cfg.task_modules)
    # A seqio.Mixture is evaluated task after task: its examples carry their task (which
    # routes each to its prompt in a task bank) and its metrics come per task and as the mean.
    return SeqioSource(cfg, provider)


def load(cfg: EvalConfig) -> prompted_model.Loaded:
    return prompted_model.load(cfg.prompts, checkpoint=cfg.checkpoint, model=cfg.model,
                               prompt_mode=cfg.prompt_mode, step=cfg.step, seed=cfg.seed)


# ----------------------------------------------------------------------------- predicting

@dataclasses.dataclass
class Predictions:
    mode: str                              # 'rank' | 'decode'
    examples: List[Dict[str, Any]]         # preprocessed examples, split order
    per_prompt: List[List[str]]            # [N][E] predicted strings
    per_prompt_scores: np.ndarray          # [N, E]
    combined: List[str]                    # [E] (the single prompt's, or the ensemble's)


def predict(cfg: EvalConfig, loaded: prompted_model.Loaded, source) -> Predictions:
    """Run every example of the split through the model with every prompt (one pass each)."""
    from prompt_t5x.data import seqio_bridge
    from prompt_t5x.inference import rank_classification
    label_words, vocabulary = source.label_words, source.vocabulary
    mode = cfg.mode if cfg.mode != "auto" else ("rank" if label_words else "decode")
    if mode == "rank" and not label_words:
        raise UsageError(f"task {cfg.task!r} has no label words: rank classification needs a "
                         "classification task (use mode='decode')")
    if mode == "decode" and cfg.ensemble_rule == "sum" and len(cfg.prompts) > 1:
        raise UsageError("ensemble_rule='sum' sums label scores: it needs mode='rank'")
    spec = seqio_bridge.BatchSpec(cfg.inputs_length, cfg.targets_length, cfg.batch_size,
                          prompt_length=loaded.method.prompt_positions,
                          template=templates.input_template(
                              loaded.method.config(), loaded.method.model.config.vocab_size))
    batches, examples = source.batches_and_examples(spec)
    batches = run_data.limit_examples(batches, cfg.max_examples)
    labels = None
    own_labels = getattr(loaded.method, "labels", None)   # a classification head's classes
    if mode == "rank" and own_labels is not None and tuple(own_labels) != tuple(label_words):
        raise UsageError(f"the method predicts the labels {list(own_labels)} but task "
                         f"{cfg.task!r} has {list(label_words)}: evaluate it on its own task")
    if mode == "rank":
        try:
            labels = rank_classification.encode_labels(list(label_words), vocabulary.encode,
                                                       cfg.targets_length)
        except ValueError as e:
            raise UsageError(f"task {cfg.task!r}: {e}") from None
    route = task_router(loaded.method, examples, cfg.task)
    num = 1 if loaded.prompts is None else loaded.prompts.shape[0]
    per_prompt: List[List[str]] = [[] for _ in range(num)]
    scores: List[List[float]] = [[] for _ in range(num)]
    label_scores: List[np.ndarray] = []
    indices: List[int] = []
    base_rng = jax.random.PRNGKey(cfg.seed)
    for i, batch in enumerate(batches):
        mask = np.asarray(batch["example_mask"], bool)
        if not mask.any():
            continue
        tokens = batch["encoder_input_tokens"]
        task_ids = route(batch["example_index"])
        if mode == "rank":
            if loaded.prompts is None:
                s = np.asarray(ensemble.method_label_scores(
                    loaded.method, loaded.frozen, loaded.trainable, tokens, labels,
                    length_normalize=cfg.length_normalize, task_ids=task_ids))[:, mask]
            else:
                s = np.asarray(ensemble.ensemble_label_scores(
                    loaded.method, loaded.frozen, loaded.prompts, tokens, labels,
                    length_normalize=cfg.length_normalize))[:, mask]      # [N, b, C]
            label_scores.append(s)
            best = s.argmax(-1)
            for n in range(num):
                per_prompt[n] += [label_words[int(c)] for c in best[n]]
                scores[n] += s[n, np.arange(best.shape[1]), best[n]].tolist()
        else:
            if loaded.prompts is None:
                out = ensemble.method_decode(loaded.method, loaded.frozen, loaded.trainable,
                                             tokens, cfg.decode, jax.random.fold_in(base_rng, i),
                                             task_ids=task_ids)
            else:
                out = ensemble.ensemble_decode(loaded.method, loaded.frozen, loaded.prompts,
                                               tokens, cfg.decode,
                                               jax.random.fold_in(base_rng, i))
            decoded = np.asarray(out.tokens)[:, mask]
            for n in range(num):
                per_prompt[n] += [vocabulary.decode(row.tolist()) for row in decoded[n]]
                scores[n] += np.asarray(out.scores)[n, mask].tolist()
        indices += [int(j) for j in np.asarray(batch["example_index"])[mask]]
    score_array = np.asarray(scores, np.float64)
    if num == 1:
        combined = list(per_prompt[0])
    elif mode == "rank":
        all_scores = np.concatenate(label_scores, axis=1)
        rule = ensemble.sum_scores if cfg.ensemble_rule == "sum" else ensemble.vote_labels
        combined = [label_words[int(c)] for c in rule(all_scores)]
    else:
        combined = ensemble.majority_vote(per_prompt, score_array)
    return Predictions(mode, [examples[j] for j in indices], per_prompt, score_array, combined)


def task_router(method, examples: Sequence[Dict[str, Any]], default_task: str
                ) -> Callable[[np.ndarray], Optional[np.ndarray]]:
    """``route(example_index [B]) -> task_ids [B]`` (None for a method without per-task
    state): each example's task (its ``task`` field, else the evaluated task) as an index of the
    method's ``tasks``. Every example's task is checked here, before anything is computed: one
    the method does not know is a UsageError."""
    tasks = getattr(method, "tasks", None)
    if not tasks:
        return lambda index: None
    names = [e.get("task", default_task) if isinstance(e, dict) else default_task
             for e in examples]
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    try:
        ids = np.asarray(task_bank.task_index(tasks, names, f"task {default_task!r}"), np.int32)
    except ValueError as e:
        raise UsageError(f"{e}: evaluate a task the method was trained on") from None

    def route(example_index):
        index = np.asarray(example_index)
        return np.where(index >= 0, ids[np.maximum(index, 0)], 0).astype(np.int32)
    return route


# ----------------------------------------------------------------------------- outputs

def _text(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray) and value.dtype.kind in "SO" and value.ndim == 0:
        return _text(value.item())
    return value


def _describe(cfg: EvalConfig, loaded: prompted_model.Loaded, preds: Predictions) -> Dict[str, Any]:
    out = {"task": cfg.task, "split": cfg.split, "mode": preds.mode,
           "num_examples": len(preds.examples), "checkpoint": loaded.checkpoint,
           "method": loaded.method.method_config(),
           "prompts": [{"source": i["source"], "kind": i.get("kind"), "step": i.get("step")}
                       for i in loaded.sources]}
    if preds.mode == "decode":
        out["decoding"] = dataclasses.asdict(cfg.decode)
    if len(loaded.sources) > 1:
        out["ensemble_rule"] = cfg.ensemble_rule
    return out


def run_eval(cfg: EvalConfig) -> Dict[str, Any]:
    """Evaluate; write and return the metrics record."""
    source = setup_task(cfg)
    loaded = load(cfg)
    preds = predict(cfg, loaded, source)

    def metrics_of(predictions):
        return source.metrics(preds.examples, predictions)

    record = _describe(cfg, loaded, preds)
    record["metrics"] = metrics_of(preds.combined)
    if len(loaded.sources) > 1:
        for info, answers in zip(record["prompts"], preds.per_prompt):
            info["metrics"] = metrics_of(answers)
    path = os.path.join(cfg.output_dir, f"{cfg.task}_{cfg.split}_metrics.json")
    storage.write_bytes_atomic(path, (json.dumps(record, indent=1) + "\n").encode("utf-8"))
    record["path"] = path
    return record


def run_infer(cfg: EvalConfig) -> str:
    """Predict; write one JSON line per example; return the path."""
    source = setup_task(cfg)
    loaded = load(cfg)
    preds = predict(cfg, loaded, source)
    lines = []
    for e, example in enumerate(preds.examples):
        row = {"index": e, "inputs": _text(example.get("inputs_pretokenized")),
               "prediction": preds.combined[e]}
        if "targets_pretokenized" in example:
            row["target"] = _text(example["targets_pretokenized"])
        if len(loaded.sources) == 1:
            row["score"] = float(preds.per_prompt_scores[0, e])
        else:
            row["per_prompt"] = [{"prediction": preds.per_prompt[n][e],
                                  "score": float(preds.per_prompt_scores[n, e])}
                                 for n in range(len(loaded.sources))]
        lines.append(json.dumps(row, ensure_ascii=False))
    path = os.path.join(cfg.output_dir, f"{cfg.task}_{cfg.split}_predictions.jsonl")
    storage.write_bytes_atomic(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return path


def evaluate(**kwargs) -> Dict[str, Any]:
    """Python API: ``evaluate(task=..., output_dir=..., prompt=..., checkpoint=...)``."""
    return run_eval(EvalConfig(**kwargs))


def infer(**kwargs) -> str:
    """Python API: ``infer(task=..., output_dir=..., prompt=..., checkpoint=...)``."""
    return run_infer(EvalConfig(**kwargs))
