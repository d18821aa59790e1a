"""Wrappers of the external engines: the sentence embedder, the Milvus index, the
masked-LM scorer (``scoring``), the language check, the embedded Kafka broker, and
the models the project builds or unpacks (``models``).

Imports the kernel (``corpusfactory.*`` outside ``engines``, ``cli`` and ``tools``)
and third-party engines only; no stage, no CLI, no tool (``make check``).

The embedded broker lives here, not among the tools: any component started without
a configured cluster starts or joins it through ``resolve_bootstrap``. The model
builders live here for the same reason: a stage that names ``demo:scorer`` builds it
on first use.
"""
