"""corpusfactory: the shared kernel of the factory, with its engines and its roof.

Three layers live in this package; the stages (``streams``, ``producers``,
``consumers``, ``training``, ``serving``, ``monitoring``) sit between the second and
the third:

* **the kernel**, the modules directly in this package, imported by every stage and
  importing none: the event contract (``contract``, with the one ``Reason`` enum),
  ``settings``, ``errors``, the chat format (``chatformat``), the seed set (``seeds``),
  cache paths and build locks (``cache``), atomic file I/O (``atomicio``), Kafka
  client settings and topic setup (``kafka_clients``), Prometheus metrics
  (``metrics``), secret redaction (``redact``), failure records (``failures``), the
  fault-injection pause points (``faults``) and the judge's prompt templates
  (``judge_prompt``);
* **``engines``**: the wrappers of external engines (embedder, Milvus index, masked-LM
  scorer, language check, embedded Kafka broker, the models the project builds);
  they import the kernel only;
* **the roof**, which nothing else imports: ``cli`` (the command line) and ``tools``
  (demo, benchmarks, process stack, run report).

``make check`` runs import-linter with the contracts in ``pyproject.toml``
(``[tool.importlinter]``): the kernel and the engines import no stage, no stage
imports the roof, training imports no stream code, and no package has an import
cycle among its modules.
"""
