"""``Settings``: every section in one object, validated up front."""

from __future__ import annotations

from pathlib import Path

from corpusfactory.settings.admission import AdmissionSettings
from corpusfactory.settings.base import _Section
from corpusfactory.settings.evaluation import EvaluationSettings
from corpusfactory.settings.index import IndexSettings, MilvusSettings
from corpusfactory.settings.judge import JudgeSettings
from corpusfactory.settings.kafka import KafkaSettings
from corpusfactory.settings.metrics import MetricsSettings
from corpusfactory.settings.models import ModelSettings
from corpusfactory.settings.producer import ProducerSettings
from corpusfactory.settings.serving import ServingSettings
from corpusfactory.settings.training import TrainingSettings
from corpusfactory.settings.worker import WorkerSettings


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
    training: TrainingSettings = TrainingSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    serving: ServingSettings = ServingSettings()
    judge: JudgeSettings = JudgeSettings()
    metrics: MetricsSettings = MetricsSettings()

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir).expanduser().resolve()

    @property
    def snapshots_path(self) -> Path:
        if self.training.snapshots_dir:
            return Path(self.training.snapshots_dir).expanduser().resolve()
        return self.state_path / "snapshots"

    @property
    def builds_path(self) -> Path:
        if self.serving.builds_dir:
            return Path(self.serving.builds_dir).expanduser().resolve()
        return self.state_path / "builds"

    def topic(self, name: str) -> str:
        """The full name of a contract topic, with the configured prefix."""
        return f"{self.kafka.topic_prefix}{name}"
