"""The stream workers: the scorer (``score``: embed, precheck, NLL, optional judge),
the optional LLM judge (``judge``), the admitter (``admit``: near-duplicate and
contamination checks against Milvus, the decision, the decision log) and the pure
decision rules (``decisions``). Faust apps (``app``). Imports the kernel and the
engines; the admitter reads training's evaluation items to decontaminate against
them and the judge generates through the producers' generator backends; nothing
else of another stage, never the CLI or the tools.
"""
