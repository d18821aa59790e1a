"""Self-chat producers: they write conversation turns as candidate events, apply the
decisions that come back, and publish finished conversations (``service``), all
through one Kafka channel shared with ingest (``channel``), with
their state on disk (``state``, ``conversation``) and the generator backends
(``generators``); ``ingest`` refines and publishes an existing chat corpus through
the same topics. Imports the kernel and the engines, no other stage, never the CLI
or the tools.
"""
