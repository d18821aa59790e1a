"""Evaluation of the base model and every snapshot: SQuAD-it, EVALITA-style tasks,
held-out perplexity and the MLM-NLL of generations (``runner``, ``service``), and
the comparison table (``compare``)."""
