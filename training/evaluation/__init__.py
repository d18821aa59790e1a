"""Evaluation of fine-tuned snapshots: the metrics and, later, the evaluator that uses them."""
