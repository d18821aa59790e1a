"""How snapshots are evaluated, and the SQuAD-it copy shipped with the package."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from corpusfactory.settings.base import _Section

# Data shipped inside the package, in corpusfactory/data (see its README for source and licence).
SQUAD_IT_SHIPPED = (
    Path(__file__).resolve().parents[1] / "data" / "squad-it" / "SQuAD_it-test.json.gz"
)


class EvalitaFiles(_Section):
    train: str
    test: str


class EvaluationSettings(_Section):
    """How snapshots are evaluated (method.md §6)."""

    # pydantic copies a mutable default for each instance.
    tasks: list[
        Literal["squad_it", "ami2020", "ironita2018", "sentipolc2014", "heldout", "generation_nll"]
    ] = ["heldout", "generation_nll"]  # noqa: RUF012
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
