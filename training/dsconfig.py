"""DeepSpeed configurations: the shipped ones, and how ``"auto"`` values are filled.

Shipped under ``configs/deepspeed/``: ``cpu`` (ZeRO-1, fp32, torch AdamW: what runs on a
machine without GPUs, gloo backend), ``zero1`` (the paper's setup, method.md §5),
``zero2`` and ``zero3`` (larger models; ZeRO-3 gathers the 16-bit weights on save).
``training.deepspeed_config`` names one of them or a JSON file of the user's own.

Values set to ``"auto"`` come from the training settings, so the hyper-parameters live
in one place: the micro-batch size, gradient accumulation, gradient clipping, the
optimizer's learning rate and weight decay, and ``bf16``/``fp16.enabled`` from
``training.precision``. The learning-rate schedule is the trainer's own (warm-up, then
cosine, linear or constant), so a config may not declare a ``scheduler``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from corpusfactory.errors import ConfigError
from corpusfactory.settings import TrainingSettings

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "configs" / "deepspeed"
SHIPPED = ("cpu", "zero1", "zero2", "zero3")


def config_path(name: str) -> Path:
    if name in SHIPPED:
        return SHIPPED_DIR / f"{name}.json"
    path = Path(name).expanduser()
    if not path.is_file():
        raise ConfigError(
            [f"training.deepspeed_config: {name!r} is not a shipped config {SHIPPED} or a file"]
        )
    return path


def load(name: str) -> dict[str, Any]:
    path = config_path(name)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError([f"DeepSpeed config {path}: {exc}"]) from exc
    if not isinstance(data, dict):
        raise ConfigError([f"DeepSpeed config {path}: expected a JSON object"])
    return data


def resolve(raw: dict[str, Any], t: TrainingSettings) -> dict[str, Any]:
    """Fill every ``"auto"``; raise ConfigError listing everything that is wrong."""
    cfg = copy.deepcopy(raw)
    problems: list[str] = []
    if "scheduler" in cfg:
        problems.append("the config declares a 'scheduler': the trainer sets the schedule")
    if "train_batch_size" in cfg:
        problems.append("'train_batch_size' is derived; set train_micro_batch_size_per_gpu")
    fills: dict[tuple[str, ...], Any] = {
        ("train_micro_batch_size_per_gpu",): t.micro_batch_size,
        ("gradient_accumulation_steps",): t.gradient_accumulation_steps,
        ("gradient_clipping",): t.gradient_clipping,
        ("optimizer", "params", "lr"): t.learning_rate,
        ("optimizer", "params", "weight_decay"): t.weight_decay,
        ("bf16", "enabled"): t.precision == "bf16",
        ("fp16", "enabled"): t.precision == "fp16",
    }
    for path, value in fills.items():
        node: Any = cfg
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(path[-1]) == "auto":
            node[path[-1]] = value
    left = _autos(cfg)
    if left:
        problems.append(f"'auto' is not supported for {', '.join(left)}")
    for section in ("zero_optimization", "bf16", "fp16", "optimizer"):
        if section in cfg and not isinstance(cfg[section], dict):
            problems.append(f"'{section}' must be an object, got {cfg[section]!r}")
            cfg[section] = {}
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        problems.append(f"zero_optimization.stage must be 0-3, got {stage!r}")
    if t.device == "cpu" and t.precision != "fp32":
        problems.append("training.precision must be fp32 on CPU")
    enabled = {k for k in ("bf16", "fp16") if cfg.get(k, {}).get("enabled")}
    wanted = {t.precision} & {"bf16", "fp16"}
    if enabled != wanted:
        problems.append(
            f"training.precision is {t.precision} but the config enables "
            f"{', '.join(sorted(enabled)) or 'neither bf16 nor fp16'}"
        )
    if problems:
        raise ConfigError([f"DeepSpeed config: {p}" for p in problems])
    return cfg


def _autos(node: Any, where: str = "") -> list[str]:
    if isinstance(node, dict):
        return [x for k, v in node.items() for x in _autos(v, f"{where}.{k}" if where else k)]
    return [where] if node == "auto" else []


def zero_stage(cfg: dict[str, Any]) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))
