"""GGUF builds, their quality gate budgets, and the OpenAI-compatible server."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from corpusfactory.settings.base import _Section


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
