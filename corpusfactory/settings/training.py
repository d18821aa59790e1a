"""Fine-tuning snapshots: what to train, how, and when (the trigger, LoRA)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from corpusfactory.settings.base import _Section


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
    # pydantic copies a mutable default for each instance.
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]  # noqa: RUF012


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
