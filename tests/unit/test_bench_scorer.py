"""``corpusfactory bench scorer`` on the tiny demo scorer with small numbers: the shape of
its JSON, the NLL agreement of the plain ways with the batched scorer, and the decision
flips it counts (no timing is asserted).

    .venv/bin/python -m pytest -q -p no:cacheprovider tests/unit/test_bench_scorer.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from corpusfactory.cli.main import build_parser
from corpusfactory.tools.bench_scorer import bench_scorer

# Loads a model, runs an engine or builds files: the second tier (make test-fast skips it).
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def positive(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_every_precision_is_timed_against_its_peak_and_decisions_are_compared(
    tmp_path: Path,
) -> None:
    export = tmp_path / "corpus.jsonl"
    turns = [{"text": "Ciao, come stai oggi?"}, {"text": "Bene, grazie mille."}]
    export.write_text(json.dumps({"conversation_id": "c", "turns": turns}) + "\n")
    args = build_parser().parse_args(
        ["bench", "scorer", "--config", str(ROOT / "configs" / "demo.yaml"), "--messages", "12",
         "--reference", "3", "--precisions", "float32,int8,bfloat16", "--texts", str(export),
         "--seed-messages", "24"]
    )  # fmt: skip
    result = bench_scorer(args)
    json.dumps(result)
    runs = result["precisions"]
    assert set(runs) == {"float32", "int8", "bfloat16"}
    for name, run in runs.items():
        assert positive(run["peak_gflops"]), name
        if "skipped" in run:  # a precision this hardware only emulates
            assert name == "bfloat16" and "no fast bfloat16" in run["skipped"]
            continue
        assert positive(run["messages_per_s"]) and positive(run["achieved_gflops"])
        assert (
            0
            < run["fraction_of_peak"]
            == pytest.approx(run["achieved_gflops"] / run["peak_gflops"], rel=0.01)
        )
        assert run["nll_abs_diff_vs_float32"]["max"] >= 0
    assert runs["float32"]["nll_abs_diff_vs_float32"]["max"] == 0
    assert runs["float32"]["speedup_vs_float32"] == 1.0
    plain = result["float32_plain_ways"]
    assert plain["messages"] == 3
    # The batched scorer computes the definition: the same NLL up to float noise.
    assert plain["batched_max_abs_diff_vs_definition"] < 1e-3
    assert plain["minicons_max_abs_diff_vs_definition"] < 1e-3
    assert positive(plain["batched_speedup_vs_one_pass_per_copy"])
    flips = result["decision_flips"]
    assert flips["texts"] == 2 and flips["source"] == str(export)
    assert flips["float32"]["flips_vs_float32"] == 0
    assert 0 <= flips["int8"]["flips_vs_float32"] <= 2
    early = result["early_stop"]
    assert early["texts"] == 12 and 0 <= early["stopped_early"] <= early["rejected_on_nll"]
    assert positive(early["messages_per_s"]["full"]) and positive(early["speedup"])
