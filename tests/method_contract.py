"""What every ``Method`` must do, as reusable checks (the methods' test files call these).

Each check takes a built method on the tiny 'test' T5 (every dimension distinct, so a transposed
or mixed-up weight cannot pass) and asserts an invariant of the issue's list:

- ``check_trains_only_its_parameters``: a few real train steps; the frozen tree is bit-identical
  afterwards, every trainable leaf moved, nothing else exists in the state.
- ``check_no_frozen_kernel_gradient``: no matmul of the traced train step produces an array of a
  frozen kernel's shape (that is what a frozen-weight gradient would be; forward matmuls give
  [batch, length, ...]).
- ``check_mesh_matches_one_device``: one step on 1x8, 2x4 and 4x2 meshes gives the 1x1 mesh's
  loss and updated state.
- ``check_sigkill_resume_is_exact``: tests/resume_driver.py trains the method in a subprocess,
  is SIGKILLed mid-run, resumes, and ends bit-identical to an uninterrupted run.
- ``check_cached_decoding``: cached greedy decoding equals the uncached reference; beam search
  runs and its best beam scores at least the greedy answer.
- ``check_config_round_trip``: ``registry.build(model, method.method_config())`` computes the
  same logits, and so does the exported inference form (``method.export``).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from prompt_t5x.inference import decoding, reference_decoding
from prompt_t5x.methods import interface, registry
from prompt_t5x.model import t5
from prompt_t5x.parallel import partitioning
from prompt_t5x.parallel import sharding as sharding_lib
from prompt_t5x.training import optim, sharded_run, train

DRIVER = os.path.join(os.path.dirname(__file__), "resume_driver.py")


def tiny_config(**overrides) -> t5.T5Config:
    return t5.get_config("test", **{"dropout_rate": 0.0, **overrides})


def mesh_config(**overrides) -> t5.T5Config:
    """The 'test' T5 made divisible by a model axis of 8 (heads, vocabulary), dims distinct."""
    return tiny_config(**{"vocab_size": 128, "num_heads": 8, "head_dim": 5, **overrides})


def tiny_frozen(config: Optional[t5.T5Config] = None, seed: int = 0):
    return t5.init_params(config or tiny_config(), jax.random.PRNGKey(seed))


def make_batch(seed: int = 0, batch: int = 8, length: int = 7, targets: int = 3,
               vocab: int = 101):
    """A deterministic batch; rows have different lengths (right padding) so masks matter."""
    rs = np.random.RandomState(seed)
    inputs = rs.randint(2, vocab, size=(batch, length)).astype(np.int32)
    for b in range(batch):
        n = length - (b % 3)
        inputs[b, n - 1] = 1
        inputs[b, n:] = 0
    target = rs.randint(2, vocab, size=(batch, targets)).astype(np.int32)
    target[:, -1] = 1
    dec_in = np.concatenate([np.zeros((batch, 1), np.int32), target[:, :-1]], axis=1)
    return dict(encoder_input_tokens=inputs, decoder_input_tokens=dec_in,
                decoder_target_tokens=target,
                decoder_loss_weights=np.ones((batch, targets), np.float32))


def task_batch_fn(num_tasks: int, batch_fn=make_batch):
    """``batch_fn`` batches with ``task_ids`` [B] (example b of task b mod ``num_tasks``): the
    mixed-task batches of a task bank or any method that routes examples by task."""
    def with_tasks(seed: int = 0, **kw):
        batch = batch_fn(seed, **kw)
        rows = batch["encoder_input_tokens"].shape[0]
        batch[interface.TASK_IDS] = (np.arange(rows) % num_tasks).astype(np.int32)
        return batch
    return with_tasks


def template_batch_fn(placeholder_id: int, positions=(0, 1, 3)):
    """A ``make_batch`` with ``placeholder_id`` at ``positions`` of every row and nowhere else:
    batches for a template method (P-tuning), whose prompt rows replace placeholder tokens."""
    def batch_fn(seed: int = 0, **kw):
        batch = make_batch(seed, **kw)
        tokens = batch["encoder_input_tokens"]
        tokens[tokens == placeholder_id] = 2
        tokens[:, list(positions)] = placeholder_id
        return batch
    return batch_fn


def _leaves_with_paths(tree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def check_trains_only_its_parameters(method: interface.Method, frozen, *, steps: int = 3,
                                     learning_rate: float = 0.3, initial_trainable=None,
                                     batch_fn=make_batch):
    """Returns the final train state."""
    before = jax.tree_util.tree_map(lambda x: np.array(x, copy=True), frozen)
    optimizer = optim.adafactor(learning_rate=learning_rate)
    state = train.create_train_state(method, optimizer, frozen, jax.random.PRNGKey(1),
                                     initial_trainable)
    start = jax.tree_util.tree_map(lambda x: np.array(x, copy=True), state.params)
    step = train.make_train_step(method, optimizer, donate=False)
    losses = []
    for i in range(steps):
        state, metrics = step(state, frozen, batch_fn(i))
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)), losses
    for (path, a), (_, b) in zip(_leaves_with_paths(before), _leaves_with_paths(frozen)):
        assert np.array_equal(a, np.asarray(b)), f"frozen {jax.tree_util.keystr(path)} changed"
    for (path, a), (_, b) in zip(_leaves_with_paths(start), _leaves_with_paths(state.params)):
        assert not np.array_equal(a, np.asarray(b)), \
            f"trainable {jax.tree_util.keystr(path)} did not move in {steps} steps"
    frozen_ids = {id(x) for x in jax.tree_util.tree_leaves(frozen)}
    assert not frozen_ids & {id(x) for x in jax.tree_util.tree_leaves(state.params)}
    return state


def _dot_output_shapes(jaxpr) -> list:
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes += [tuple(v.aval.shape) for v in eqn.outvars]
        for value in eqn.params.values():
            for sub in (value if isinstance(value, (list, tuple)) else [value]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    shapes += _dot_output_shapes(inner)
    return shapes


def check_no_frozen_kernel_gradient(method: interface.Method, frozen, trainable=None,
                                    batch_fn=make_batch):
    """No matmul output of the traced step has the shape of a T5 2-D kernel (a method's own
    parameters must not have such a shape: the 'test' T5's dims are distinct from them)."""
    optimizer = optim.adafactor(learning_rate=0.3)
    state = train.create_train_state(method, optimizer, frozen, jax.random.PRNGKey(1),
                                     trainable)
    step = train.train_step_fn(method, optimizer)
    jaxpr = jax.make_jaxpr(step)(state, frozen, batch_fn(0)).jaxpr
    # Every 2-D kernel of the T5 (model tuning, whose frozen tree is empty, must fail this).
    kernels = {tuple(x.shape) for x in jax.tree_util.tree_leaves(
        t5.param_shapes(method.model.config)) if len(x.shape) == 2}
    shapes = _dot_output_shapes(jaxpr)
    assert shapes, "no matmul found: the walk over the jaxpr is broken"
    bad = sorted({s for s in shapes if s in kernels})
    assert not bad, f"the train step computes matmuls of frozen-kernel shape {bad}"


def check_mesh_matches_one_device(method: interface.Method, frozen, meshes=("1x8", "2x4", "4x2"),
                                  *, rtol: float = 1e-5, atol: float = 1e-6,
                                  batch_fn=make_batch):
    """One step on each mesh equals the one-device (1x1) step: loss, gradient norm, state.
    Build ``method`` on ``mesh_config()`` (the meshes split its heads and vocabulary)."""
    optimizer = optim.adafactor(learning_rate=0.3)
    batch = batch_fn(0)

    def one_step(text):
        mesh_config = sharding_lib.MeshConfig.parse(text)
        devices = jax.devices()[:mesh_config.data * mesh_config.model]
        mesh = sharding_lib.make_mesh(mesh_config, devices)
        rules = mesh_config.rules()
        placed = jax.device_put(frozen, partitioning.shardings_of(
            partitioning.abstract_frozen(method.model.config, mesh, rules)))
        state = sharded_run.create_train_state(method, optimizer, placed, jax.random.PRNGKey(1),
                                               mesh, rules)
        step = sharded_run.sharded_train_step(method, optimizer, mesh, rules,
                                              jax.tree_util.tree_map(lambda x: x.sharding,
                                                                     placed),
                                              enable_dropout=False)
        new_state, metrics = step(state, placed, sharding_lib.shard_batch(batch, mesh))
        return jax.device_get((new_state.params, metrics))

    ref_params, ref_metrics = one_step("1x1")
    for text in meshes:
        params, metrics = one_step(text)
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=rtol, atol=atol,
                                       err_msg=f"{key} on {text}")
        for (path, a), (_, b) in zip(_leaves_with_paths(ref_params), _leaves_with_paths(params)):
            np.testing.assert_allclose(b, a, rtol=rtol, atol=atol,
                                       err_msg=f"{jax.tree_util.keystr(path)} on {text}")


