"""Typed settings for every corpusfactory service.

Settings come from, in increasing priority: the defaults of the section models, a
YAML profile (``--config FILE`` or ``CORPUSFACTORY_CONFIG``), and environment variables
(``CORPUSFACTORY_<SECTION>__<FIELD>``, e.g. ``CORPUSFACTORY_ADMISSION__NLL_THRESHOLD=1.8``).
Two well-known variables are honoured as well: ``KAFKA_BOOTSTRAP_SERVERS`` (use an
existing cluster instead of the embedded broker) and ``MILVUS_URI`` (a Milvus
server instead of Milvus Lite).

``load_settings`` validates everything at once and raises ``ConfigError`` listing
every problem, so a service never starts half-configured.

The modules: one per section (``kafka``, ``index`` (Milvus and seeding), ``models``,
``admission``, ``producer``, ``worker``, ``training``, ``evaluation``, ``judge``,
``serving``, ``metrics``), ``root`` (``Settings``, which holds them all) and
``loading`` (``load_settings``, environment overrides, ``missing_files``). Import from
``corpusfactory.settings``: every public name is re-exported here.
"""

from __future__ import annotations

from corpusfactory.settings.admission import AdmissionSettings
from corpusfactory.settings.evaluation import SQUAD_IT_SHIPPED, EvalitaFiles, EvaluationSettings
from corpusfactory.settings.index import IndexSettings, MilvusSettings
from corpusfactory.settings.judge import JudgeSettings, OnUnparsed
from corpusfactory.settings.kafka import KafkaSettings
from corpusfactory.settings.loading import (
    ENV_PREFIX,
    NON_SETTINGS_ENV,
    load_settings,
    missing_files,
)
from corpusfactory.settings.metrics import MetricsPorts, MetricsSettings
from corpusfactory.settings.models import ModelSettings
from corpusfactory.settings.producer import GenerationSettings, ProducerSettings
from corpusfactory.settings.root import Settings
from corpusfactory.settings.serving import GateBudget, ServingSettings
from corpusfactory.settings.training import LoraSettings, TrainingSettings, TriggerSettings
from corpusfactory.settings.worker import WorkerSettings

__all__ = [
    "ENV_PREFIX",
    "NON_SETTINGS_ENV",
    "SQUAD_IT_SHIPPED",
    "AdmissionSettings",
    "EvalitaFiles",
    "EvaluationSettings",
    "GateBudget",
    "GenerationSettings",
    "IndexSettings",
    "JudgeSettings",
    "KafkaSettings",
    "LoraSettings",
    "MetricsPorts",
    "MetricsSettings",
    "MilvusSettings",
    "ModelSettings",
    "OnUnparsed",
    "ProducerSettings",
    "ServingSettings",
    "Settings",
    "TrainingSettings",
    "TriggerSettings",
    "WorkerSettings",
    "load_settings",
    "missing_files",
]
