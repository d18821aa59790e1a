"""Kafka settings: where the broker is, how topics are named, how clients authenticate."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from corpusfactory.settings.base import _Section


class KafkaSettings(_Section):
    """Where the broker is and how topics are named."""

    bootstrap_servers: str | None = Field(
        None, description="host:port[,host:port]; unset means the embedded broker."
    )
    topic_prefix: str = Field("", description="Prepended to every topic name.")
    partitions: int = Field(4, ge=1, description="Partitions of turns.candidates/decisions.")
    replication_factor: int | None = Field(
        None,
        ge=1,
        description="Replicas of each topic ensure_topics creates; unset: min(3, brokers).",
    )
    min_insync_replicas: int | None = Field(
        None,
        ge=1,
        description="min.insync.replicas of those topics; unset: a majority of the replicas.",
    )
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

    @model_validator(mode="after")
    def _isr_fits(self) -> KafkaSettings:
        rf, isr = self.replication_factor, self.min_insync_replicas
        if rf is not None and isr is not None and isr > rf:
            raise ValueError(
                f"min_insync_replicas ({isr}) exceeds replication_factor ({rf}): "
                "no write could ever be acknowledged"
            )
        return self
