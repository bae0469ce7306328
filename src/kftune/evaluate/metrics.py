"""Task metrics computed from predictions; plain Python so they are easy to check by hand."""

from __future__ import annotations

import math


def confusion_matrix(labels: list[int], predictions: list[int], num_labels: int) -> list[list[int]]:
    """matrix[true][predicted] counts."""
    matrix = [[0] * num_labels for _ in range(num_labels)]
    for truth, guess in zip(labels, predictions, strict=False):
        matrix[truth][guess] += 1
    return matrix


def accuracy(matrix: list[list[int]]) -> float:
    total = sum(map(sum, matrix))
    return sum(matrix[i][i] for i in range(len(matrix))) / total if total else 0.0


def macro_f1(matrix: list[list[int]]) -> float:
    scores = []
    for i in range(len(matrix)):
        true_positive = matrix[i][i]
        predicted = sum(row[i] for row in matrix)
        actual = sum(matrix[i])
        denominator = predicted + actual
        scores.append(2 * true_positive / denominator if denominator else 0.0)
    return sum(scores) / len(scores)


def perplexity(total_loss: float, total_tokens: int) -> float:
    return math.exp(total_loss / total_tokens) if total_tokens else float("inf")


HIGHER_IS_BETTER = {"accuracy": True, "macro_f1": True, "perplexity": False}


def normalize(text: str) -> str:
    """Lowercase, collapse whitespace: what exact match compares."""
    return " ".join(text.lower().split())


def exact_match(predictions: list[str], references: list[str]) -> float:
    return (
        sum(normalize(p) == normalize(r) for p, r in zip(predictions, references, strict=False)) / len(references)
        if references
        else 0.0
    )


def _lcs(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 over whitespace tokens (Lin 2004)."""
    scores = []
    for prediction, reference in zip(predictions, references, strict=False):
        p, r = normalize(prediction).split(), normalize(reference).split()
        common = _lcs(p, r)
        scores.append(0.0 if not common else 2 * common / (len(p) + len(r)))
    return sum(scores) / len(scores) if scores else 0.0


def bleu(predictions: list[str], references: list[str], max_n: int = 4) -> float:
    """Corpus BLEU-4 with brevity penalty and add-one smoothing for n > 1 (Lin & Och 2004)."""
    from collections import Counter

    matches, totals = [0] * max_n, [0] * max_n
    predicted_length = reference_length = 0
    for prediction, reference in zip(predictions, references, strict=False):
        p, r = normalize(prediction).split(), normalize(reference).split()
        predicted_length, reference_length = predicted_length + len(p), reference_length + len(r)
        for n in range(1, max_n + 1):
            grams_p = Counter(tuple(p[i : i + n]) for i in range(len(p) - n + 1))
            grams_r = Counter(tuple(r[i : i + n]) for i in range(len(r) - n + 1))
            matches[n - 1] += sum(min(count, grams_r[g]) for g, count in grams_p.items())
            totals[n - 1] += max(len(p) - n + 1, 0)
    if not predicted_length or not matches[0]:
        return 0.0
    log_precision = sum(math.log((matches[i] + (i > 0)) / (totals[i] + (i > 0))) for i in range(max_n)) / max_n
    brevity = 1.0 if predicted_length > reference_length else math.exp(1 - reference_length / predicted_length)
    return brevity * math.exp(log_precision)


HIGHER_IS_BETTER.update({"exact_match": True, "rouge_l": True, "bleu": True})
