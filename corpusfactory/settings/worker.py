"""The Faust stream workers."""

from __future__ import annotations

from pydantic import Field, model_validator

from corpusfactory.settings.base import _Section


class WorkerSettings(_Section):
    """The Faust stream workers."""

    app_id: str = "corpusfactory"
    web_port: int = Field(0, ge=0, le=65535, description="Faust web port (0 = pick a free one).")
    topic_partitions_scored: int = Field(
        1, ge=1, le=1, description="turns.scored has one partition: the single admission writer."
    )
    session_timeout_s: float = Field(
        10.0,
        ge=6.0,
        le=300.0,
        description="A worker killed without leaving its group loses its partitions after this.",
    )
    heartbeat_interval_s: float = Field(2.0, gt=0.0, le=60.0)
    torch_threads: int = Field(
        0,
        ge=0,
        description="torch's CPU threads in each worker process (scorer, admitter); 0: "
        "torch's default, every core. Workers and the producer share the cores.",
    )
    shutdown_timeout_s: float = Field(
        10.0,
        gt=0.0,
        description="After SIGTERM a worker that has not stopped by then exits anyway.",
    )

    @model_validator(mode="after")
    def _heartbeat_within_session(self) -> WorkerSettings:
        if self.heartbeat_interval_s * 3 > self.session_timeout_s:
            raise ValueError(
                "heartbeat_interval_s must be at most a third of session_timeout_s "
                f"({self.heartbeat_interval_s} * 3 > {self.session_timeout_s})"
            )
        return self
