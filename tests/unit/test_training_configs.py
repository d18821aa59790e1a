"""Every shipped training configuration resolves, and DeepSpeed's own parser accepts it."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from corpusfactory.errors import ConfigError
from corpusfactory.settings import (
    SQUAD_IT_SHIPPED,
    EvaluationSettings,
    TrainingSettings,
    load_settings,
)
from training import dsconfig

EVALITA_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "evalita"

ROOT = Path(__file__).resolve().parents[2]
PROFILES = sorted((ROOT / "configs").glob("*.yaml"))
DS_FILES = sorted((ROOT / "configs" / "deepspeed").glob("*.json"))


def _settings_for(name: str, **kw: Any) -> TrainingSettings:
    if name == "cpu":
        return TrainingSettings(device="cpu", precision="fp32", **kw)
    return TrainingSettings(device="cuda", precision="bf16", **kw)


def _autos(node: Any) -> list[Any]:
    if isinstance(node, dict):
        return [x for v in node.values() for x in _autos(v)]
    if isinstance(node, list):
        return [x for v in node for x in _autos(v)]
    return [node] if node == "auto" else []


def test_the_shipped_list_matches_the_files() -> None:
    assert sorted(p.stem for p in DS_FILES) == sorted(dsconfig.SHIPPED)
    assert dsconfig.SHIPPED_DIR == ROOT / "configs" / "deepspeed"
    for name in dsconfig.SHIPPED:
        assert dsconfig.config_path(name) == dsconfig.SHIPPED_DIR / f"{name}.json"


@pytest.mark.parametrize("name", dsconfig.SHIPPED)
def test_shipped_config_resolves_without_auto(name: str) -> None:
    t = _settings_for(
        name,
        micro_batch_size=3,
        gradient_accumulation_steps=2,
        gradient_clipping=0.5,
        learning_rate=2e-5,
        weight_decay=0.01,
    )
    raw = dsconfig.load(name)
    before = copy.deepcopy(raw)
    cfg = dsconfig.resolve(raw, t)
    assert raw == before  # the input is not modified
    assert _autos(cfg) == []
    assert cfg["train_micro_batch_size_per_gpu"] == 3
    assert cfg["gradient_accumulation_steps"] == 2
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["optimizer"]["params"]["lr"] == 2e-5
    assert cfg["optimizer"]["params"]["weight_decay"] == 0.01
    assert cfg["bf16"]["enabled"] is (name != "cpu")
    assert cfg["fp16"]["enabled"] is False
    assert "scheduler" not in cfg and "train_batch_size" not in cfg
    assert dsconfig.zero_stage(cfg) == {"cpu": 1, "zero1": 1, "zero2": 2, "zero3": 3}[name]
    json.dumps(cfg)  # goes into job.json


@pytest.mark.parametrize("name", dsconfig.SHIPPED)
def test_deepspeed_accepts_the_resolved_config(name: str) -> None:
    # DeepSpeed's parser asks torch.distributed for the world size and falls back to a
    # world of one when no process group exists, as in this test process.
    from deepspeed.runtime.config import DeepSpeedConfig

    t = _settings_for(name, micro_batch_size=3, gradient_accumulation_steps=2)
    cfg = dsconfig.resolve(dsconfig.load(name), t)
    ds = DeepSpeedConfig(copy.deepcopy(cfg))
    assert ds.world_size == 1
    assert ds.train_micro_batch_size_per_gpu == 3
    assert ds.gradient_accumulation_steps == 2
    assert ds.train_batch_size == 6
    assert ds.zero_optimization_stage == dsconfig.zero_stage(cfg)
    assert ds.gradient_clipping == t.gradient_clipping
    assert ds.optimizer_name == "adamw"
    assert ds.optimizer_params["lr"] == t.learning_rate
    assert ds.bfloat16_config.enabled is (name != "cpu")
    assert ds.float16_config.enabled is False
    assert ds.scheduler_name is None


def test_deepspeed_parser_is_strict_enough_to_catch_mistakes() -> None:
    # The check above means something: the parser rejects what it does not know.
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = dsconfig.resolve(dsconfig.load("zero2"), _settings_for("zero2"))
    bad = copy.deepcopy(cfg)
    bad["zero_optimization"]["overlap_comms"] = True  # a typo
    with pytest.raises(ValueError, match="overlap_comms"):
        DeepSpeedConfig(bad)
    both = copy.deepcopy(cfg)
    both["fp16"]["enabled"] = True
    with pytest.raises(AssertionError):
        DeepSpeedConfig(both)


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_every_profile_resolves_its_deepspeed_config(path: Path) -> None:
    s = load_settings(path, environ={})
    t = s.training
    cfg = dsconfig.resolve(dsconfig.load(t.deepspeed_config), t)
    assert _autos(cfg) == []
    assert cfg["train_micro_batch_size_per_gpu"] == t.micro_batch_size
    assert cfg["bf16"]["enabled"] is (t.precision == "bf16")
    assert cfg["fp16"]["enabled"] is (t.precision == "fp16")
    from deepspeed.runtime.config import DeepSpeedConfig

    DeepSpeedConfig(cfg)


def test_profiles_exist() -> None:
    assert {p.name for p in PROFILES} >= {"demo.yaml", "paper.yaml"}


def test_fp16_fills_fp16_only() -> None:
    t = TrainingSettings(device="cuda", precision="fp16")
    cfg = dsconfig.resolve(dsconfig.load("zero1"), t)
    assert cfg["fp16"]["enabled"] is True and cfg["bf16"]["enabled"] is False


def test_resolve_reports_every_problem_at_once() -> None:
    raw = dsconfig.load("zero1")
    raw["scheduler"] = {"type": "WarmupLR", "params": {}}
    raw["train_batch_size"] = 32
    raw["activation_checkpointing"] = {"partition_activations": "auto"}
    t = TrainingSettings(device="cpu", precision="bf16")
    with pytest.raises(ConfigError) as err:
        dsconfig.resolve(raw, t)
    problems = err.value.problems
    assert len(problems) == 4, problems
    assert all(p.startswith("DeepSpeed config: ") for p in problems)
    text = "\n".join(problems)
    assert "'scheduler'" in text
    assert "'train_batch_size'" in text
    assert "activation_checkpointing.partition_activations" in text
    assert "fp32 on CPU" in text
    assert "4 problem(s)" in str(err.value)


def test_resolve_rejects_a_bad_stage_and_disabled_bf16() -> None:
    raw = dsconfig.load("cpu")  # bf16 hard-coded off
    raw["zero_optimization"]["stage"] = 4
    with pytest.raises(ConfigError) as err:
        dsconfig.resolve(raw, TrainingSettings(device="cuda", precision="bf16"))
    text = "\n".join(err.value.problems)
    assert len(err.value.problems) == 2
    assert "stage must be 0-3, got 4" in text
    assert "precision is bf16 but the config enables neither bf16 nor fp16" in text


def test_resolve_checks_fp16_and_fp32_against_the_config_and_malformed_sections() -> None:
    with pytest.raises(ConfigError, match="precision is fp16 but the config enables neither"):
        dsconfig.resolve(dsconfig.load("cpu"), TrainingSettings(device="cuda", precision="fp16"))
    forced = dsconfig.load("zero1")
    forced["bf16"] = {"enabled": True}
    with pytest.raises(ConfigError, match="precision is fp32 but the config enables bf16"):
        dsconfig.resolve(forced, TrainingSettings(device="cuda", precision="fp32"))
    with pytest.raises(ConfigError, match="'zero_optimization' must be an object"):
        dsconfig.resolve({"zero_optimization": 1}, TrainingSettings())


def test_a_config_without_zero_section_is_stage_0() -> None:
    raw = {"train_micro_batch_size_per_gpu": "auto", "optimizer": {"type": "AdamW"}}
    cfg = dsconfig.resolve(raw, TrainingSettings())
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert dsconfig.zero_stage(cfg) == 0


def test_a_users_own_config_file(tmp_path: Path) -> None:
    own = tmp_path / "mine.json"
    own.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": 2}))
    assert dsconfig.config_path(str(own)) == own
    cfg = dsconfig.resolve(dsconfig.load(str(own)), TrainingSettings(micro_batch_size=5))
    assert cfg == {"train_micro_batch_size_per_gpu": 5, "gradient_clipping": 2}


def test_load_errors_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a shipped config"):
        dsconfig.load("zero4")
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ConfigError, match=r"broken\.json"):
        dsconfig.load(str(broken))
    listed = tmp_path / "list.json"
    listed.write_text("[1]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        dsconfig.load(str(listed))


# -- evaluation settings ------------------------------------------------------------------


def _eval_problems(evaluation: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_settings(None, environ={}, overrides={"evaluation": evaluation})
    return err.value.problems


def test_squad_it_defaults_to_the_shipped_copy_and_a_named_file_must_exist(
    tmp_path: Path,
) -> None:
    s = load_settings(None, environ={}, overrides={"evaluation": {"tasks": ["squad_it"]}})
    assert s.evaluation.squad_it_path == str(SQUAD_IT_SHIPPED)
    assert SQUAD_IT_SHIPPED.is_file()
    assert (SQUAD_IT_SHIPPED.parent / "README.md").read_text().count("CC BY-SA 4.0") >= 1
    with pytest.raises(ConfigError) as err:
        load_settings(
            None,
            environ={},
            overrides={"evaluation": {"tasks": ["squad_it"], "squad_it_path": "x.json"}},
        )
    assert err.value.problems == [
        "evaluation.squad_it_path: no file at x.json (give the SQuAD-it test JSON (.json or "
        ".json.gz), leave it unset for the copy shipped with corpusfactory, or drop squad_it "
        "from evaluation.tasks)"
    ]
    mine = tmp_path / "squad.json"
    mine.write_text("{}")
    s = load_settings(
        None,
        environ={},
        overrides={"evaluation": {"tasks": ["squad_it"], "squad_it_path": str(mine)}},
    )
    assert s.evaluation.squad_it_path == str(mine)


def test_evalita_task_needs_its_files() -> None:
    problems = _eval_problems({"tasks": ["ami2020", "ironita2018", "heldout"]})
    assert len(problems) == 1
    assert "tasks ['ami2020', 'ironita2018'] need evalita.<task>.train/test" in problems[0]
    # Files for one of them are not enough.
    problems = _eval_problems(
        {
            "tasks": ["ami2020", "ironita2018"],
            "evalita": {"ami2020": {"train": "a.tsv", "test": "b.tsv"}},
        }
    )
    assert "tasks ['ironita2018'] need evalita" in problems[0]
    files = {"train": "a.csv", "test": str(EVALITA_FIXTURES / "sentipolc2014_test.csv")}
    with pytest.raises(ConfigError) as err:  # every file named is checked at load time
        load_settings(
            None,
            environ={},
            overrides={
                "evaluation": {"tasks": ["sentipolc2014"], "evalita": {"sentipolc2014": files}}
            },
        )
    assert [p.split(" (")[0] for p in err.value.problems] == [
        "evaluation.evalita.sentipolc2014.train: no file at a.csv"
    ]
    files["train"] = str(EVALITA_FIXTURES / "sentipolc2014_train.csv")
    ok = load_settings(
        None,
        environ={},
        overrides={"evaluation": {"tasks": ["sentipolc2014"], "evalita": {"sentipolc2014": files}}},
    )
    assert ok.evaluation.evalita["sentipolc2014"].test == files["test"]


def test_unknown_evalita_task_is_rejected() -> None:
    problems = _eval_problems({"evalita": {"haspeede": {"train": "a", "test": "b"}}})
    assert len(problems) == 1 and "unknown evalita tasks ['haspeede']" in problems[0]
    # An unknown task name in the task list is a validation error of its own.
    problems = _eval_problems({"tasks": ["haspeede"]})
    assert any(p.startswith("evaluation.tasks") for p in problems), problems


def test_evalita_files_need_train_and_test() -> None:
    problems = _eval_problems({"evalita": {"ami2020": {"train": "a"}}})
    assert any("evaluation.evalita.ami2020.test" in p for p in problems), problems


def test_evaluation_settings_directly() -> None:
    assert EvaluationSettings(tasks=["squad_it"]).squad_it_path == str(SQUAD_IT_SHIPPED)
    assert EvaluationSettings().tasks == ["heldout", "generation_nll"]
