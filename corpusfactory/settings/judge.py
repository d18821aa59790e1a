"""The optional LLM-as-judge admission stage."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from corpusfactory.judge_prompt import JudgeLanguage, check_template, load_template
from corpusfactory.settings.base import _Section

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
