"""corpusfactory: the shared kernel of the factory, and (for now) its tools.

The kernel, imported by every stage: the event contract (``contract``), settings,
errors, the chat format, the cache (``cache``), model names (``models.registry``, no
torch), Kafka helpers (``kafka_clients``), atomic file I/O (``atomicio``), metrics.
Engine wrappers: the embedder, the Milvus index, the MLM scorer (``scoring``), the
language check. Tools on top, which only the CLI imports: ``cli*``, ``demo``,
``bench*``, ``stack``, the embedded ``broker``, ``faults``, ``report*``.

Not yet layered as it should be (issue 12): ``judge`` imports the producer's
generators, ``ingest`` the producer's conversation state, and ``report*`` the
corpus store and training's comparison table.
"""
