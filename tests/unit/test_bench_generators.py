"""``corpusfactory bench generators`` on the real Gemma 3 270M GGUF, with small numbers:
the shape of its JSON, that the rounds extend each conversation, and that bad
arguments are refused before any model loads (no timing is asserted).

    .venv/bin/python -m pytest -q -p no:cacheprovider tests/unit/test_bench_generators.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from corpusfactory.cli.main import build_parser
from corpusfactory.errors import UsageError
from corpusfactory.settings import load_settings
from corpusfactory.tools import bench_generators
from corpusfactory.tools.bench import bench_generators as bench_cmd

# Loads a model, runs an engine or builds files: the second tier (make test-fast skips it).
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PROFILE = ROOT / "configs" / "demo-gemma.yaml"


def positive(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_llamacpp_rounds_on_gemma_report_positive_figures() -> None:
    s = load_settings(PROFILE)
    s.producer.generation.max_new_tokens = 12
    result = bench_generators.run(s, backends=["llamacpp"], batches=[1, 2], rounds=2, threads=1)
    json.dumps(result)  # all of it is JSON

    assert result["benchmark"] == "generators"
    assert result["model"] == "gemma3-270m" and result["threads"] == 1
    assert result["generation"]["max_new_tokens"] == 12
    assert [(r["backend"], r["batch"]) for r in result["results"]] == [
        ("llamacpp", 1),
        ("llamacpp", 2),
    ]
    for r in result["results"]:
        assert r["turns"] == r["batch"] * r["rounds"] == r["batch"] * 2
        assert len(r["round_seconds"]) == 2
        for key in ("turns_per_s", "tokens_per_s", "seconds", "mean_prompt_tokens"):
            assert positive(r[key]), f"{key} = {r[key]!r}"
        # Nothing longer than the limit is counted, and some text came out.
        assert 0 < r["mean_new_tokens"] <= 12
        assert r["empty_turns"] < r["turns"]
        assert r["samples"] and all(x.startswith("[|") for x in r["samples"])
        assert r["generator"].startswith("llamacpp:")
    assert result["fastest"] in [
        {"backend": r["backend"], "batch": r["batch"]} for r in result["results"]
    ]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--backends", "llamacpp,vllm"], "choose from llamacpp"),
        (["--backends", ","], "choose from"),
        (["--batches", "0,8"], "positive sizes"),
    ],
)
def test_bad_arguments_are_refused_before_loading(flags: list[str], message: str) -> None:
    args = build_parser().parse_args(["bench", "generators", "--config", str(PROFILE), *flags])
    with pytest.raises(UsageError, match=message):
        bench_cmd(args)
