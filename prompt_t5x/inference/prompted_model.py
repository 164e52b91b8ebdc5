"""A prompted frozen T5 from prompt sources: what ``eval`` / ``infer`` run.

A prompt source is a ``.npy`` [P, D], a PEFT prompt adapter, or a prompt_t5x training model dir
(its latest or ``step`` checkpoint). The frozen T5 is ``checkpoint`` (a T5X checkpoint or a
Hugging Face T5 dir; ``'random'`` = the seeded random weights ``train`` uses when it has none)
or, for a training model dir, the one its manifest records -- together with the run's model
config, prompt mode and seed, so that evaluating a run needs nothing but its directory.
Several sources make an ensemble: they must share one shape. Bad input -> ``UsageError``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np

from prompt_t5x.base.errors import UsageError
from prompt_t5x.model import t5 as t5_lib


@dataclasses.dataclass
class Loaded:
    """Prompt tuning: ``prompts`` [N, P, D] (N > 1: an ensemble), ``trainable`` None. Any other
    method (a run dir or an exported file of prefix-tuning, P-tuning, ...): ``prompts`` None and
    ``trainable`` its state, run by ``method``."""
    method: Any                 # a methods.interface.Method
    frozen: Any                 # T5 params
    prompts: Optional[np.ndarray]
    sources: List[Dict[str, Any]]
    checkpoint: Optional[str]
    trainable: Any = None


def _manifest_for(source: str, step: Optional[int]) -> Optional[Dict[str, Any]]:
    from prompt_t5x.checkpoints import train_checkpoints
    if not os.path.isdir(source):
        return None
    model_dir = train_checkpoints.find_model_dir(source)
    if model_dir is None:
        return None
    try:
        return train_checkpoints.TrainCheckpointer(model_dir).read_manifest(step)
    except train_checkpoints.TrainCheckpointError as e:
        raise UsageError(f"prompt {source!r}: {e}") from None


def load_prompts(sources: Sequence[str], step: Optional[int] = None
                 ) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
    """Every prompt source -> [N, P, D] plus per-source info (kind, step, training manifest)."""
    from prompt_t5x.checkpoints import prompt_export, train_checkpoints
    prompts, infos = [], []
    for source in sources:
        if "://" not in source and not os.path.exists(source):
            raise UsageError(f"prompt {source!r} not found: give a .npy [length, embed] file, a "
                             "PEFT prompt adapter dir or a prompt_t5x training model dir")
        try:
            prompt, info = prompt_export.load_prompt(source, step=step)
        except (prompt_export.ExportError, train_checkpoints.TrainCheckpointError, ValueError,
                FileNotFoundError) as e:
            raise UsageError(f"prompt {source!r}: {e}") from None
        info = dict(info, source=source, manifest=_manifest_for(source, step))
        prompts.append(np.asarray(prompt, np.float32))
        infos.append(info)
    shapes = sorted({p.shape for p in prompts})
    if len(shapes) != 1:
        raise UsageError("ensemble prompts must all have one shape [P, D]; got "
                         + ", ".join(f"{i['source']}: {p.shape}" for p, i in zip(prompts, infos)))
    return np.stack(prompts), infos


def load_frozen(checkpoint: Optional[str], manifest: Optional[Dict[str, Any]] = None, *,
                config: Optional[t5_lib.T5Config] = None, seed: int = 0
                ) -> Tuple[Any, t5_lib.T5Config, Optional[str]]:
    """(params, config, checkpoint path) of the frozen T5 (see the module docstring)."""
    from prompt_t5x.checkpoints import frozen_sources, hf_checkpoint, strict_loading, t5x_reader
    if checkpoint is None and manifest is not None:
        checkpoint = manifest.get("frozen_checkpoint") or "random"
        # The run's frozen weights: random ones are re-made from the run's own seed.
        seed = int(manifest.get("run", {}).get("seed", 0))
    if config is None and manifest is not None and manifest.get("model_config"):
        config = t5_lib.T5Config.from_dict(manifest["model_config"])
    if checkpoint is None:
        raise UsageError("no frozen model: set --gin.CHECKPOINT to a T5X checkpoint or a Hugging "
                         "Face T5 dir (or evaluate a training model dir, which records it)")
    kind = frozen_sources.checkpoint_kind(checkpoint)   # UsageError naming the path if missing
    try:
        if kind == "random":
            if config is None:
                raise UsageError("checkpoint 'random' needs the model size: pass "
                                 "--gin_file=models/<size>.gin and bind evaluate.model")
            return t5_lib.init_params(config, jax.random.PRNGKey(seed + 1)), config, None
        if kind in ("quickstart", "trained"):
            # The bundled quickstart model, or the weights of an earlier model-tuning run (e.g.
            # the scaling sweep's pretraining stage): their size comes from the manifest/config.
            if config is None:
                if kind != "quickstart":
                    raise UsageError(f"checkpoint {checkpoint!r} is a training run: pass its "
                                     "model size with --gin_file=models/<size>.gin")
                from prompt_t5x.checkpoints import bundled
                config = bundled.load_config()
            params = frozen_sources.load_frozen_params(checkpoint, config, seed, kind=kind)
        elif kind == "hf":
            params, config = hf_checkpoint.load_hf_t5(checkpoint, config)
        else:
            loaded = t5x_reader.load_t5x(checkpoint, config)
            params, config = loaded.params, loaded.config
    except (strict_loading.CheckpointMismatchError, t5x_reader.CheckpointError,
            hf_checkpoint.HFCheckpointError, FileNotFoundError) as e:
        raise UsageError(f"cannot load checkpoint {checkpoint!r}: {e}") from None
    return params, config, checkpoint


@functools.lru_cache(maxsize=16)
def _prompt_method(config: t5_lib.T5Config, prompt_length: int, prompt_mode: str):
    """One method object per (config, length, mode): jitted decoders/scorers are cached per
    method object, so repeated evaluations in one process (e.g. during training) compile once."""
    from prompt_t5x.methods import prompt_tuning
    return prompt_tuning.PromptTuning(t5_lib.T5(config), prompt_length=prompt_length,
                                prompt_mode=prompt_mode)


def load(sources: Sequence[str], *, checkpoint: Optional[str] = None,
         model: Optional[t5_lib.T5Config] = None, prompt_mode: Optional[str] = None,
         step: Optional[int] = None, seed: int = 0) -> Loaded:
    """The prompt-tuning method, frozen params (on device) and [N, P, D] prompts of ``sources``.

    ``model`` / ``prompt_mode`` / ``seed`` default to the training manifest's, if any.
    """
    method_source = _method_source(sources, step)
    if method_source is not None:
        return _load_method(method_source, checkpoint=checkpoint, model=model, seed=seed)
    prompts, infos = load_prompts(sources, step)
    manifest = next((i["manifest"] for i in infos if i.get("manifest")), None)
    frozen, config, checkpoint = load_frozen(checkpoint, manifest, config=model, seed=seed)
    if prompts.shape[2] != config.emb_dim:
        raise UsageError(f"the prompt has width {prompts.shape[2]} but the model's d_model is "
                         f"{config.emb_dim}: prompt and checkpoint are of different model sizes")
    # Once on the device: host arrays would be copied again by every jitted call.
    frozen = jax.device_put(frozen)
    mode = prompt_mode
    if mode is None and manifest is not None:
        mode = manifest.get("run", {}).get("prompt_mode")
    try:
        method = _prompt_method(config, prompts.shape[1], mode or "prepend")
    except ValueError as e:
        raise UsageError(str(e)) from None
    for info in infos:
        info.pop("manifest", None)
    return Loaded(method, frozen, prompts, infos, checkpoint)


def _method_source(sources: Sequence[str], step: Optional[int]) -> Optional[Dict[str, Any]]:
    """A trained state run as its method: an exported method file (any kind), a PEFT prefix
    adapter, or a training model dir of a method other than prompt tuning; as {method_config,
    trainable, model_config, manifest, info}. None for prompt sources (.npy, PEFT prompt
    adapters, prompt-tuning run dirs), which take the prompt (and ensemble) path."""
    from prompt_t5x.checkpoints import method_export, peft_prefix, train_checkpoints
    from prompt_t5x.methods.interface import unflatten_tables
    found = []
    for source in sources:
        if "://" not in source and os.path.isdir(source) and peft_prefix.is_prefix_adapter(source):
            try:
                tables, method_config = peft_prefix.read_adapter(source)
            except (peft_prefix.PeftPrefixError, OSError, ValueError, KeyError) as e:
                raise UsageError(f"prompt {source!r}: {e}") from None
            found.append(dict(method_config=method_config, trainable=unflatten_tables(tables),
                              model_config=None, manifest=None,
                              info={"source": source, "kind": "PEFT prefix adapter",
                                    "step": None}))
            continue
        if "://" not in source and method_export.is_method_file(source):
            try:
                tables, method_config, model_config = method_export.read_method_file(source)
            except (method_export.MethodExportError, OSError, ValueError) as e:
                raise UsageError(f"prompt {source!r}: {e}") from None
            found.append(dict(method_config=method_config, trainable=unflatten_tables(tables),
                              model_config=model_config, manifest=None,
                              info={"source": source, "kind": "exported method", "step": None}))
            continue
        manifest = _manifest_for(source, step)
        if manifest is None:
            continue
        method_config = method_export.manifest_method_config(manifest)
        if method_config["kind"] == "prompt_tuning":
            continue
        model_dir = train_checkpoints.find_model_dir(source)
        try:
            trainable, used = train_checkpoints.read_trainable(model_dir, step)
        except train_checkpoints.TrainCheckpointError as e:
            raise UsageError(f"prompt {source!r}: {e}") from None
        found.append(dict(method_config=method_config, trainable=trainable,
                          model_config=manifest.get("model_config"), manifest=manifest,
                          info={"source": source, "kind": "training checkpoint", "step": used}))
    if not found:
        return None
    if len(sources) > 1:
        raise UsageError(f"an ensemble combines prompt-tuning prompts; {found[0]['info']['source']}"
                         f" holds a {found[0]['method_config']['kind']} state: evaluate it alone")
    return found[0]


def _load_method(found: Dict[str, Any], *, checkpoint: Optional[str],
                 model: Optional[t5_lib.T5Config], seed: int) -> Loaded:
    from prompt_t5x.methods import registry
    config = model
    if config is None and found["model_config"]:
        config = t5_lib.T5Config.from_dict(found["model_config"])
    source = found["info"]["source"]
    if found["method_config"].get("kind") == "model_tuning" and config is not None:
        # The run holds every weight: no frozen checkpoint to load (nor to be reachable).
        frozen, checkpoint = {}, None
    else:
        frozen, config, checkpoint = load_frozen(checkpoint, found["manifest"], config=config,
                                                 seed=seed)
    try:
        context = method_build_context(found["method_config"])
        method = (registry.build(t5_lib.T5(config), found["method_config"], **context)
                  if context else _registry_method(config, _freeze(found["method_config"])))
    except registry.UnknownMethodError as e:
        raise UsageError(f"prompt {source!r}: {e}") from None
    except UsageError as e:   # its settings do not fit this model (e.g. a placeholder id)
        raise UsageError(f"prompt {source!r}: {e}") from None
    trainable = jax.device_put(jax.tree_util.tree_map(np.asarray, found["trainable"]))
    # The state's shapes must be what this method on this frozen model trains (a run or file
    # of another model size would otherwise fail inside the compiled model).
    want = t5_lib.param_shapes(config) if method.kind == "model_tuning" else \
        jax.eval_shape(method.init_trainable, jax.random.PRNGKey(0), frozen)
    if jax.tree_util.tree_map(np.shape, want) != jax.tree_util.tree_map(np.shape, trainable):
        raise UsageError(f"prompt {source!r}: its {method.kind} state's shapes do not fit the "
                         f"frozen model ({config.num_encoder_layers}+{config.num_decoder_layers} "
                         f"layers, d_model {config.emb_dim}): evaluate it on the T5 it was "
                         "trained on")
    return Loaded(method, jax.device_put(frozen), None, [found["info"]], checkpoint, trainable)


def _freeze(value):
    """JSON -> hashable (for the method cache); ``_thaw`` inverts it."""
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _freeze(v)) for k, v in value.items())))
    if isinstance(value, list):
        return ("list", tuple(_freeze(v) for v in value))
    return ("value", value)


def _thaw(value):
    kind, inner = value
    if kind == "dict":
        return {k: _thaw(v) for k, v in inner}
    if kind == "list":
        return [_thaw(v) for v in inner]
    return inner


@functools.lru_cache(maxsize=16)
def _registry_method(config: t5_lib.T5Config, frozen_method_config):
    """One method object per (config, method config): jitted functions cache per method."""
    from prompt_t5x.methods import registry
    return registry.build(t5_lib.T5(config), _thaw(frozen_method_config))


# ------------------------------------------------- states that build a new method's start

def _trained_state(source: str, what: str) -> Dict[str, Any]:
    """{method_config, trainable} of a run dir or exported method file (nothing else loaded)."""
    if "://" not in source and not os.path.exists(source):
        raise UsageError(f"{what} {source!r} not found: give a run directory or an exported "
                         ".safetensors file")
    found = _method_source([source], None)
    if found is None:
        raise UsageError(f"{what} {source!r} holds no method state (a prompt-tuning run has one "
                         "prompt, not one per task: train the teachers with "
                         "runs/multitask_prompts.gin)")
    return found


def load_task_prompts(source: str, tasks: Sequence[str]) -> np.ndarray:
    """A ``multitask_prompts`` bank of ``prompt_tuning`` (run dir or export) -> its prompts of
    ``tasks``, in that order [T, P, D] (MPT's teachers). UsageError for another method or a
    task the bank lacks."""
    found = _trained_state(source, "teachers")
    config = found["method_config"]
    inner = config.get("inner") or {}
    if config.get("kind") != "multitask_prompts" or inner.get("kind") != "prompt_tuning":
        raise UsageError(f"teachers {source!r} is a {config.get('kind')} state; MPT's teachers "
                         "are a multitask_prompts bank of prompt_tuning (runs/multitask_prompts.gin)")
    bank = list(config["tasks"])
    missing = [t for t in tasks if t not in bank]
    if missing:
        raise UsageError(f"teachers {source!r} have prompts for {bank}, not for {missing}")
    prompts = np.asarray(found["trainable"]["prompt"], np.float32)
    return prompts[[bank.index(t) for t in tasks]]


def load_shared_prompt(source: str) -> np.ndarray:
    """P* [P, D] of an MPT source stage (run dir or export): the target stage's start."""
    found = _trained_state(source, "MPT source")
    kind = found["method_config"].get("kind")
    if kind not in ("mpt_source", "mpt_target"):
        raise UsageError(f"MPT source {source!r} is a {kind} state, not an MPT run")
    return np.asarray(found["trainable"]["shared"], np.float32)


def method_build_context(method_config: Dict[str, Any]) -> Dict[str, Any]:
    """What building the method of ``method_config`` needs from the runs it names: MPT's
    teacher prompts (``teachers``) and a target stage's fixed shared prompt (``source``)."""
    context: Dict[str, Any] = {}
    kind = method_config.get("kind")
    if kind == "mpt_source" and method_config.get("teachers"):
        context["teacher_prompts"] = load_task_prompts(method_config["teachers"],
                                                       method_config["tasks"])
    if kind == "mpt_target" and method_config.get("source"):
        context["shared_init"] = load_shared_prompt(method_config["source"])
    return context
