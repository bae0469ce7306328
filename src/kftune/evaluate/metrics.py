"""Task metrics computed from predictions; plain Python so they are easy to check by hand."""

from __future__ import annotations

import math


def confusion_matrix(labels: list[int], predictions: list[int], num_labels: int) -> list[list[int]]:
    """matrix[true][predicted] counts."""
    matrix = [[0] * num_labels for _ in range(num_labels)]
    for truth, guess in zip(labels, predictions):
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
