"""Decoding: cached == uncached greedy, beam search against brute force, sampling limits, EOS."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_t5x.inference import decoding, reference_decoding
from prompt_t5x.inference.decoding import DecodeSpec
from prompt_t5x.methods import model_tuning, prompt_init, prompt_tuning
from prompt_t5x.model import t5

INPUTS = np.array([[5, 6, 7, 8, 1, 0],
                   [9, 10, 1, 0, 0, 0],
                   [11, 12, 13, 14, 15, 1]], np.int32)


def _prompted(model, mode, length=3, seed=1):
    return prompt_tuning.PromptTuning(model, prompt_length=length, prompt_mode=mode,
                                prompt_init=prompt_init.random_uniform_init(scale=1.0,
                                                                        symmetric=True))


T = 7  # one decode length everywhere: the jitted decoders compile once per (method, spec)
GREEDY = DecodeSpec(max_decode_len=T)
GREEDY_NO_EOS = DecodeSpec(max_decode_len=T, eos_id=None)


@pytest.fixture(scope="module")
def setups():
    """name -> (method, frozen, trainable): no prompt (every weight 'trainable'), and prompts."""
    config = t5.get_config("test")
    model = t5.T5(config)
    params = t5.init_params(config, jax.random.PRNGKey(0))
    out = {"no_prompt": (model_tuning.ModelTuning(model), {}, params)}
    for mode in ("prepend", "before_eos"):
        method = _prompted(model, mode)
        out[mode] = (method, params, method.init_trainable(jax.random.PRNGKey(7), params))
    return out


@pytest.mark.parametrize("which", ["no_prompt", "prepend", "before_eos"])
def test_cached_greedy_equals_uncached(setups, which):
    method, frozen, trainable = setups[which]
    out = decoding.decode_jit(method, frozen, trainable, INPUTS, GREEDY)
    ref_tokens, ref_scores = reference_decoding.greedy_decode_uncached(method, frozen, trainable, INPUTS, T)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref_tokens)
    np.testing.assert_allclose(np.asarray(out.scores), ref_scores, rtol=1e-5, atol=1e-5)
    if which != "no_prompt":  # the prompt really is used
        bare = decoding.decode_jit(*setups["no_prompt"], INPUTS, GREEDY)
        assert not np.allclose(np.asarray(bare.scores), np.asarray(out.scores))


def test_eos_stops_and_pads(setups):
    method, frozen, trainable = setups["prepend"]
    free = np.asarray(decoding.decode_jit(method, frozen, trainable, INPUTS, GREEDY_NO_EOS).tokens)
    stop = int(free[0, 2])  # pretend the 3rd token of row 0 is the end-of-sequence id
    out = decoding.decode_jit(method, frozen, trainable, INPUTS,
                              DecodeSpec(max_decode_len=T, eos_id=stop))
    tokens = np.asarray(out.tokens)
    for row in range(len(INPUTS)):
        hits = np.flatnonzero(free[row] == stop)
        end = hits[0] + 1 if len(hits) else T
        np.testing.assert_array_equal(tokens[row, :end], free[row, :end])
        assert (tokens[row, end:] == 0).all()
    assert tokens[0, 2] == stop and (tokens[0, 3:] == 0).all()
    ref_tokens, ref_scores = reference_decoding.greedy_decode_uncached(method, frozen, trainable, INPUTS, T,
                                                             eos_id=stop)
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_allclose(np.asarray(out.scores), ref_scores, rtol=1e-5, atol=1e-5)


def test_beam_size_one_without_eos_is_greedy(setups):
    method, frozen, trainable = setups["prepend"]
    greedy = decoding.decode_jit(method, frozen, trainable, INPUTS, GREEDY_NO_EOS)
    beam = decoding.decode_jit(method, frozen, trainable, INPUTS,
                               DecodeSpec(strategy="beam", beam_size=1, max_decode_len=T,
                                          eos_id=None))
    np.testing.assert_array_equal(np.asarray(beam.tokens), np.asarray(greedy.tokens))
    np.testing.assert_allclose(np.asarray(beam.scores), np.asarray(greedy.scores), rtol=1e-5)


def _brute_force(method, frozen, trainable, inputs, vocab, length, alpha, eos=1):
    """Every sequence ending in EOS within ``length`` tokens, scored by the full decoder."""
    model = method.model
    variables = method.variables(frozen, trainable)
    encoded, mask = model.apply(variables, jnp.asarray(inputs), method=t5.T5.encode,
                                **method.model_inputs(trainable))
    seqs = []
    for n in range(1, length + 1):
        for body in itertools.product([v for v in range(vocab) if v != eos], repeat=n - 1):
            seqs.append(list(body) + [eos])
    results = []
    for row in range(inputs.shape[0]):
        tokens = np.zeros((len(seqs), length), np.int32)
        for i, s in enumerate(seqs):
            tokens[i, :len(s)] = s
        dec_in = np.concatenate([np.zeros((len(seqs), 1), np.int32), tokens[:, :-1]], axis=1)
        logits = model.apply(variables, jnp.repeat(encoded[row:row + 1], len(seqs), 0),
                             jnp.repeat(mask[row:row + 1], len(seqs), 0), jnp.asarray(dec_in),
                             method=t5.T5.decode)
        lp = np.asarray(jax.nn.log_softmax(logits))
        scored = []
        for i, s in enumerate(seqs):
            total = sum(lp[i, t, s[t]] for t in range(len(s)))
            scored.append((total / ((5.0 + len(s)) / 6.0) ** alpha, s))
        scored.sort(key=lambda x: -x[0])
        results.append(scored)
    return results


@pytest.fixture(scope="module")
def five_tokens():
    """A prompted model over a 5-token vocabulary (brute force over all sequences is cheap)."""
    config = t5.get_config("test", vocab_size=5)
    model = t5.T5(config)
    params = t5.init_params(config, jax.random.PRNGKey(3))
    method = _prompted(model, "prepend", length=2)
    return method, params, method.init_trainable(jax.random.PRNGKey(4), params)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_search_matches_brute_force(five_tokens, alpha):
    # vocab 5, 3 steps: at most 4**2 = 16 live prefixes and 16 * 5 = 80 extensions, so 40 beams
    # (2 * 40 candidates kept per step) make the search exhaustive; 1 + 4 + 16 = 21 sequences end
    # in EOS and must come back best first with exactly their brute-force scores.
    vocab, length, beams = 5, 3, 40
    method, params, trainable = five_tokens
    inputs = np.array([[2, 3, 4, 1], [4, 1, 0, 0]], np.int32)
    expected = _brute_force(method, params, trainable, inputs, vocab, length, alpha)
    out = decoding.decode_jit(method, params, trainable, inputs,
                              DecodeSpec(strategy="beam", beam_size=beams, max_decode_len=length,
                                         alpha=alpha))
    real = len(expected[0])
    assert real == 21
    for row in range(inputs.shape[0]):
        want = np.array([s for s, _ in expected[row]], np.float32)
        np.testing.assert_allclose(np.asarray(out.beam_scores[row, :real]), want, rtol=1e-5,
                                   atol=1e-5)
        assert (np.asarray(out.beam_scores[row, real:]) <= decoding.NEG_INF / 2).all()
        got = [list(b[:list(b).index(1) + 1]) for b in np.asarray(out.beams[row, :real])]
        assert got[0] == expected[row][0][1]
        assert sorted(map(tuple, got)) == sorted(tuple(s) for _, s in expected[row])
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(out.beams[:, 0]))

    # A pruned search (3 beams) returns real candidates with their exact brute-force scores.
    small = decoding.decode_jit(method, params, trainable, inputs,
                                DecodeSpec(strategy="beam", beam_size=3, max_decode_len=length,
                                           alpha=alpha))
    for row in range(inputs.shape[0]):
        lookup = {tuple(s): score for score, s in expected[row]}
        for b, score in zip(np.asarray(small.beams[row]), np.asarray(small.beam_scores[row])):
            if score <= decoding.NEG_INF / 2:  # an empty slot: fewer than 3 finished candidates
                continue
            seq = tuple(b[:list(b).index(1) + 1])
            np.testing.assert_allclose(score, lookup[seq], rtol=1e-5, atol=1e-5)


def test_beam_scores_sorted_and_best_not_worse_than_greedy(setups):
    method, frozen, trainable = setups["prepend"]
    greedy = decoding.decode_jit(method, frozen, trainable, INPUTS, GREEDY)
    beam = decoding.decode_jit(method, frozen, trainable, INPUTS,
                               DecodeSpec(strategy="beam", beam_size=4, max_decode_len=T))
    scores = np.asarray(beam.beam_scores)
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    g_tokens = np.asarray(greedy.tokens)
    for row in range(len(INPUTS)):
        if 1 in g_tokens[row]:  # a finished greedy sequence is one beam-search candidate
            n = list(g_tokens[row]).index(1) + 1
            normalised = float(greedy.scores[row]) / ((5.0 + n) / 6.0) ** 0.6
            assert scores[row, 0] >= normalised - 1e-5


def test_sampling_limits_equal_greedy(setups):
    method, frozen, trainable = setups["prepend"]
    greedy = np.asarray(decoding.decode_jit(method, frozen, trainable, INPUTS, GREEDY).tokens)
    rng = jax.random.PRNGKey(11)
    for spec in (DecodeSpec(strategy="sample", temperature=1e-5, max_decode_len=T),
                 DecodeSpec(strategy="sample", temperature=1.0, top_k=1, max_decode_len=T),
                 DecodeSpec(strategy="sample", temperature=1.0, top_p=1e-6, max_decode_len=T)):
        out = decoding.decode_jit(method, frozen, trainable, INPUTS, spec, rng)
        np.testing.assert_array_equal(np.asarray(out.tokens), greedy, err_msg=str(spec))
    hot = decoding.decode_jit(method, frozen, trainable, INPUTS,
                              DecodeSpec(strategy="sample", temperature=1.0, max_decode_len=T,
                                         eos_id=None), rng)
    assert not np.array_equal(np.asarray(hot.tokens), greedy)  # it does sample


def test_sampled_first_token_follows_model_distribution(five_tokens):
    method, params, trainable = five_tokens
    vocab, n = 5, 4000
    inputs = np.tile(np.array([[2, 3, 1]], np.int32), (n, 1))
    logits = method.logits(params, trainable, {
        "encoder_input_tokens": inputs[:1], "decoder_input_tokens": np.zeros((1, 1), np.int32)})
    probs = np.asarray(jax.nn.softmax(logits[0, 0] / 0.7))

    def first_tokens(seed, **kw):
        spec = DecodeSpec(strategy="sample", temperature=0.7, max_decode_len=1, **kw)
        out = decoding.decode_jit(method, params, trainable, inputs, spec,
                                  jax.random.PRNGKey(seed))
        return np.bincount(np.asarray(out.tokens[:, 0]), minlength=vocab) / n

    freq = first_tokens(0)
    assert 0.5 * np.abs(freq - probs).sum() < 0.04
    for kw in ({"top_k": 2}, {"top_p": float(np.sort(probs)[-1]) + 1e-3}):
        top2 = np.argsort(-probs)[:2]  # the nucleus just above the best token's mass: 2 tokens
        freq = first_tokens(1, **kw)
        assert set(np.flatnonzero(freq)) <= set(top2), kw
        expected = probs[top2] / probs[top2].sum()
        assert np.abs(freq[top2] - expected).max() < 0.04, kw


def test_filter_logits():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda x: np.flatnonzero(np.asarray(x[0]) > decoding.NEG_INF / 2).tolist()  # noqa
    assert kept(decoding.filter_logits(logits, top_k=2)) == [0, 1]
    assert kept(decoding.filter_logits(logits, top_p=0.5)) == [0]
    assert kept(decoding.filter_logits(logits, top_p=0.6)) == [0, 1]
    assert kept(decoding.filter_logits(logits, top_p=0.96)) == [0, 1, 2, 3]
    shuffled = logits[:, ::-1]
    assert kept(decoding.filter_logits(shuffled, top_p=0.7)) == [2, 3]


def test_brevity_penalty_and_spec_validation():
    np.testing.assert_allclose(float(decoding.brevity_penalty(0.6, 3)), (8 / 6) ** 0.6, rtol=1e-6)
    assert float(decoding.brevity_penalty(0.0, 7)) == 1.0
    with pytest.raises(ValueError, match="strategy"):
        DecodeSpec(strategy="nucleus")
    with pytest.raises(ValueError, match="max_decode_len"):
        DecodeSpec(max_decode_len=0)
