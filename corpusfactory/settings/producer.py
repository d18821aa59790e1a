"""The self-chat producers and their sampling parameters."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from corpusfactory.settings.base import _Section


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
