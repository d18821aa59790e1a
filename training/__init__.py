"""Fine-tuning snapshots (``service``: the trainer, ``window``: what it trains on next,
``launch``: the job and child process of a run, ``fit``: one DeepSpeed run, ``data``,
``snapshots``) and their evaluation (``evaluation``). Imports the kernel only; the
stream code never.
"""
