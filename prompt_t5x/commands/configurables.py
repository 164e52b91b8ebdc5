"""Gin configurables of the ``train`` / ``scaling`` runs (importing this module registers them).

Names as they appear in gin files:

  t5.get_config          size ('small' ... 'xxl', 'tiny', or 'from_checkpoint' with its
                         ``checkpoint``) plus any ``T5Config`` field override
  optim.adafactor        ``prompt_t5x.training.optim.adafactor`` (T5X Adafactor; lr 0.3 by default)
  optim.adam             ``optax.adam`` (P-tuning's optimizer)
  methods.prompt_tuning  prompt_length, prompt_mode, prompt_init  -> a ``MethodSpec``
  methods.model_tuning   every weight trainable (the paper's baseline) -> a ``MethodSpec``
  methods.bias_tuning    biases, norm_scales: BitFit-style added biases (+ RMSNorm scale
                         deltas), ``prompt_t5x.methods.bias_tuning`` -> a ``MethodSpec``
  methods.p_tuning       template, pseudo_token_id, encoder, encoder_hidden -> a ``MethodSpec``
  methods.deep_prompts   prompt_length, prompt_mode, prompt_init (VPT-deep) -> a ``MethodSpec``
  methods.classification_head  inner (a method), labels -> a ``MethodSpec``
  methods.prefix_tuning  key/value prefixes per attention layer (prefix-tuning, P-tuning v2)
  methods.multitask_prompts  tasks, inner (a method) -> a task bank ``MethodSpec``
  methods.idpg           instance-dependent prompts from a generator (IDPG)
  methods.spt            prompts retrieved from a trainable memory (SPT)
  methods.mpt_source / methods.mpt_target  multitask prompt tuning's two stages (MPT)
  optim.adamw            optax's AdamW (prefix-tuning's and P-tuning v2's optimizer)
  prompts.class_labels / prompts.sampled_vocab / prompts.random_uniform / prompts.from_file
                         prompt initialisers -> a ``PromptInitSpec``

Methods and prompt initialisers are *specs*: what to build is fixed by the gin file, but building
needs things only known at run time (the T5 module, the task's label words, the vocabulary), so
the run calls ``spec.build(...)`` once it has them. None of this imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, Optional, Sequence, Tuple

import gin
import optax

from prompt_t5x.checkpoints import frozen_sources
from prompt_t5x.methods import interface, prompt_init
from prompt_t5x.methods.model_tuning import ModelTuning
from prompt_t5x.methods.prompt_tuning import PromptTuning
from prompt_t5x.model import t5 as t5_lib
from prompt_t5x.training import optim

Encode = Callable[[str], Sequence[int]]

# ----------------------------------------------------------------------------- model size ----
_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(t5_lib.T5Config))


def get_config(size: str = gin.REQUIRED, checkpoint: Optional[str] = None,
               **overrides) -> t5_lib.T5Config:
    """``prompt_t5x.model.t5.get_config`` with every override name checked (gin accepts any name for
    ``**overrides``, so a typo like ``emb_dimm`` would otherwise surface as a TypeError).

    ``size='from_checkpoint'`` (``models/from_checkpoint.gin``) is the config of the weights at
    ``checkpoint``, inferred from their shapes (``frozen_sources.checkpoint_config``); the
    overrides then set only what weights do not say (dropout, dtypes) or must agree with them.
    """
    for name in overrides:
        if name not in _CONFIG_FIELDS:
            close = difflib.get_close_matches(name, _CONFIG_FIELDS, n=3)
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            raise ValueError(f"t5.get_config: {name!r} is not a T5Config field.{hint} "
                             f"Fields: {', '.join(_CONFIG_FIELDS)}.")
    if size == frozen_sources.FROM_CHECKPOINT:
        return frozen_sources.checkpoint_config(checkpoint, **overrides)
    return t5_lib.get_config(size, **overrides)


# --------------------------------------------------------------------- prompt initialisers ----
@dataclasses.dataclass(frozen=True)
class PromptInitSpec:
    """Which prompt initialiser to use; ``build`` binds it to the task and vocabulary."""

    kind: str                                  # class_labels|sampled_vocab|random_uniform|from_file
    population: int = 5000                     # sample from the first N vocabulary ids
    labels: Optional[Sequence[str]] = None     # class_labels: None -> the task's label words
    scale: float = 0.5                         # random_uniform
    symmetric: bool = False                    # random_uniform: [-scale, scale) not [0, scale)
    path: Optional[str] = None                 # from_file: a .npy [P, D]

    def build(self, label_words: Optional[Sequence[str]] = None,
              encode: Optional[Encode] = None) -> prompt_init.PromptInit:
        if self.kind == "class_labels":
            labels = list(self.labels) if self.labels is not None else label_words
            if not labels:
                # Free-text / regression targets have no label words: the paper falls back to
                # sampled vocabulary for every row in that case.
                return prompt_init.sampled_vocab_init(self.population)
            if encode is None:
                raise ValueError("class-label prompt init needs the vocabulary to encode the "
                                 "label words")
            return prompt_init.class_labels_init(tuple(labels), encode, self.population)
        if self.kind == "sampled_vocab":
            return prompt_init.sampled_vocab_init(self.population)
        if self.kind == "random_uniform":
            return prompt_init.random_uniform_init(self.scale, self.symmetric)
        if self.kind == "from_file":
            if not self.path:
                raise ValueError("prompts.from_file needs a path: bind prompts.from_file.path")
            return prompt_init.npy_init(self.path)
        raise ValueError(f"unknown prompt init kind {self.kind!r}")


@gin.configurable("class_labels", module="prompts")
def class_labels(population: int = 5000, labels: Optional[Sequence[str]] = None
                 ) -> PromptInitSpec:
    return PromptInitSpec("class_labels", population=population,
                          labels=None if labels is None else tuple(labels))


@gin.configurable("sampled_vocab", module="prompts")
def sampled_vocab(population: int = 5000) -> PromptInitSpec:
    return PromptInitSpec("sampled_vocab", population=population)


@gin.configurable("random_uniform", module="prompts")
def random_uniform(scale: float = 0.5, symmetric: bool = False) -> PromptInitSpec:
    return PromptInitSpec("random_uniform", scale=scale, symmetric=symmetric)


@gin.configurable("from_file", module="prompts")
def from_file(path: str = gin.REQUIRED) -> PromptInitSpec:
    return PromptInitSpec("from_file", path=path)


# ---------------------------------------------------------------------------------- methods ----
@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A tuning method before it has a model.

    ``kind`` is a ``prompt_t5x.methods.registry`` key. Prompt tuning keeps its own fields (its
    initialiser needs the task's label words); every other method's gin settings are
    ``settings`` (sorted (name, value) pairs), handed to the method's ``from_config`` with the
    build context (``encode``, ``label_words``) that some initialisers need.
    """

    kind: str
    prompt_length: int = 0          # encoder positions the method adds (the data cuts by it)
    prompt_mode: str = "prepend"
    prompt_init: Optional[PromptInitSpec] = None
    settings: Tuple[Tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        return self.kind

    def build(self, model: t5_lib.T5, label_words: Optional[Sequence[str]] = None,
              encode: Optional[Encode] = None, **context) -> interface.Method:
        """``context``: further build context of a new run (e.g. MPT's teacher prompts, loaded
        by ``run_train.build_context``)."""
        if self.kind == "prompt_tuning":
            init = (self.prompt_init or PromptInitSpec("sampled_vocab")).build(label_words, encode)
            return PromptTuning(model, self.prompt_length, self.prompt_mode, init)
        if self.kind == "model_tuning":
            return ModelTuning(model)
        from prompt_t5x.methods import registry
        return registry.build(model, {"kind": self.kind, **dict(self.settings)},
                              label_words=label_words, encode=encode, **context)

    def trainable_parameters(self, config: t5_lib.T5Config,
                             label_words: Optional[Sequence[str]] = None,
                             encode: Optional[Encode] = None) -> int:
        """How many numbers are trained (the x-axis companion of the scaling plot);
        ``label_words``: the task's, for methods whose size depends on them (a head);
        ``encode``: the task's vocabulary (default: a stand-in giving distinct ids)."""
        if self.kind == "prompt_tuning":
            return self.prompt_length * config.emb_dim
        if self.kind == "model_tuning":
            return config.num_params
        import jax
        method = self.build(t5_lib.T5(config), label_words=label_words,
                            encode=encode or _shape_only_encode)
        shapes = jax.eval_shape(method.init_trainable, jax.random.PRNGKey(0),
                                t5_lib.param_shapes(config))
        return interface.count_parameters(shapes)


def _shape_only_encode(text: str) -> Sequence[int]:
    """Stands in for a vocabulary when only the trainable shapes are wanted: one id per word,
    distinct words (e.g. label words) distinct ids, never 0 (padding) or 1 (EOS)."""
    import zlib
    return [2 + zlib.crc32(w.encode("utf-8")) % 30000 for w in text.split()] or [2]


def method_spec(kind: str, *, prompt_positions: int = 0, **settings) -> MethodSpec:
    """The spec of a registry method (gin configurables of new methods return this).
    ``prompt_positions``: encoder positions the method adds to each input (must equal the
    built method's ``prompt_positions``; the data cuts inputs by it)."""
    return MethodSpec(kind, prompt_length=prompt_positions,
                      settings=tuple(sorted(settings.items())))


@gin.configurable("prompt_tuning", module="methods")
def prompt_tuning(prompt_length: int = 100, prompt_mode: str = "prepend",
                  prompt_init: Optional[PromptInitSpec] = None) -> MethodSpec:
    return MethodSpec("prompt_tuning", prompt_length, prompt_mode,
                      prompt_init or class_labels())


@gin.configurable("model_tuning", module="methods")
def model_tuning() -> MethodSpec:
    return MethodSpec("model_tuning")


@gin.configurable("bias_tuning", module="methods")
def bias_tuning(biases: Sequence[str] = ("query", "value", "out", "wi_0", "wi_1", "wo"),
                norm_scales: bool = True) -> MethodSpec:
    """Bias tuning (Logan IV et al., 2022; ``prompt_t5x.methods.bias_tuning``): no encoder
    positions added (its null prompts are a task format, ``null_<task>``)."""
    if not biases and not norm_scales:   # each value alone is fine (gin_checks); both is not
        raise ValueError("methods.bias_tuning trains nothing with biases=[] and "
                         "norm_scales=False: choose biases or set norm_scales=True")
    return method_spec("bias_tuning", prompt_positions=0, biases=tuple(biases),
                       norm_scales=norm_scales)


@gin.configurable("p_tuning", module="methods")
def p_tuning(template: Any = gin.REQUIRED, pseudo_token_id: Optional[int] = None,
             encoder: str = "lstm", encoder_hidden: Optional[int] = None,
             population: int = 5000) -> MethodSpec:
    """P-tuning (``prompt_t5x.methods.p_tuning``): ``template`` is one string for the run's task
    or a {task: template} dict; the pseudo tokens sit inside the inputs (no added positions)."""
    return method_spec("p_tuning", prompt_positions=0,
                       template=dict(template) if isinstance(template, dict) else template,
                       pseudo_token_id=pseudo_token_id, encoder=encoder,
                       encoder_hidden=encoder_hidden, population=population)


@gin.configurable("deep_prompts", module="methods")
def deep_prompts(prompt_length: int = 100, prompt_mode: str = "prepend",
                 prompt_init: Optional[PromptInitSpec] = None) -> MethodSpec:
    """VPT-deep / P-tuning v2 deep prompts (``methods.deep_prompts``); every layer's rows start
    from ``prompt_init`` (default: sampled vocabulary)."""
    return method_spec("deep_prompts", prompt_positions=prompt_length,
                       prompt_length=prompt_length, prompt_mode=prompt_mode,
                       prompt_init=prompt_init or sampled_vocab())


@gin.configurable("classification_head", module="methods")
def classification_head(inner: MethodSpec = gin.REQUIRED,
                        labels: Optional[Sequence[str]] = None) -> MethodSpec:
    """A linear head on the mean-pooled encoder around ``inner`` (``@methods.prompt_tuning()``,
    ``@methods.deep_prompts()``); ``labels`` default to the task's label words."""
    if not isinstance(inner, MethodSpec):
        raise ValueError(f"methods.classification_head.inner must be a method, e.g. "
                         f"@methods.prompt_tuning(); got {inner!r}")
    return method_spec("classification_head", prompt_positions=inner.prompt_length, inner=inner,
                       labels=None if labels is None else tuple(labels))


@gin.configurable("multitask_prompts", module="methods")
def multitask_prompts(tasks: Sequence[str] = gin.REQUIRED,
                      inner: MethodSpec = gin.REQUIRED) -> MethodSpec:
    """A task bank (``prompt_t5x.methods.task_bank``): one ``inner`` state
    (``@methods.prompt_tuning()``, ``@methods.prefix_tuning()``, ...) per task of ``tasks`` (the
    mixture's task names; the data routes every example to its task's state)."""
    if not isinstance(inner, MethodSpec):
        raise ValueError(f"methods.multitask_prompts.inner must be a method, e.g. "
                         f"@methods.prompt_tuning(); got {inner!r}")
    return method_spec("multitask_prompts", prompt_positions=inner.prompt_length,
                       tasks=tuple(tasks), inner=inner)


@gin.configurable("idpg", module="methods")
def idpg(prompt_length: int = 5, bottleneck: int = 256, representation: str = "encoder",
         generator: str = "dense", phm_n: int = 4, layers: str = "input",
         prompt_mode: str = "prepend") -> MethodSpec:
    """IDPG (``prompt_t5x.methods.idpg``): a per-example prompt of ``prompt_length`` vectors
    generated from the frozen T5's representation of the input."""
    return method_spec("idpg", prompt_positions=prompt_length, prompt_length=prompt_length,
                       bottleneck=bottleneck, representation=representation,
                       generator=generator, phm_n=phm_n, layers=layers,
                       prompt_mode=prompt_mode)


@gin.configurable("spt", module="methods")
def spt(memory_size: int = 16, prompt_length: int = 10, top_k: int = 2,
        similarity: str = "cosine", temperature: float = 1.0, combine: str = "weighted",
        representation: str = "encoder", task_prompt_length: int = 0,
        tasks: Optional[Sequence[str]] = None, prompt_mode: str = "prepend") -> MethodSpec:
    """SPT (``prompt_t5x.methods.spt``): prompts retrieved per example from a trainable memory
    (+ an optional prompt per task of ``tasks``)."""
    method = dict(memory_size=memory_size, prompt_length=prompt_length, top_k=top_k,
                  similarity=similarity, temperature=temperature, combine=combine,
                  representation=representation, task_prompt_length=task_prompt_length,
                  tasks=tuple(tasks or ()), prompt_mode=prompt_mode)
    retrieved = prompt_length * (top_k if combine == "concat" else 1)
    return method_spec("spt", prompt_positions=task_prompt_length + retrieved, **method)


@gin.configurable("mpt_source", module="methods")
def mpt_source(tasks: Sequence[str] = gin.REQUIRED, prompt_length: int = 100, rank: int = 1,
               teachers: Optional[str] = None, kl_weight: float = 1.0, mse_weight: float = 1.0,
               temperature: float = 1.0, prompt_mode: str = "prepend") -> MethodSpec:
    """MPT's source stage (``prompt_t5x.methods.mpt``): a shared prompt and rank-``rank``
    factors per task of ``tasks``, distilled from ``teachers`` (a multitask_prompts run)."""
    return method_spec("mpt_source", prompt_positions=prompt_length, tasks=tuple(tasks),
                       prompt_length=prompt_length, rank=rank, teachers=teachers,
                       kl_weight=kl_weight, mse_weight=mse_weight, temperature=temperature,
                       prompt_mode=prompt_mode)


@gin.configurable("mpt_target", module="methods")
def mpt_target(tasks: Sequence[str] = gin.REQUIRED, source: Optional[str] = None,
               prompt_length: int = 100, rank: int = 1, train_shared: bool = False,
               prompt_mode: str = "prepend") -> MethodSpec:
    """MPT's target stage: P* from the ``source`` run, new factors per task of ``tasks``."""
    return method_spec("mpt_target", prompt_positions=prompt_length, tasks=tuple(tasks),
                       source=source, prompt_length=prompt_length, rank=rank,
                       train_shared=train_shared, prompt_mode=prompt_mode)


@gin.configurable("prefix_tuning", module="methods")
def prefix_tuning(prefix_length: int = 10,
                  parts: Sequence[str] = ("encoder", "decoder_self", "decoder_cross"),
                  reparameterization: str = "mlp", mlp_hidden: int = 512,
                  prefix_dropout: float = 0.0, init: Optional[str] = None,
                  init_scale: float = 1.0,
                  init_text: Optional[str] = None, prefix_bias: str = "zero",
                  peft_layout: bool = False) -> MethodSpec:
    """``prompt_t5x.methods.prefix_tuning``; ``init_text`` (init 'text') is encoded with the
    run's vocabulary when the method is built; ``init`` defaults to 'text' when it is given,
    else 'random'. Prefixes add no encoder positions."""
    init = init or ("text" if init_text is not None else "random")
    settings = dict(prefix_length=prefix_length, parts=tuple(parts),
                    reparameterization=reparameterization, mlp_hidden=mlp_hidden,
                    prefix_dropout=prefix_dropout, init=init, init_scale=init_scale,
                    prefix_bias=prefix_bias, peft_layout=peft_layout)
    if init_text is not None:
        settings["init_text"] = init_text
    return method_spec("prefix_tuning", prompt_positions=0, **settings)


@gin.configurable("ipt", module="methods")
def ipt(instance: str = "mlp", task_length: int = 10, instance_length: int = 4,
        hidden: int = 128, lookup_rows: int = 2048, prompt_mode: str = "prepend",
        parts: Sequence[str] = ("encoder",), instance_scale: float = 0.1,
        prefix_bias: str = "zero", population: int = 5000) -> MethodSpec:
    """Instance-wise prompt tuning (``prompt_t5x.methods.ipt``): a task prompt plus an instance
    part from each example's tokens; the prompt variants add task_length + instance_length
    encoder positions, ``instance='prefix'`` none."""
    positions = 0 if instance == "prefix" else task_length + instance_length
    return method_spec("ipt", prompt_positions=positions, instance=instance,
                       task_length=task_length, instance_length=instance_length, hidden=hidden,
                       lookup_rows=lookup_rows, prompt_mode=prompt_mode, parts=tuple(parts),
                       instance_scale=instance_scale, prefix_bias=prefix_bias,
                       population=population)


# ------------------------------------------------------------------------- registrations ----
gin.external_configurable(get_config, name="get_config", module="t5")
gin.external_configurable(optim.adafactor, name="adafactor", module="optim")
# Adam: P-tuning's optimizer (runs/p_tuning.gin); optax's own, trained state is its moments.
gin.external_configurable(optax.adam, name="adam", module="optim")
gin.external_configurable(optax.adamw, name="adamw", module="optim")

# Every configurable name and its function, for "did you mean" hints on typos (see gin_cli).
REGISTERED = {
    "t5.get_config": get_config,
    "optim.adafactor": optim.adafactor,
    "optim.adam": optax.adam,
    "methods.prompt_tuning": prompt_tuning,
    "methods.model_tuning": model_tuning,
    "methods.bias_tuning": bias_tuning,
    "methods.p_tuning": p_tuning,
    "methods.deep_prompts": deep_prompts,
    "methods.classification_head": classification_head,
    "methods.prefix_tuning": prefix_tuning,
    "methods.ipt": ipt,
    "methods.multitask_prompts": multitask_prompts,
    "methods.idpg": idpg,
    "methods.spt": spt,
    "methods.mpt_source": mpt_source,
    "methods.mpt_target": mpt_target,
    "optim.adamw": optax.adamw,
    "prompts.class_labels": class_labels,
    "prompts.sampled_vocab": sampled_vocab,
    "prompts.random_uniform": random_uniform,
    "prompts.from_file": from_file,
}


def register(name: str, fn) -> None:
    """Record a configurable defined elsewhere (``train``, ``scaling``) for the typo hints."""
    REGISTERED[name] = fn
