"""Where a run's frozen T5 weights come from (``train.checkpoint``; also ``eval``/``infer``).

Sources: a T5X checkpoint (legacy or Orbax; a model dir picks its latest step), a Hugging Face T5
directory, an earlier model-tuning run's directory, ``'quickstart'`` (the committed tiny T5) or
``None``/``'random'`` (seeded random weights, for tests). Every failure is one UsageError naming
the path. On a mesh, T5X and HF weights are read straight into their shards (each host reads
only its devices' slices) and random ones are generated per shard.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

import jax

from prompt_t5x.base.errors import UsageError
from prompt_t5x.checkpoints import t5x_reader, train_checkpoints
from prompt_t5x.model import t5 as t5_lib
from prompt_t5x.parallel import partitioning


def is_remote(path: str) -> bool:
    return "://" in path


def checkpoint_kind(path: Optional[str]) -> str:
    """'random' | 'quickstart' | 'hf' | 'trained' | 't5x' for ``train.checkpoint``; UsageError
    if it is not there."""
    if path in (None, "", "random"):
        return "random"
    if path == "quickstart":
        return "quickstart"
    from prompt_t5x.checkpoints import hf_checkpoint, t5x_reader
    if is_remote(path):
        return "t5x"   # existence is checked when it is opened (no listing of remote stores here)
    if not os.path.exists(path):
        raise UsageError(f"checkpoint {path!r} not found. Set --gin.CHECKPOINT to a T5X "
                         "checkpoint dir (checkpoint_<step>/ or a model dir), a Hugging Face T5 "
                         "dir, or None for random weights.")
    if os.path.isdir(path) and hf_checkpoint.is_hf_t5_dir(path):
        return "hf"
    if train_checkpoints.find_model_dir(path):
        return "trained"
    if t5x_reader.detect_format(path) or (os.path.isdir(path)
                                           and t5x_reader.checkpoint_steps(path)):
        return "t5x"
    raise UsageError(f"{path!r} is neither a T5X checkpoint (no 'checkpoint' file, Orbax "
                     "'_METADATA' or checkpoint_<step>/ dirs) nor a Hugging Face T5 dir "
                     "(config.json + model.safetensors).")


FROM_CHECKPOINT = t5_lib.FROM_CHECKPOINT   # t5.get_config.size of models/from_checkpoint.gin


def checkpoint_config(checkpoint: Optional[str], **overrides) -> t5_lib.T5Config:
    """The ``T5Config`` of the weights at ``checkpoint`` (any source of :func:`checkpoint_kind`
    but random), with run settings (dropout, dtypes, remat...) from ``overrides``.

    Shapes come from the weights themselves, as ``prompt-t5x inspect`` shows them, so a model
    that is none of the size gin files (a UL2 / Flan-T5 variant, a user's own pretraining, the
    tiny test checkpoint) needs no list of overrides. Loading then checks every parameter
    strictly against this config, as for a named size. UsageError when it cannot be inferred or
    an override contradicts the weights.
    """
    kind = checkpoint_kind(checkpoint)
    try:
        if kind == "random":
            raise UsageError(f"t5.get_config.size={FROM_CHECKPOINT!r} takes the model's shape "
                             "from its checkpoint; set --gin.CHECKPOINT to a T5X checkpoint, an "
                             "HF T5 dir, a model-tuning run or 'quickstart'.")
        if kind == "quickstart":
            from prompt_t5x.checkpoints import bundled
            return bundled.load_config().replace(**overrides)
        if kind == "hf":
            from prompt_t5x.checkpoints import hf_checkpoint, hf_interop
            return hf_interop.config_from_hf(hf_checkpoint.read_hf_config(checkpoint),
                                             **overrides)
        if kind == "trained":
            manifest = train_checkpoints.TrainCheckpointer(
                train_checkpoints.find_model_dir(checkpoint), read_only=True).read_manifest()
            saved = manifest.get("model_config")
            if not saved:
                raise UsageError(f"training run {checkpoint!r} records no model config")
            return t5_lib.T5Config.from_dict(saved).replace(**overrides)
        return t5x_reader.open_checkpoint(checkpoint).infer_config(**overrides)
    except (t5x_reader.CheckpointError, train_checkpoints.TrainCheckpointError,
            FileNotFoundError, ValueError, TypeError) as e:
        raise UsageError(f"cannot infer the T5 config of checkpoint {checkpoint!r}: {e}"
                         ) from None


def load_frozen_params(checkpoint: Optional[str], config: t5_lib.T5Config, seed: int = 0,
                       kind: Optional[str] = None):
    """The pretrained T5 params (nested dict) for ``config`` from ``checkpoint``: a T5X
    checkpoint, a Hugging Face T5 dir, a model-tuning training run's dir, or None/'random' for
    the seeded random weights ``PRNGKey(seed + 1)``. UsageError when it is missing or does not
    fit ``config``."""
    from prompt_t5x.checkpoints import hf_checkpoint, strict_loading, t5x_reader
    kind = kind or checkpoint_kind(checkpoint)
    try:
        if kind == "random":
            return t5_lib.init_params(config, jax.random.PRNGKey(seed + 1))
        if kind == "hf":
            return hf_checkpoint.load_hf_t5(checkpoint, config)[0]
        if kind == "trained":
            return _params_of_training_run(checkpoint, config)
        if kind == "quickstart":
            return _quickstart_params(config)
        return t5x_reader.load_t5x(checkpoint, config).params
    except (strict_loading.CheckpointMismatchError, t5x_reader.CheckpointError,
            hf_checkpoint.HFCheckpointError, train_checkpoints.TrainCheckpointError,
            FileNotFoundError, ValueError) as e:
        raise UsageError(f"cannot load checkpoint {checkpoint!r} for this model "
                         f"(is the model gin file the right size?): {e}") from None


def _quickstart_params(config: t5_lib.T5Config):
    """The quickstart's pretrained tiny T5 (``prompt_t5x/assets``); ``config`` must be its own
    (``models/quickstart.gin``), dropout aside."""
    from prompt_t5x.checkpoints import bundled
    asset_config, params = bundled.load_asset()
    if asset_config.replace(dropout_rate=config.dropout_rate) != config:
        raise UsageError("checkpoint 'quickstart' is the quickstart's tiny T5; use "
                         "--gin_file=models/quickstart.gin for its size and vocabulary")
    return params


def _params_of_training_run(checkpoint: str, config: t5_lib.T5Config):
    """All T5 weights saved by an earlier model-tuning run (e.g. the scaling sweep's pretrain)."""
    from prompt_t5x.checkpoints import strict_loading
    params, _ = train_checkpoints.read_trainable(train_checkpoints.find_model_dir(checkpoint))
    if not (isinstance(params, Mapping) and "token_embedder" in params):
        raise UsageError(f"{checkpoint!r} is a training run that did not train the whole "
                         "model (a prompt-tuning run?); use a model-tuning run's directory.")
    strict_loading.check_tree(strict_loading.flatten(params),
                              strict_loading.flatten(t5_lib.param_shapes(config)),
                              source=checkpoint)
    return jax.tree.map(jax.numpy.asarray, params)


def restore_frozen(path: str, config: t5_lib.T5Config, mesh, rules, *,
                   step: Optional[int] = None):
    """Reads a T5X checkpoint's ``target`` tree straight into the shards of ``mesh``.

    Each host reads only the slices its devices hold (``LazyArray.to_jax``), so an 11B
    checkpoint never passes through one host's memory whole. Floating weights are cast to
    ``config.param_dtype`` while reading (bf16 frozen weights from an f32 checkpoint).
    """
    shardings = partitioning.shardings_of(partitioning.abstract_frozen(config, mesh, rules))
    return t5x_reader.load_t5x(path, config, step=step, shardings=shardings,
                               dtype=config.param_dtype).params


def load_sharded_frozen_params(checkpoint: Optional[str], config: t5_lib.T5Config, seed: int,
                               kind: str, mesh, rules):
    """:func:`load_frozen_params` straight into the shards the rules give each parameter:
    random weights are generated per shard and T5X / HF checkpoints read per shard; the other
    sources (quickstart, training runs) are read on the host and then placed."""
    from prompt_t5x.checkpoints import hf_checkpoint, strict_loading, t5x_reader
    from prompt_t5x.parallel import partitioning
    shardings = partitioning.shardings_of(partitioning.abstract_frozen(config, mesh, rules))
    if kind == "random":
        return partitioning.init_frozen(config, jax.random.PRNGKey(seed + 1), mesh, rules)
    if kind in ("t5x", "hf"):
        try:
            if kind == "hf":
                return hf_checkpoint.load_hf_t5(checkpoint, config, shardings=shardings)[0]
            return t5x_reader.load_t5x(checkpoint, config, shardings=shardings).params
        except (strict_loading.CheckpointMismatchError, t5x_reader.CheckpointError,
                hf_checkpoint.HFCheckpointError, FileNotFoundError, ValueError) as e:
            raise UsageError(f"cannot load checkpoint {checkpoint!r} for this model "
                             f"(is the model gin file the right size?): {e}") from None
    return jax.device_put(load_frozen_params(checkpoint, config, seed, kind), shardings)
