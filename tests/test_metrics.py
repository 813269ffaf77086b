"""fastdistil.metrics against scikit-learn's and scipy's reference implementations, and SQuAD's against the
official evaluation scripts' definitions on hand-made cases."""

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


def test_the_task_table_covers_glue_imdb_wiki_topic_and_squad():
    glue = {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}
    assert set(tasks.TASKS) == {f"glue/{t}" for t in glue} | {"imdb", "wiki-topic", "squad", "squad_v2"}
    assert tasks.get_task("glue/cola").metrics == ("matthews_corrcoef",)
    assert tasks.get_task("glue/stsb").is_regression
    squad, squad_v2 = tasks.get_task("squad"), tasks.get_task("squad_v2")
    assert squad.is_qa and squad_v2.is_qa and not tasks.get_task("imdb").is_qa
    assert (squad.no_answer, squad_v2.no_answer) == (False, True)
    assert squad.metrics == squad_v2.metrics == ("exact_match", "squad_f1")
    assert squad.outputs == (("start_logits", "start_positions"), ("end_logits", "end_positions"))
    with pytest.raises(ValueError, match=r"unknown task 'glue/nope'.*wiki-topic.*imdb.*glue/sst2"):
        tasks.get_task("glue/nope")


@pytest.mark.parametrize("text, normalized", [
    ("The Eiffel Tower", "eiffel tower"),  # lowercase, the article gone
    ("  an apple,  a pie and THE  end. ", "apple pie and end"),  # punctuation, articles, whitespace
    ("theater (in Anaheim)", "theater in anaheim"),  # "the" only as a word
    ("A", ""),
    ("1,200-years", "1200years"),  # punctuation removed, not replaced by a space
    ("\u00c9cole", "\u00e9cole"),  # lowercase beyond ASCII; accents kept
])
def test_answers_are_normalized_as_the_official_script_does(text, normalized):
    assert metrics.normalize_answer(text) == normalized


def test_exact_match_and_f1_take_the_best_gold_answer():
    # gold "the big red dog" -> [big, red, dog]; "red dog barked": 2 shared, precision = recall = 2/3.
    assert metrics.answer_f1("the big red dog", "red dog barked") == pytest.approx(2 / 3)
    assert metrics.answer_exact("The big red dog.", "big red dog") == 1.0
    # Tokens are a bag: "dog" once against "dog dog cat" shares one token, precision 1, recall 1/3.
    assert metrics.answer_f1("dog dog cat", "dog") == pytest.approx(2 * (1 / 3) / (1 + 1 / 3))
    assert metrics.answer_f1("dog", "cat") == 0.0
    predictions = ["Denver Broncos", "red dog barked", "nothing alike"]
    references = [["Carolina Panthers", "the Denver Broncos"], ["the big red dog", "dog barked"], ["x", "y"]]
    # The second question's best gold is "dog barked" (F1 0.8 = 2 * 1 * 2/3 / (1 + 2/3)), not "the big red dog".
    assert metrics.exact_match(predictions, references) == pytest.approx(1 / 3)
    assert metrics.squad_f1(predictions, references) == pytest.approx((1 + 0.8 + 0) / 3)


def test_a_question_without_an_answer_wants_the_empty_answer():
    # SQuAD v2: no gold answers (or only ones that normalize to nothing) means the gold answer is "".
    references = [[], [], ["the"], ["Paris"]]
    predictions = ["", "Paris", "", ""]
    assert metrics.exact_match(predictions, references) == pytest.approx(2 / 4)
    assert metrics.squad_f1(predictions, references) == pytest.approx(2 / 4)
    assert metrics.answer_f1("", "") == 1.0 and metrics.answer_f1("Paris", "") == 0.0


def test_squad_scores_through_compute_are_their_mean():
    task = tasks.get_task("squad")
    found = metrics.compute(task, {"validation": ["Denver Broncos", "blue"]},
                            {"validation": [["Denver Broncos"], ["red dog", "a blue dog"]]})
    assert found["metrics"] == {"exact_match": 0.5, "squad_f1": pytest.approx((1 + 2 / 3) / 2)}
    assert found["score"] == pytest.approx((0.5 + (1 + 2 / 3) / 2) / 2)
    with pytest.raises(ValueError, match="predictions and references must be as many, got 1 and 2"):
        metrics.exact_match(["a"], [["a"], ["b"]])
