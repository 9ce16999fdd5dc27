import math

import pytest

from mta import metrics


def test_classification_by_hand():
    labels = ["a", "b", "c"]
    golds = ["a", "a", "b", "c"]
    preds = ["a", "b", "b", None]
    m = metrics.classification_metrics(preds, golds, labels)
    assert m["accuracy"] == pytest.approx(2 / 4)
    # per-label F1: a: p=1/1 r=1/2 -> 2/3; b: p=1/2 r=1/1 -> 2/3; c: p=0 r=0 -> 0
    assert m["f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)


def test_classification_macro_over_full_label_set():
    # A label never seen in golds or preds still counts (as F1 0), LaMP's convention.
    m = metrics.classification_metrics(["a"], ["a"], ["a", "b"])
    assert m == {"accuracy": 1.0, "f1": pytest.approx(0.5)}


def test_classification_rejects_unknown_gold():
    with pytest.raises(ValueError, match="not in the label set"):
        metrics.classification_metrics(["a"], ["z"], ["a"])


def test_rating_by_hand():
    m = metrics.rating_metrics([1.0, 4.0, 5.0], [2.0, 4.0, 3.0])
    assert m["mae"] == pytest.approx((1 + 0 + 2) / 3)
    assert m["rmse"] == pytest.approx(math.sqrt((1 + 0 + 4) / 3))


def test_rating_unparseable_is_furthest():
    # gold 4 -> worst is 1 (error 3); gold 2 -> worst is 5 (error 3)
    m = metrics.rating_metrics([None, None], [4.0, 2.0])
    assert m["mae"] == pytest.approx(3.0)


def test_generation_by_hand():
    # pred "the cat sat", gold "the cat ran": unigram overlap 2/3 both ways -> F1 2/3;
    # LCS "the cat" = 2 -> ROUGE-L F1 2/3.
    m = metrics.generation_metrics(["the cat sat"], ["the cat ran"])
    assert m["rouge1"] == pytest.approx(2 / 3)
    assert m["rougeL"] == pytest.approx(2 / 3)
    m = metrics.generation_metrics(["a b c d"], ["d c b a"])
    assert m["rouge1"] == pytest.approx(1.0)
    assert m["rougeL"] == pytest.approx(1 / 4)


def test_generation_empty_prediction_scores_zero():
    assert metrics.generation_metrics([None], ["a title"]) == {"rouge1": 0.0, "rougeL": 0.0}


def test_length_mismatch_and_empty():
    with pytest.raises(ValueError, match="2 predictions but 1 golds"):
        metrics.rating_metrics([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="no examples"):
        metrics.generation_metrics([], [])


@pytest.mark.parametrize("task_name", ["lamp2", "lamp1", "lamp3", "movielens", "lamp4"])
def test_summed_statistics_give_the_metrics(task_name):
    """The bootstrap's additive statistics reproduce task.score exactly, for any subset."""
    import random

    import numpy as np

    from mta.tasks import get_task

    task = get_task(task_name)
    rng = random.Random(1)
    if task.kind == "classification":
        golds = [rng.choice(task.labels) for _ in range(40)]
        preds = [rng.choice([*task.labels[:3], None]) if rng.random() < 0.6 else g for g in golds]
    elif task.kind == "rating":
        golds = [str(rng.randint(1, 5)) for _ in range(40)]
        preds = [rng.choice([1.0, 2.0, 3.0, 4.0, 5.0, None]) for _ in golds]
    else:
        words = "council budget vote city storm river school road".split()
        golds = [" ".join(rng.sample(words, 4)) for _ in range(40)]
        preds = [" ".join(rng.sample(words, 3)) if rng.random() < 0.9 else None for _ in golds]
    for sub in (range(40), range(0, 40, 3), [5, 5, 9, 9, 9]):
        p, g = [preds[i] for i in sub], [golds[i] for i in sub]
        summed = np.sum([task.query_stats(a, b) for a, b in zip(p, g)], axis=0)
        want = task.score(p, g)
        got = task.metrics_from_stats(summed)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], abs=1e-12), k
