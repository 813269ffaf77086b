"""fastdistil.metrics against scikit-learn's and scipy's reference implementations."""

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics
import torch

from fastdistil.evaluate import metrics, tasks


@pytest.mark.filterwarnings("ignore:A single label was found")  # n = 1: sklearn's note on the confusion matrix
@pytest.mark.parametrize("n", [1, 7, 41, 1000])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_metrics_agree_with_sklearn(n, seed):
    rng = np.random.default_rng(seed)
    binary_truth, binary_pred = rng.integers(0, 2, n), rng.integers(0, 2, n)
    truth, pred = rng.integers(0, 3, n), rng.integers(0, 3, n)
    assert metrics.accuracy(pred, truth) == pytest.approx(sklearn.metrics.accuracy_score(truth, pred), abs=1e-12)
    assert metrics.f1(binary_pred, binary_truth) == pytest.approx(
        sklearn.metrics.f1_score(binary_truth, binary_pred, zero_division=0.0), abs=1e-12)
    for t, p in ((binary_truth, binary_pred), (truth, pred)):
        assert metrics.matthews_corrcoef(p, t) == pytest.approx(sklearn.metrics.matthews_corrcoef(t, p), abs=1e-12)


def test_metrics_take_tensors_and_mostly_right_predictions():
    truth = torch.tensor([1, 0, 1, 1, 0, 1, 0, 0, 1, 1])
    pred = truth.clone()
    pred[[2, 4]] = 1 - pred[[2, 4]]  # one false negative, one false positive
    assert metrics.accuracy(pred, truth) == 0.8
    assert metrics.f1(pred, truth) == pytest.approx(sklearn.metrics.f1_score(truth.numpy(), pred.numpy()))
    assert metrics.matthews_corrcoef(pred, truth) == pytest.approx(
        sklearn.metrics.matthews_corrcoef(truth.numpy(), pred.numpy()))


def test_degenerate_cases_score_zero_as_sklearn_does():
    ones, zeros = np.ones(5, dtype=int), np.zeros(5, dtype=int)
    assert metrics.f1(zeros, zeros) == sklearn.metrics.f1_score(zeros, zeros, zero_division=0.0) == 0.0
    assert metrics.matthews_corrcoef(ones, np.array([0, 1, 0, 1, 1])) == 0.0
    assert metrics.matthews_corrcoef(ones, np.array([0, 1, 0, 1, 1])) == sklearn.metrics.matthews_corrcoef(
        [0, 1, 0, 1, 1], ones)
    assert metrics.pearson(np.full(5, 2.5), np.arange(5.0)) == 0.0


@pytest.mark.parametrize("n", [2, 5, 41, 1000])
@pytest.mark.parametrize("seed", [0, 1])
def test_correlations_agree_with_scipy(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    y = 0.5 * x + rng.normal(size=n)
    assert metrics.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y).statistic, abs=1e-10)
    assert metrics.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-10)
    # STS-B's references are on a 0-5 scale in steps of 0.2: many ties, which get their mean rank.
    ties_x, ties_y = rng.integers(0, 26, n) / 5, rng.integers(0, 4, n).astype(float)
    if len(set(ties_x)) > 1 and len(set(ties_y)) > 1:
        assert metrics.spearman(ties_x, ties_y) == pytest.approx(
            scipy.stats.spearmanr(ties_x, ties_y).statistic, abs=1e-10)


def test_ranks_average_ties_like_scipy():
    values = np.array([3.0, 1.0, 3.0, 2.0, 3.0, 1.0])
    np.testing.assert_array_equal(metrics._ranks(values), scipy.stats.rankdata(values))


def test_a_task_scores_the_mean_of_its_metrics_over_its_splits():
    truth = np.array([1, 0, 1, 1, 0, 0])
    pred = np.array([1, 1, 1, 0, 0, 0])
    mrpc = metrics.compute(tasks.get_task("glue/mrpc"), {"validation": pred}, {"validation": truth})
    assert mrpc["metrics"] == {"accuracy": pytest.approx(4 / 6), "f1": pytest.approx(2 / 3)}
    assert mrpc["score"] == pytest.approx((4 / 6 + 2 / 3) / 2)
    mnli = metrics.compute(tasks.get_task("glue/mnli"), {"validation_matched": pred, "validation_mismatched": truth},
                           {"validation_matched": truth, "validation_mismatched": truth})
    assert mnli["metrics"] == {"accuracy/validation_matched": pytest.approx(4 / 6),
                               "accuracy/validation_mismatched": 1.0}
    assert mnli["score"] == pytest.approx((4 / 6 + 1) / 2)


def test_the_task_table_covers_glue_imdb_and_wiki_topic():
    glue = {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}
    assert set(tasks.TASKS) == {f"glue/{t}" for t in glue} | {"imdb", "wiki-topic"}
    assert tasks.get_task("glue/cola").metrics == ("matthews_corrcoef",)
    assert tasks.get_task("glue/stsb").is_regression
    with pytest.raises(ValueError, match=r"unknown task 'glue/nope'.*wiki-topic.*imdb.*glue/sst2"):
        tasks.get_task("glue/nope")
