"""prompt_t5x.data.metrics against hand-computed and scikit-learn / scipy values."""

import math

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from prompt_t5x.data import metrics


def test_accuracy_hand_checked():
    assert metrics.accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == {"accuracy": 75.0}
    assert metrics.accuracy(["a", "b"], ["a", "c"]) == {"accuracy": 50.0}


def test_misaligned_or_empty_inputs_are_refused():
    with pytest.raises(ValueError, match="2 targets but 1 predictions"):
        metrics.accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="no examples"):
        metrics.accuracy([], [])


def test_f1_binary_hand_checked_and_invalid_counted_wrong():
    # tp=2 (idx 0, 3), fp=1 (idx 1), fn=1 (idx 2): P=2/3, R=2/3, F1=2/3.
    assert metrics.f1_binary([1, 0, 1, 1], [1, 1, 0, 1])["f1"] == pytest.approx(200 / 3)
    # An invalid prediction (-1) on a positive target is a false negative, on a negative one a
    # false positive: [1, 0] vs [-1, -1] -> tp=0 -> F1 = 0.
    assert metrics.f1_binary([1, 0], [-1, -1])["f1"] == 0.0
    rng = np.random.default_rng(0)
    t = rng.integers(0, 2, 50)
    p = rng.integers(0, 2, 50)
    assert metrics.f1_binary(t, p)["f1"] == pytest.approx(100 * skm.f1_score(t, p))


def test_matthews_corrcoef_hand_checked_and_vs_sklearn():
    # tp=1 tn=1 fp=1 fn=1 -> MCC = (1*1 - 1*1) / sqrt(2*2*2*2) = 0.
    assert metrics.matthews_corrcoef([1, 1, 0, 0], [1, 0, 1, 0])["matthews_corrcoef"] == 0.0
    # tp=2 tn=1 fp=0 fn=1 -> (2*1 - 0*1)/sqrt(2*3*1*2) = 2/sqrt(12)
    got = metrics.matthews_corrcoef([1, 1, 1, 0], [1, 1, 0, 0])["matthews_corrcoef"]
    assert got == pytest.approx(100 * 2 / math.sqrt(12))
    rng = np.random.default_rng(1)
    t, p = rng.integers(0, 2, 40), rng.integers(0, 2, 40)
    assert metrics.matthews_corrcoef(t, p)["matthews_corrcoef"] == pytest.approx(
        100 * skm.matthews_corrcoef(t, p))


def test_pearson_spearman():
    t = [1.0, 2.0, 3.0, 4.0]
    assert metrics.pearson_corrcoef(t, [2.0, 4.0, 6.0, 8.0])["pearson_corrcoef"] == pytest.approx(100)
    # Monotone but not linear: Spearman 100, Pearson below.
    p = [1.0, 10.0, 100.0, 1000.0]
    assert metrics.spearman_corrcoef(t, p)["spearman_corrcoef"] == pytest.approx(100)
    assert metrics.pearson_corrcoef(t, p)["pearson_corrcoef"] == pytest.approx(
        100 * stats.pearsonr(t, p)[0])
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=30), rng.normal(size=30)
    assert metrics.spearman_corrcoef(a, b)["spearman_corrcoef"] == pytest.approx(
        100 * stats.spearmanr(a, b)[0])
    # A constant prediction has no defined correlation: reported as 0, not NaN.
    assert metrics.pearson_corrcoef(t, [1.0] * 4)["pearson_corrcoef"] == 0.0


def test_cb_macro_f1_and_accuracy():
    targets = [0, 0, 1, 1, 2, 2]
    preds = [0, 1, 1, 1, 2, -1]
    # class 0: tp1 fp0 fn1 -> 2/3; class 1: tp2 fp1 fn0 -> 4/5; class 2: tp1 fp0 fn1 -> 2/3.
    expected = 100 * (2 / 3 + 4 / 5 + 2 / 3) / 3
    got = metrics.cb_metrics(targets, preds)
    assert got["mean_3class_f1"] == pytest.approx(expected)
    assert got["accuracy"] == pytest.approx(100 * 4 / 6)
    assert got["mean_3class_f1"] == pytest.approx(
        100 * skm.f1_score(targets, preds, labels=[0, 1, 2], average="macro"))


def test_multirc_f1a_and_exact_match():
    def rows(group, values):
        return [{"group": group, "value": v} for v in values]
    targets = rows(("p0", "q0"), [1, 0, 1]) + rows(("p0", "q1"), [0, 1])
    preds = rows(("p0", "q0"), [1, 0, 1]) + rows(("p0", "q1"), [1, 1])
    got = metrics.multirc_metrics(targets, preds)
    # Question q0 all right, q1 one wrong -> EM 50. F1a over all 5 answers: tp=3 fp=1 fn=0.
    assert got["exact_match"] == pytest.approx(50.0)
    assert got["f1a"] == pytest.approx(100 * 2 * 3 / (2 * 3 + 1))


def test_squad_normalisation_and_token_f1():
    assert metrics.normalize_answer("The  Cat's, hat!") == "cats hat"
    assert metrics.exact_match_score("the Eiffel Tower", "Eiffel tower.") == 1.0
    # gold "new york city" vs "york city hall": overlap 2, P=2/3, R=2/3.
    assert metrics.token_f1_score("New York City", "York City Hall") == pytest.approx(2 / 3)
    assert metrics.token_f1_score("a", "the") == 0.0


def test_record_max_over_answers_and_dedup():
    targets = [{"group": (0, 0), "answers": ["Obama", "Barack Obama"]},
               {"group": (0, 0), "answers": ["Obama", "Barack Obama"]},  # same query again
               {"group": (0, 1), "answers": ["Paris"]}]
    preds = [{"group": (0, 0), "value": "barack obama"},
             {"group": (0, 0), "value": "wrong"},   # ignored: query already scored
             {"group": (0, 1), "value": "Paris France"}]
    got = metrics.record_metrics(targets, preds)
    assert got["em"] == pytest.approx(50.0)
    assert got["f1"] == pytest.approx(100 * (1.0 + 2 / 3) / 2)
