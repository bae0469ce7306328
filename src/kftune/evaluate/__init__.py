"""Evaluation: metrics for the tuned and the base model, and the HTML report."""
