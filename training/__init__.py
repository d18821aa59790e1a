"""Fine-tuning snapshots and their evaluation (issue 3)."""
