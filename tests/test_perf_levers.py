"""The performance levers change speed/memory, never the numbers (CPU, tiny configs).

- attention_impl 'xla' (jax.nn.dot_product_attention with the relative-position bias) vs 'einsum',
  and the arguments of the 'cudnn' path (run through XLA) on right-padded batches;
- every remat policy vs 'none';
- bf16 frozen weights vs float32, within bf16 rounding;
- the compiled prompt-tuning step contains no weight-gradient matmul.
"""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_t5x.bench import flops
from prompt_t5x.bench.bench_protocol import random_train_batch
from prompt_t5x.inference import decoding
from prompt_t5x.methods import model_tuning, prompt_init, prompt_tuning
from prompt_t5x.model import attention, t5
from prompt_t5x.training import optim, train

PROMPT_LEN = 5
# 'test' has every dim distinct (embed 32, heads*kv 40, mlp 48, vocab 101); batch 3 x encoder
# 7 + 5 = 12 and decoder 6 make activation matrices [36, .] and [18, .], so no activation shape
# can be mistaken for a kernel's [in, out].
BATCH, INPUTS_LEN, DECODER_LEN = 3, 7, 6


def right_pad(batch, input_lengths, target_lengths):
    """Pads each row after its length, as SeqIO's trim_and_pad does (id 0, loss weight 0)."""
    out = {k: np.array(v) for k, v in batch.items()}
    for row, (n_in, n_out) in enumerate(zip(input_lengths, target_lengths)):
        out["encoder_input_tokens"][row, n_in:] = 0
        out["decoder_target_tokens"][row, n_out:] = 0
        out["decoder_input_tokens"][row, n_out + 1:] = 0
        out["decoder_loss_weights"][row, n_out:] = 0
    return out


@pytest.fixture(scope="module")
def setup():
    cfg = t5.get_config("test")
    frozen = t5.init_params(cfg, jax.random.PRNGKey(0))
    # Padding in both stacks (one full row each), so every mask path is exercised.
    batch = right_pad(random_train_batch(np.random.default_rng(0), cfg.vocab_size, BATCH,
                                         INPUTS_LEN, DECODER_LEN), [7, 4, 2], [3, 6, 5])
    prompt = {"prompt": jax.random.uniform(jax.random.PRNGKey(1), (PROMPT_LEN, cfg.emb_dim),
                                           minval=-0.5, maxval=0.5)}
    return cfg, frozen, batch, prompt


@pytest.fixture(scope="module")
def reference(setup):
    """(loss, logits, prompt grad) with einsum attention and no remat."""
    cfg, frozen, batch, prompt = setup
    return loss_logits_grad(cfg, frozen, prompt, batch)


def loss_logits_grad(cfg, frozen, trainable, batch):
    """(loss, logits [B, T, V], d loss / d prompt [P, D]) of the train step's objective."""
    method = prompt_tuning.PromptTuning(t5.T5(cfg), prompt_length=PROMPT_LEN)

    def loss(tr):
        logits = method.logits(frozen, tr, batch)
        ce, zl, _, weight = train.cross_entropy_sums(
            logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"], 1e-4)
        return (ce + zl) / weight, logits

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)
    return float(value), np.asarray(logits), np.asarray(grads["prompt"])


def test_xla_attention_equals_einsum(setup, reference):
    cfg, frozen, batch, prompt = setup
    loss0, logits0, grad0 = reference
    loss1, logits1, grad1 = loss_logits_grad(cfg.replace(attention_impl="xla"), frozen, prompt,
                                             batch)
    # float32 throughout: agreement to float32 rounding (a few ulps of the largest entry).
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    np.testing.assert_allclose(logits1, logits0, rtol=0, atol=1e-5 * np.abs(logits0).max())
    np.testing.assert_allclose(grad1, grad0, rtol=0, atol=1e-5 * np.abs(grad0).max())
    assert np.abs(grad0).max() > 0


