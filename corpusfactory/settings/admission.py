"""The admission rules: similarity, quality (NLL), length and language."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from corpusfactory.settings.base import _Section


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
