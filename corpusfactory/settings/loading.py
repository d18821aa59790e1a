"""``load_settings``: defaults, a YAML profile and environment overrides, validated at once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from corpusfactory.errors import ConfigError
from corpusfactory.redact import is_secret_name, redact_text, redact_value, secret_values_in
from corpusfactory.settings.root import Settings

ENV_PREFIX = "CORPUSFACTORY_"
# CORPUSFACTORY_* variables that are not settings (read elsewhere).
NON_SETTINGS_ENV = {"CONFIG", "CACHE", "LOG", "BROKER_JVM_OPTS", "PAUSE_AT", "PAUSE_DIR"}


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
