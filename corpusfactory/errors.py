"""The exception tree of corpusfactory.

Every failure the user can act on is one of these, with a message that says
what to do. Code catches the narrowest class it can handle.
"""

from __future__ import annotations


class CorpusFactoryError(Exception):
    """Base class of every error raised on purpose by corpusfactory."""


class ConfigError(CorpusFactoryError):
    """The settings are invalid. The message lists every problem at once."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid settings ({len(self.problems)} problem(s)):\n{lines}")


class BrokerError(CorpusFactoryError):
    """The embedded Kafka broker could not be prepared, started or reached."""


class JavaMissingError(BrokerError):
    """No Java runtime was found for the embedded broker."""


class VectorIndexError(CorpusFactoryError):
    """The vector index (Milvus) failed or is unreachable."""


class ModelError(CorpusFactoryError):
    """A model could not be loaded or run."""


class ContractError(CorpusFactoryError):
    """An event does not follow the event contract (bad JSON, schema, fields)."""


class GeneratorError(CorpusFactoryError):
    """A generator backend failed after its retries."""


class SeedError(CorpusFactoryError):
    """A seed file could not be read or holds no usable conversation."""


class UsageError(CorpusFactoryError):
    """A command was called with arguments that do not fit together."""
