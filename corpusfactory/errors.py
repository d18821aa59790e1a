"""The exception tree of corpusfactory.

Every failure raised on purpose is one of these, with a message that says what
to do. The first cut is the one every long-running component acts on: is it
worth trying again?

::

    CorpusFactoryError
    ├── UnavailableError            transient: an engine is down, slow or unreachable.
    │   │                           Retried with back-off; nothing is acknowledged and
    │   │                           nothing is decided without its checks meanwhile.
    │   ├── BrokerUnavailableError  Kafka cannot be reached
    │   ├── IndexUnavailableError   Milvus cannot be reached or timed out
    │   └── GeneratorUnavailableError  a generator server failed after its own retries
    └── PermanentError              trying again cannot help.
        ├── InvalidError            this input can never succeed: a record goes to
        │   │                       turns.deadletter (the partition moves on), a file or
        │   │                       setting is reported in one line (exit 2).
        │   ├── ConfigError         the settings (every problem listed at once)
        │   ├── UsageError          command-line arguments that do not fit together
        │   ├── ContractError       an event that breaks the event contract
        │   │   └── ConflictError   a turn id already decided for another text
        │   ├── IndexRecordError    a record the vector index refuses
        │   ├── InputFileError      a file the user gave (seeds, corpora, task data)
        │   │   └── SeedError
        │   └── ConversionError     a snapshot no GGUF converter can build
        ├── GeneratorError          a generator refused a request or answered nonsense
        └── SetupError              this installation cannot run it (exit 3)
            ├── BrokerError         the embedded broker cannot be prepared or started
            │   └── JavaMissingError
            └── ModelError          a model cannot be loaded or run

Stage modules subclass these (``training.launch.TrainingError``,
``consumers.store.CorpusStoreError``, ``serving.backends.base.BackendError``, ...)
under the branch that says how to handle them. :func:`exit_code` maps the tree to
the command line's exit codes; :func:`is_transient` is the one test a retry loop
makes.
"""

from __future__ import annotations


class CorpusFactoryError(Exception):
    """Base class of every error raised on purpose by corpusfactory."""


# ---------------------------------------------------------------- transient


class UnavailableError(CorpusFactoryError):
    """An engine (broker, index, generator server) is down, slow or unreachable:
    the same call may succeed later. Retry with back-off; acknowledge nothing."""


class BrokerUnavailableError(UnavailableError):
    """The Kafka cluster cannot be reached."""


class IndexUnavailableError(UnavailableError):
    """The vector index (Milvus) is unreachable, restarting or timed out."""


class GeneratorUnavailableError(UnavailableError):
    """A generator server failed after its retries (down, rate-limited, timing out)."""


# ---------------------------------------------------------------- permanent


class PermanentError(CorpusFactoryError):
    """Trying the same thing again cannot help."""


class InvalidError(PermanentError):
    """This input (an event, a file, a setting, an argument) can never succeed."""


class ConfigError(InvalidError):
    """The settings are invalid. The message lists every problem at once."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid settings ({len(self.problems)} problem(s)):\n{lines}")


class UsageError(InvalidError):
    """A command was called with arguments that do not fit together."""


class ContractError(InvalidError):
    """An event does not follow the event contract (bad JSON, schema, fields, bounds)."""


class ConflictError(ContractError):
    """A turn id that was already decided arrives with another text: the contract says
    a turn id names one text, so this event is dead-lettered, never decided."""


class IndexRecordError(InvalidError):
    """The vector index refuses this record (a field over its limits, a wrong
    dimension): writing it again can never succeed."""


class InputFileError(InvalidError):
    """A file the user gave cannot be read or is not in a layout this tool reads."""


class SeedError(InputFileError):
    """A seed file could not be read or holds no usable conversation."""


class ConversionError(InvalidError):
    """A snapshot cannot be converted into a GGUF build (unsupported architecture,
    tokenizer or tensor layout)."""


class GeneratorError(PermanentError):
    """A generator backend cannot be built, refused a request or answered nonsense."""


class SetupError(PermanentError):
    """This installation cannot do it: a runtime, a file or a model is missing."""


class BrokerError(SetupError):
    """The embedded Kafka broker could not be prepared, started or reached."""


class JavaMissingError(BrokerError):
    """No Java runtime was found for the embedded broker."""


class ModelError(SetupError):
    """A model could not be loaded or run."""


EXIT_OK = 0
EXIT_INVALID = 2  # bad input: a file, a setting, an argument (argparse uses 2 as well)
EXIT_SETUP = 3  # this installation cannot run it
EXIT_UNAVAILABLE = 4  # an engine is down: try again later
EXIT_INTERRUPTED = 130


def is_transient(exc: BaseException) -> bool:
    """True for an error worth retrying later (an engine is unavailable)."""
    return isinstance(exc, UnavailableError)


def exit_code(exc: BaseException) -> int:
    """The command line's exit code for an error of the tree."""
    if isinstance(exc, UnavailableError):
        return EXIT_UNAVAILABLE
    if isinstance(exc, SetupError):
        return EXIT_SETUP
    return EXIT_INVALID
