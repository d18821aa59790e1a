"""Fine-tuning snapshots (``service``: the trainer, ``fit``: one DeepSpeed run, ``data``,
``snapshots``) and their evaluation (``evaluation``). Imports the kernel only; the
stream code never.
"""
