import math

import pytest

from kftune.evaluate import metrics


def test_classification_metrics_by_hand():
    matrix = metrics.confusion_matrix([0, 0, 1, 1, 1], [0, 1, 1, 1, 0], 2)
    assert matrix == [[1, 1], [1, 2]]
    assert metrics.accuracy(matrix) == pytest.approx(3 / 5)
    assert metrics.macro_f1(matrix) == pytest.approx((2 * 1 / 4 + 2 * 2 / 6) / 2)


def test_generation_metrics_by_hand():
    assert metrics.exact_match(["The cat.", "a dog"], ["the  cat.", "a bird"]) == 0.5
    # LCS("a b c d", "a c d e") = 3 -> F1 = 2*3/(4+4)
    assert metrics.rouge_l(["a b c d"], ["a c d e"]) == pytest.approx(0.75)
    assert metrics.bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert metrics.bleu(["completely different words"], ["the cat sat on the mat"]) == 0.0
    short = metrics.bleu(["the cat"], ["the cat sat on the mat"])
    assert 0 < short < math.exp(1 - 6 / 2) + 1e-9  # brevity penalty caps it
    assert metrics.perplexity(math.log(4) * 10, 10) == pytest.approx(4.0)
