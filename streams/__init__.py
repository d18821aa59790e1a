"""The stream workers: the scorer (``score``: embed, precheck, NLL, optional judge),
the admitter (``admit``: near-duplicate and contamination checks against Milvus, the
decision, the decision log) and the pure decision rules (``decisions``). Faust apps
(``app``). Imports the kernel; the admitter reads training's evaluation items to
decontaminate against them, and nothing else of another stage.
"""