_DRIVER_CACHE_DIR: Optional[str] = None


def driver_cache_dir() -> str:
    """One persistent compilation cache for every resume-driver run of this test process: the
    drivers share their frozen-model init and small eager programs across methods, and within
    one check only the uninterrupted run compiles the train step (the others load it)."""
    global _DRIVER_CACHE_DIR
    if _DRIVER_CACHE_DIR is None:
        _DRIVER_CACHE_DIR = tempfile.mkdtemp(prefix="prompt_t5x_resume_driver_cache_")
        atexit.register(shutil.rmtree, _DRIVER_CACHE_DIR, True)
    return _DRIVER_CACHE_DIR


def driver_env(cache_dir=None) -> dict:
    """The resume driver's environment: the shared compilation cache, and XLA's backend
    optimisation off (as tests/test_multiprocess.py's children): compiling the driver's train
    step was most of a resume check's time. Every run of one check (uninterrupted, killed,
    resumed) uses the same flags, so the bit-exact comparison is unchanged."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_backend_optimization_level" not in flags:
        flags = (flags + " --xla_backend_optimization_level=0").strip()
    return dict(os.environ, XLA_FLAGS=flags,
                JAX_COMPILATION_CACHE_DIR=str(cache_dir or driver_cache_dir()),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def _driver(model_dir, out, method_config, *extra, cache_dir, encoder_layers=1):
    env = driver_env(cache_dir)
    return subprocess.Popen([sys.executable, DRIVER, str(model_dir), "--steps", "6",
                             "--save_every", "2", "--out", str(out),
                             "--method", json.dumps(method_config),
                             "--encoder_layers", str(encoder_layers), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)


def check_sigkill_resume_is_exact(method_config: dict, tmp_path, *, encoder_layers: int = 1):
    """The driver's 'test' T5 has dropout 0.1 and one layer per stack (``encoder_layers`` for
    methods that need more); ``method_config`` is a registry config (``{'kind': ..., ...}``)
    whose init needs no vocabulary."""
    cache = driver_cache_dir()
    layers = {"encoder_layers": encoder_layers}
    ref = _driver(tmp_path / "uninterrupted", tmp_path / "ref.npz", method_config,
                  cache_dir=cache, **layers)
    assert ref.wait(timeout=300) == 0, ref.stdout.read()
    victim = _driver(tmp_path / "killed", tmp_path / "killed.npz", method_config,
                     "--step_delay", "0.5", cache_dir=cache, **layers)
    for line in victim.stdout:
        if line.strip() == "step 3":
            victim.send_signal(signal.SIGKILL)
            break
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    resumed = _driver(tmp_path / "killed", tmp_path / "killed.npz", method_config,
                      cache_dir=cache, **layers)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert out.splitlines()[0] in ("resumed from 2", "resumed from 4"), out
    want, got = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "killed.npz")
    assert sorted(want.files) == sorted(got.files)
    for name in want.files:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)   # bit-exact


def check_cached_decoding(method: interface.Method, frozen, trainable, *, length: int = 5,
                          batch_fn=make_batch):
    """Cached greedy decoding equals the uncached reference; beam search scores at least as
    well. A ``batch_fn`` batch with ``task_ids`` routes the decoded examples to their tasks."""
    batch = batch_fn(3, batch=4)
    tokens, task_ids = batch["encoder_input_tokens"], batch.get(interface.TASK_IDS)
    spec = decoding.DecodeSpec("greedy", max_decode_len=length, eos_id=None)
    cached = decoding.decode_jit(method, frozen, trainable, tokens, spec, task_ids=task_ids)
    ref_tokens, ref_scores = reference_decoding.greedy_decode_uncached(
        method, frozen, trainable, tokens, length, eos_id=None, task_ids=task_ids)
    np.testing.assert_array_equal(np.asarray(cached.tokens), ref_tokens)
    np.testing.assert_allclose(np.asarray(cached.scores), ref_scores, rtol=1e-5, atol=1e-5)
    # Beam search of width 1 is greedy search (an exact invariant: beam >= greedy is not one,
    # a wider beam can drop the greedy path); a width-3 beam returns its beams best first.
    narrow = decoding.decode_jit(method, frozen, trainable, tokens,
                                 decoding.DecodeSpec("beam", max_decode_len=length, beam_size=1,
                                                     eos_id=None, alpha=0.0), task_ids=task_ids)
    np.testing.assert_array_equal(np.asarray(narrow.tokens), ref_tokens)
    np.testing.assert_allclose(np.asarray(narrow.scores), ref_scores, rtol=1e-5, atol=1e-5)
    beam = decoding.decode_jit(method, frozen, trainable, tokens,
                               decoding.DecodeSpec("beam", max_decode_len=length, beam_size=3,
                                                   eos_id=None, alpha=0.0), task_ids=task_ids)
    all_scores = np.asarray(beam.beam_scores)
    assert np.all(np.isfinite(all_scores)) and np.all(np.diff(all_scores, axis=1) <= 1e-6)


def check_config_round_trip(method: interface.Method, frozen, trainable: Any,
                            atol: float = 1e-5, batch_fn=make_batch):
    """The method rebuilt from its JSON config, and its exported inference form, give the
    logits of the original."""
    batch = batch_fn(5)
    want = np.asarray(method.logits(frozen, trainable, batch))
    config = json.loads(json.dumps(method.method_config()))
    rebuilt = registry.build(method.model, config)
    np.testing.assert_allclose(np.asarray(rebuilt.logits(frozen, trainable, batch)), want,
                               atol=atol, rtol=1e-5)
    tables, export_config = method.export(trainable)
    exported = registry.build(method.model, json.loads(json.dumps(export_config)))
    got = exported.logits(frozen, jax.tree_util.tree_map(
        jnp.asarray, interface.unflatten_tables(tables)), batch)
    np.testing.assert_allclose(np.asarray(got), want, atol=atol, rtol=1e-5)
