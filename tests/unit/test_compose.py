"""docker-compose.yml, read statically (no Docker here): the services of the stack,
GPU reservations, health checks, scalable scorers, commands that the corpusfactory
CLI accepts, environments that the settings accept, and mounts that exist."""

from __future__ import annotations

import argparse
import re
from typing import Any

import pytest
import yaml

from corpusfactory.cli.main import build_parser
from corpusfactory.settings import load_settings
from tests.monitoring_util import REPO

COMPOSE = REPO / "docker-compose.yml"
PROJECT = ["producer", "worker", "admitter", "writer", "trainer", "evaluator", "builder", "server"]
INFRA = ["kafka", "etcd", "minio", "milvus", "prometheus", "grafana", "vllm"]
METRICS_PORTS = {
    "worker": 9401,
    "admitter": 9402,
    "producer": 9403,
    "writer": 9404,
    "trainer": 9405,
    "evaluator": 9406,
    "builder": 9407,
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def interpolate(value: str) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}, with unset variables."""
    return re.sub(
        r"\$\{(\w+)(?::?([-?])([^}]*))?\}",
        lambda m: m.group(3) if m.group(2) == "-" else f"<{m.group(1)}>",
        value,
    )


def test_every_service_is_there(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == set(PROJECT) | set(INFRA)
    for name, service in services.items():
        assert service.get("image") or service.get("build"), name
    assert services["kafka"]["image"] == "apache/kafka:3.9.1"
    assert services["milvus"]["image"].startswith("milvusdb/milvus:v2.4.")
    assert services["milvus"]["command"] == ["milvus", "run", "standalone"]
    assert services["vllm"]["image"].startswith("vllm/vllm-openai:")


def test_project_services_share_one_built_image(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    common = compose["x-corpusfactory"]
    assert common["build"]["context"] == "."
    assert (REPO / "Dockerfile").is_file() and (REPO / ".dockerignore").is_file()
    dockerfile = (REPO / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["corpusfactory"]' in dockerfile
    assert "pip install --no-cache-dir -r requirements.lock" in dockerfile
    for name in PROJECT:
        assert services[name]["image"] == common["image"], name
        assert "data:/data" in services[name]["volumes"], name


def _gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def test_gpu_reservations(services: dict[str, dict[str, Any]]) -> None:
    gpu = {name for name, s in services.items() if _gpu_devices(s)}
    assert gpu == {"vllm", "trainer", "evaluator"}
    for name in gpu:
        (device,) = _gpu_devices(services[name])
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name


def test_healthchecks_and_dependencies(services: dict[str, dict[str, Any]]) -> None:
    for name in ["kafka", "milvus", "server", "prometheus", *METRICS_PORTS]:
        assert services[name]["healthcheck"]["test"], name
    assert "9091/healthz" in " ".join(services["milvus"]["healthcheck"]["test"])
    assert "/health'" in " ".join(services["server"]["healthcheck"]["test"])
    for name, port in METRICS_PORTS.items():
        test = " ".join(services[name]["healthcheck"]["test"])
        assert f"http://127.0.0.1:{port}/metrics" in test, name
    # A dependency on a service with a health check waits for it to be healthy.
    for name, service in services.items():
        for dep, how in (service.get("depends_on") or {}).items():
            assert dep in services, (name, dep)
            if "healthcheck" in services[dep]:
                assert how["condition"] == "service_healthy", (name, dep)
    assert "kafka" in services["worker"]["depends_on"]
    assert "milvus" in services["admitter"]["depends_on"]
    assert "vllm" in services["producer"]["depends_on"]


def test_ports(services: dict[str, dict[str, Any]]) -> None:
    assert "3000:3000" in services["grafana"]["ports"]
    assert "9090:9090" in services["prometheus"]["ports"]
    assert "8000:8000" in services["server"]["ports"]


def test_scorers_scale(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    assert worker["command"] == ["worker", "--role", "scorer"]
    assert "container_name" not in worker
    assert "ports" not in worker  # a fixed host port would clash between replicas
    assert not any("container_name" in s for s in services.values())


def test_volumes_are_declared(compose: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    used = set()
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in declared, (name, source)
                used.add(source)
    assert used == declared


def test_monitoring_mounts_exist(services: dict[str, dict[str, Any]]) -> None:
    mounts = {
        v.split(":")[0]: v.split(":")[1]
        for name in ("prometheus", "grafana")
        for v in services[name]["volumes"]
        if v.startswith(".")
    }
    assert mounts == {
        "./monitoring/prometheus/prometheus.yml": "/etc/prometheus/prometheus.yml",
        "./monitoring/prometheus/alerts.yml": "/etc/prometheus/alerts.yml",
        "./monitoring/grafana/provisioning": "/etc/grafana/provisioning",
        "./monitoring/grafana/dashboards": "/var/lib/grafana/dashboards",
    }
    for source in mounts:
        assert (REPO / source).exists(), source
    # The server job's credentials file is the API key, given as a secret.
    (secret,) = services["prometheus"]["secrets"]
    assert secret["target"] == "/etc/prometheus/api_key"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]


def _subcommands(parser: argparse.ArgumentParser) -> set[str]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


def test_commands_are_corpusfactory_subcommands(services: dict[str, dict[str, Any]]) -> None:
    parser = build_parser()
    assert {"produce", "worker", "corpus", "train", "evaluate", "build", "serve"} <= _subcommands(
        parser
    )
    for name in PROJECT:
        command = services[name]["command"]
        assert command[0] in _subcommands(parser), name
        args = parser.parse_args(command)  # the whole command line, options included
        assert args.command == command[0], name


def _environment(service: dict[str, Any]) -> dict[str, str]:
    return {k: interpolate(str(v)) for k, v in service["environment"].items()}


def test_environment_is_valid_settings(services: dict[str, dict[str, Any]]) -> None:
    for name in PROJECT:
        env = _environment(services[name])
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
        assert env["CORPUSFACTORY_METRICS__HOST"] == "0.0.0.0"
        settings = load_settings(environ=env)  # unknown or invalid settings raise
        assert settings.state_dir == "/data"
        assert settings.milvus.uri == "http://milvus:19530"
        assert settings.producer.backend == "openai"
        assert settings.producer.openai_base_url == "http://vllm:8000/v1"
        assert settings.serving.api_key == "<SERVING_API_KEY>"
    assert load_settings(environ=_environment(services["server"])).serving.host == "0.0.0.0"
    assert load_settings(environ=_environment(services["trainer"])).training.device == "cuda"
    assert load_settings(environ=_environment(services["evaluator"])).evaluation.device == "cuda"


def test_interpolate() -> None:
    assert interpolate("${A:-x y}/${B:?set B}/${C}") == "x y/<B>/<C>"


def test_prometheus_targets_match_compose(services: dict[str, dict[str, Any]]) -> None:
    config = yaml.safe_load((REPO / "monitoring/prometheus/prometheus.yml").read_text())
    hosts = set()
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            hosts |= {t.split(":")[0] for t in static["targets"]}
        for sd in job.get("dns_sd_configs", []):
            hosts |= set(sd["names"])
    assert hosts == set(PROJECT)
    assert hosts <= set(services)


def test_compose_file_paths(compose: dict[str, Any]) -> None:
    # Bind-mounted sources are relative to the compose file: nothing outside the repo.
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            if volume.startswith("."):
                assert (REPO / volume.split(":")[0]).resolve().is_relative_to(REPO)