@pytest.fixture
def emulated_cudnn(monkeypatch):
    """Runs the cuDNN path's arguments (bias [1, H, Q, K], padding as sequence lengths,
    is_causal) through XLA's implementation (no GPU here); records each call's keywords."""
    original = jax.nn.dot_product_attention
    calls = []

    def as_xla(*args, implementation=None, **kwargs):
        assert implementation == "cudnn"
        assert "bias" not in kwargs or kwargs["bias"].shape[0] == 1
        calls.append(sorted(kwargs))
        return original(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", as_xla)
    return calls


def test_cudnn_arguments_mean_the_same_attention(setup, reference, emulated_cudnn):
    """The whole model, compared at every position that reaches the loss."""
    cfg, frozen, batch, prompt = setup
    loss0, logits0, grad0 = reference
    loss1, logits1, grad1 = loss_logits_grad(cfg.replace(attention_impl="cudnn"), frozen, prompt,
                                             batch)
    # Encoder self (kv lengths), decoder self (causal, both lengths), cross (both lengths); no
    # dense mask anywhere.
    assert ["bias", "is_causal", "key_value_seq_lengths", "scale"] in emulated_cudnn
    assert ["bias", "is_causal", "key_value_seq_lengths", "query_seq_lengths",
            "scale"] in emulated_cudnn
    assert ["is_causal", "key_value_seq_lengths", "query_seq_lengths", "scale"] in emulated_cudnn
    assert not any("mask" in call for call in emulated_cudnn)
    valid = batch["decoder_loss_weights"] > 0
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    np.testing.assert_allclose(logits1[valid], logits0[valid], rtol=0,
                               atol=1e-5 * np.abs(logits0).max())
    np.testing.assert_allclose(grad1, grad0, rtol=0, atol=1e-5 * np.abs(grad0).max())


def test_cudnn_arguments_for_cached_decoding(setup, emulated_cudnn):
    """One query per step against the KV cache (keys valid up to the step): same tokens and
    scores as einsum."""
    cfg, frozen, batch, prompt = setup
    spec = decoding.DecodeSpec(strategy="greedy", max_decode_len=DECODER_LEN, eos_id=None)

    def greedy(impl):
        method = prompt_tuning.PromptTuning(t5.T5(cfg.replace(attention_impl=impl)),
                                      prompt_length=PROMPT_LEN)
        return decoding.decode(method, frozen, prompt, batch["encoder_input_tokens"], spec)

    want, got = greedy("einsum"), greedy("cudnn")
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_allclose(np.asarray(got.scores), np.asarray(want.scores), rtol=1e-5)
    assert ["bias", "is_causal", "key_value_seq_lengths", "scale"] in emulated_cudnn
    assert not any("mask" in call for call in emulated_cudnn)


def test_cudnn_arguments_with_prefixes(setup, emulated_cudnn):
    """Per-layer key/value prefixes: lengths count the prefix keys, except causal
    self-attention, the one place that needs the dense mask."""
    cfg, frozen, batch, _ = setup
    rng = np.random.RandomState(3)

    def prefix(layers):
        shape = (layers, 1, 2, cfg.num_heads, cfg.head_dim)
        return tuple(jnp.asarray(rng.randn(*shape), jnp.float32) for _ in range(2))

    prefixes = {"encoder": prefix(cfg.num_encoder_layers),
                "decoder_self": prefix(cfg.num_decoder_layers),
                "decoder_cross": prefix(cfg.num_decoder_layers)}

    def logits(impl):
        model = t5.T5(cfg.replace(attention_impl=impl))
        return np.asarray(model.apply({"params": frozen}, batch, prefixes=prefixes))

    want, got = logits("einsum"), logits("cudnn")
    valid = batch["decoder_loss_weights"] > 0
    np.testing.assert_allclose(got[valid], want[valid], rtol=0, atol=1e-5 * np.abs(want).max())
    dense = [call for call in emulated_cudnn if "mask" in call]
    assert dense and all("is_causal" not in call for call in dense)
    assert len(dense) == cfg.num_decoder_layers   # decoder self-attention only


def test_cudnn_lengths_count_prefix_keys_and_are_at_least_one():
    q = jnp.zeros((2, 3, 1, 4))
    k = jnp.zeros((2, 6, 1, 4))
    mask = attention.Mask(query_valid=jnp.array([[False] * 3, [True, True, False]]),
                          key_valid=jnp.array([[False] * 4, [True, True, True, False]])
                          ).with_prefix(2)
    kwargs = attention.cudnn_arguments(q, k, None, mask, jnp.float32)
    # An all-padding filler row gets length 1, not 0 (cuDNN < 9.25 returns NaN for 0).
    np.testing.assert_array_equal(kwargs["query_seq_lengths"], [1, 2])
    np.testing.assert_array_equal(kwargs["key_value_seq_lengths"], [2, 5])
    assert kwargs["is_causal"] is False and "mask" not in kwargs
    causal = attention.cudnn_arguments(q, k, None, mask.replace(causal=True), jnp.float32)
    assert causal["mask"].shape == (2, 1, 3, 6) and "is_causal" not in causal


def test_loss_sums_ignore_non_finite_values_at_weight_zero():
    logits = jnp.array([[[0.0, 1.0], [jnp.nan, 0.0]]])
    ce, zl, correct, weight = train.cross_entropy_sums(
        logits, jnp.array([[1, 0]]), jnp.array([[1.0, 0.0]]), 1e-4)
    assert np.isfinite([ce, zl, correct]).all() and float(weight) == 1.0
    assert float(correct) == 1.0


def test_mask_dense_with_prefix_and_causal():
    mask = attention.Mask(query_valid=jnp.array([[True, True, False]]),
                          key_valid=jnp.array([[True, True, False]]), causal=True).with_prefix(2)
    expected = np.array([[1, 1, 1, 0, 0],
                         [1, 1, 1, 1, 0],
                         [0, 0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(np.asarray(mask.dense(3, 5))[0, 0], expected)
    assert attention.Mask().dense(3, 3) is None


@pytest.mark.parametrize("policy", sorted(set(t5.REMAT_POLICIES) - {"none"}))
def test_remat_policy_matches_none(setup, reference, policy):
    cfg, frozen, batch, prompt = setup
    loss0, logits0, grad0 = reference
    loss1, logits1, grad1 = loss_logits_grad(cfg.replace(remat_policy=policy), frozen, prompt,
                                             batch)
    # Recomputation repeats the same float32 ops; only fusion order may move the last bits.
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    np.testing.assert_allclose(logits1, logits0, rtol=0, atol=1e-6 * np.abs(logits0).max())
    np.testing.assert_allclose(grad1, grad0, rtol=0, atol=1e-6 * np.abs(grad0).max())


def test_bf16_frozen_weights_match_float32_within_bf16_rounding(setup, reference):
    """param_dtype='bfloat16' stores the same weights rounded to 8 mantissa bits."""
    cfg, frozen, batch, prompt = setup
    loss32, _, grad32 = reference
    frozen16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), frozen)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(frozen16))
    loss16, _, grad16 = loss_logits_grad(cfg.replace(param_dtype="bfloat16"), frozen16, prompt,
                                         batch)
    # Loss: within one bf16 ulp (2^-8 relative). Prompt gradient: every weight carries up to
    # 2^-9 relative error and those add up through the layers (measured 3.3%); 10% relative L2
    # and cosine 0.99 still catch a wrong cast (a transposed or unscaled weight is O(1) off).
    assert abs(loss16 - loss32) <= 2.0 ** -8 * abs(loss32), (loss16, loss32)
    rel = np.linalg.norm(grad16 - grad32) / np.linalg.norm(grad32)
    cos = float(np.vdot(grad16, grad32) / np.linalg.norm(grad16) / np.linalg.norm(grad32))
    assert rel < 0.1 and cos > 0.99, (rel, cos)
    assert loss16 != loss32  # the bf16 path really ran in bf16


def _kernel_shapes(cfg):
    shapes = set()
    for path, s in jax.tree_util.tree_flatten_with_path(t5.param_shapes(cfg))[0]:
        if "kernel" in jax.tree_util.keystr(path):
            shapes |= {tuple(s.shape), tuple(s.shape)[::-1]}
    return shapes


def _jaxpr_dot_shapes(jaxpr):
    """Output shapes of every dot_general in a (closed) jaxpr, sub-jaxprs included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append(tuple(eqn.outvars[0].aval.shape))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out.extend(_jaxpr_dot_shapes(sub))
    return out


def _compiled_step(method, optimizer, state, frozen, batch):
    step = train.make_train_step(method, optimizer)
    return step.lower(state, frozen, batch).compile(), jax.make_jaxpr(step)(state, frozen, batch)


def test_no_weight_gradient_matmul_in_compiled_step(setup):
    cfg, _, batch, _ = setup
    kernels = _kernel_shapes(cfg)
    assert len(kernels) >= 6  # [32,40], [40,32], [32,48], [48,32], [32,101], [101,32]
    frozen = t5.param_shapes(cfg)   # abstract: nothing allocated
    optimizer = optim.adafactor()
    method = prompt_tuning.PromptTuning(t5.T5(cfg), PROMPT_LEN, prompt_init=prompt_init.random_uniform_init())
    state = jax.eval_shape(lambda f: train.create_train_state(method, optimizer, f,
                                                              jax.random.PRNGKey(0)), frozen)
    compiled, jaxpr = _compiled_step(method, optimizer, state, frozen, batch)
    dots = flops.hlo_dots(compiled.as_text())
    assert len(dots) > 20
    assert [d for d in dots if d["out"] in kernels] == []
    assert [s for s in _jaxpr_dot_shapes(jaxpr.jaxpr) if s in kernels] == []

    # The same checks flag model tuning, whose step does compute weight gradients.
    tuning = model_tuning.ModelTuning(t5.T5(cfg))
    tuned_state = jax.eval_shape(lambda p: train.create_train_state(
        tuning, optimizer, {}, jax.random.PRNGKey(0), trainable=p), frozen)
    compiled, jaxpr = _compiled_step(tuning, optimizer, tuned_state, {}, batch)
    assert {d["out"] for d in flops.hlo_dots(compiled.as_text())} & kernels
    assert set(_jaxpr_dot_shapes(jaxpr.jaxpr)) & kernels
