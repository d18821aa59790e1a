"""``corpusfactory bench serve`` on the demo generator with small numbers: the shape of
its JSON and that every figure is a positive number (no timing is asserted).

    .venv/bin/python -m pytest -q -p no:cacheprovider tests/unit/test_bench_serve.py
"""

from __future__ import annotations

import json
import math

import pytest

from corpusfactory.cli.main import build_parser
from corpusfactory.engines.models.demo import DemoModels
from corpusfactory.errors import ModelError
from corpusfactory.tools.bench_machine import memory_bandwidth_gbs
from corpusfactory.tools.bench_serve import bench_serve

# Loads a model, runs an engine or builds files: the second tier (make test-fast skips it).
pytestmark = pytest.mark.slow

FIGURES = {
    "prompt_tokens_per_s",
    "decode_tokens_per_s",
    "weight_bytes_per_token",
    "bound_decode_tokens_per_s",
    "fraction_of_bound",
}
GGUF_FIGURES = {"file_bytes", "tensor_data_bytes", "build_s"}
SMALL = ["bench", "serve", "--prompt-tokens", "32", "--decode-tokens", "16", "--repeats", "1"]
SMALL += ["--quants", "f16,Q8_0"]


def positive(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_bench_serve_reports_every_build_with_positive_figures(demo_models: DemoModels) -> None:
    args = build_parser().parse_args([*SMALL, "--model", str(demo_models.generator)])
    result = bench_serve(args)
    json.dumps(result)  # all of it is JSON

    assert result["benchmark"] == "serve"
    assert result["model_dir"] == str(demo_models.generator)
    assert (result["prompt_tokens"], result["decode_tokens"], result["repeats"]) == (32, 16, 1)
    for key in ("parameters", "n_threads", "memory_bandwidth_gb_s"):
        assert positive(result[key]), key
    assert {"cpus", "torch_threads", "processor", "python", "torch"} <= set(result["machine"])
    builds = result["builds"]
    assert list(builds) == ["transformers F32", "llama.cpp F16", "llama.cpp Q8_0"]

    bandwidth = result["memory_bandwidth_gb_s"] * 1e9
    for name, build in builds.items():
        engine, precision = name.split(" ")
        assert build["engine"] == engine and build["precision"] == precision
        figures = FIGURES | (GGUF_FIGURES if engine == "llama.cpp" else set())
        assert set(build) == figures | {"engine", "precision"}, name
        for key in figures:
            assert positive(build[key]), f"{name}: {key} = {build[key]!r}"
        # The bound and the fraction are what they say (both rounded to 4 figures).
        bound = bandwidth / build["weight_bytes_per_token"]
        assert build["bound_decode_tokens_per_s"] == pytest.approx(bound, rel=1e-3)
        fraction = build["decode_tokens_per_s"] / build["bound_decode_tokens_per_s"]
        assert build["fraction_of_bound"] == pytest.approx(fraction, rel=2e-3)

    f32, f16, q8 = builds.values()
    # The demo's embedding is tied: a decode step reads every tensor of the file once.
    assert f16["weight_bytes_per_token"] == f16["tensor_data_bytes"] < f16["file_bytes"]
    assert q8["tensor_data_bytes"] < f16["tensor_data_bytes"] < f32["weight_bytes_per_token"]
    assert f32["weight_bytes_per_token"] == 4 * result["parameters"]


def test_bench_serve_refuses_an_unknown_quant_before_building() -> None:
    args = build_parser().parse_args(["bench", "serve", "--quants", "F16,Q9_9"])
    with pytest.raises(ModelError, match="Q9_9"):
        bench_serve(args)


def test_memory_bandwidth_is_positive() -> None:
    assert positive(memory_bandwidth_gbs(mib=16, reps=2, threads=2))
