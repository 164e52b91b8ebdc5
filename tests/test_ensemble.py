"""Prompt ensembling: one batched pass == N separate passes; copies of a prompt == the prompt;
vote and score-sum rules on constructed cases."""

import jax
import numpy as np
import pytest

from prompt_t5x.inference import decoding, ensemble, rank_classification
from prompt_t5x.methods import prompt_init, prompt_tuning
from prompt_t5x.model import t5

INPUTS = np.array([[5, 6, 7, 8, 1, 0],
                   [9, 10, 1, 0, 0, 0]], np.int32)
SPEC = decoding.DecodeSpec(max_decode_len=5)


@pytest.fixture(scope="module")
def setup():
    config = t5.get_config("test")
    model = t5.T5(config)
    params = t5.init_params(config, jax.random.PRNGKey(0))
    method = prompt_tuning.PromptTuning(model, prompt_length=3, prompt_mode="before_eos",
                                  prompt_init=prompt_init.random_uniform_init(1.0, symmetric=True))
    prompts = np.stack([np.asarray(method.init_trainable(jax.random.PRNGKey(i), params)["prompt"])
                        for i in range(3)])
    labels = rank_classification.make_label_batch([[20, 21], [30], [40, 41, 42]], 4)
    return method, params, prompts, labels


def test_one_batched_pass_equals_separate_passes(setup):
    method, params, prompts, labels = setup
    batched = ensemble.ensemble_decode(method, params, prompts, INPUTS, SPEC)
    assert batched.tokens.shape == (3, 2, 5) and batched.scores.shape == (3, 2)
    scores = ensemble.ensemble_label_scores(method, params, prompts, INPUTS, labels)
    assert scores.shape == (3, 2, 3)
    label_arrays = {"decoder_target_tokens": labels.decoder_target_tokens,
                    "decoder_input_tokens": labels.decoder_input_tokens,
                    "decoder_loss_weights": labels.decoder_loss_weights}
    for n in range(3):
        single = decoding.decode_jit(method, params, {"prompt": prompts[n]}, INPUTS, SPEC)
        np.testing.assert_array_equal(np.asarray(batched.tokens[n]), np.asarray(single.tokens))
        np.testing.assert_allclose(np.asarray(batched.scores[n]), np.asarray(single.scores),
                                   rtol=1e-5, atol=1e-5)
        alone = rank_classification.label_scores(method, params, {"prompt": prompts[n]}, INPUTS,
                                                 label_arrays)
        np.testing.assert_allclose(np.asarray(scores[n]), np.asarray(alone), rtol=1e-5,
                                   atol=1e-5)
    # The prompts differ, and so do their scores: the rows really get their own prompt.
    assert not np.allclose(np.asarray(scores[0]), np.asarray(scores[1]))


def test_copies_of_one_prompt_equal_the_prompt(setup):
    method, params, prompts, labels = setup
    copies = np.stack([prompts[1]] * 3)
    out = ensemble.ensemble_decode(method, params, copies, INPUTS, SPEC)
    single = decoding.decode_jit(method, params, {"prompt": prompts[1]}, INPUTS, SPEC)
    answers = [[tuple(row) for row in np.asarray(out.tokens[n])] for n in range(3)]
    voted = ensemble.majority_vote(answers, np.asarray(out.scores))
    assert voted == [tuple(row) for row in np.asarray(single.tokens)]
    scores = ensemble.ensemble_label_scores(method, params, copies, INPUTS, labels)
    single_scores = np.asarray(ensemble.ensemble_label_scores(method, params, prompts[1:2],
                                                              INPUTS, labels))[0]
    np.testing.assert_array_equal(ensemble.sum_scores(scores), single_scores.argmax(-1))
    np.testing.assert_array_equal(ensemble.vote_labels(scores), single_scores.argmax(-1))


def test_majority_vote_rules():
    preds = [["pos", "neg", "a", "x"],
             ["pos", "pos", "b", "y"],
             ["neg", "pos", "c", "y"]]
    assert ensemble.majority_vote(preds) == ["pos", "pos", "a", "y"]  # 3-way tie -> first prompt
    scores = np.array([[0, 0, -5.0, 0], [0, 0, -1.0, 0], [0, 0, -3.0, 0]])
    assert ensemble.majority_vote(preds, scores)[2] == "b"  # tie broken by score
    # A 2-2 tie between answers goes to the higher summed score.
    tie = [["x"], ["y"], ["x"], ["y"]]
    assert ensemble.majority_vote(tie, np.array([[-1.0], [-0.1], [-1.0], [-0.1]])) == ["y"]
    assert ensemble.majority_vote(tie) == ["x"]
    with pytest.raises(ValueError, match="same number"):
        ensemble.majority_vote([["a"], ["a", "b"]])
    with pytest.raises(ValueError, match=r"\[N, B\]"):
        ensemble.majority_vote(tie, np.zeros((4, 2)))


def test_score_rules():
    # Two prompts, one example, two labels: each prompt prefers another label; the sum decides.
    scores = np.log(np.array([[[0.9, 0.1]], [[0.4, 0.6]]]))
    assert ensemble.sum_scores(scores).tolist() == [0]      # 0.36 > 0.06
    assert ensemble.vote_labels(scores).tolist() == [0]     # 1-1 tie -> higher summed score
    scores = np.log(np.array([[[0.45, 0.55]], [[0.45, 0.55]], [[0.99, 0.01]]]))
    assert ensemble.vote_labels(scores).tolist() == [1]     # majority of argmaxes
    assert ensemble.sum_scores(scores).tolist() == [0]      # product of experts


def test_load_prompts(tmp_path, setup):
    method, params, prompts, _ = setup
    for i in range(2):
        np.save(tmp_path / f"p{i}.npy", prompts[i])
    stacked = ensemble.load_prompts([tmp_path / "p0.npy", tmp_path / "p1.npy"])
    np.testing.assert_array_equal(stacked, prompts[:2])
    np.save(tmp_path / "short.npy", prompts[0][:2])
    with pytest.raises(ValueError, match="one shape"):
        ensemble.load_prompts([tmp_path / "p0.npy", tmp_path / "short.npy"])
    with pytest.raises(FileNotFoundError):
        ensemble.load_prompts([tmp_path / "missing.npy"])
    with pytest.raises(ValueError, match="d_model"):
        ensemble.ensemble_decode(method, params, np.zeros((2, 3, 7)), INPUTS, SPEC)
