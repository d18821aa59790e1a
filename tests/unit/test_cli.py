"""The command line: help everywhere, and `score` end to end on the demo scorer."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from corpusfactory.cli.main import build_parser, main

COMMANDS = [
    "broker",
    "worker",
    "produce",
    "score",
    "corpus",
    "index",
    "models",
    "demo",
    "bench",
    "train",
    "evaluate",
    "snapshots",
    "build",
    "builds",
    "serve",
    "chat",
    "ingest",
    "report",
]
# Long-running components: each takes --metrics-port (docs/metrics.md).
METRICS_COMMANDS = [
    ["worker"],
    ["produce"],
    ["corpus"],
    ["train"],
    ["evaluate"],
    ["build"],
]
EVAL_ACTIONS = ["run", "compare", "metrics"]


def test_top_level_help_lists_every_command(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in COMMANDS:
        assert cmd in out


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help(cmd: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main([cmd, "--help"])
    assert exc.value.code == 0
    assert "--config" in capsys.readouterr().out


@pytest.mark.parametrize("argv", METRICS_COMMANDS)
def test_every_long_running_command_takes_a_metrics_port(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    assert "--metrics-port" in capsys.readouterr().out


@pytest.mark.parametrize("action", EVAL_ACTIONS)
def test_every_eval_action_has_help_and_the_common_options(action: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["eval", action, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out and "--state-dir" in out


def test_eval_metrics_scores_a_task_file_in_any_argument_order(tmp_path, capsys) -> None:
    src = tmp_path / "tags.jsonl"
    # IoU = |{b}| / |{a, b, c}| = 1/3; intersection over truth = over model = 1/2.
    src.write_text('{"id": 1, "prediction": ["a", "b"], "truth": ["b", "c"]}\n')
    for argv in (["eval", "metrics", "--kind", "tags", str(src)],
                 ["eval", "metrics", str(src), "--kind", "tags"]):  # fmt: skip
        assert main(argv) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["n"] == 1 and out["iou"] == pytest.approx(1 / 3)
        assert out["intersection_over_truth"] == 0.5


def test_snapshots_on_an_empty_state_and_a_missing_id(tmp_path, capsys) -> None:
    state = str(tmp_path / "state")
    assert main(["snapshots", "list", "--json", "--state-dir", state]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["snapshots", "show", "snap-00009-20260101T000000Z", "--state-dir", state]) == 2
    assert "no complete snapshot" in capsys.readouterr().err
    assert main(["eval", "compare", "--json", "--state-dir", state]) == 0
    (base,) = json.loads(capsys.readouterr().out)
    assert base["model"].startswith("base") and base["squad_it_f1"] is None


def test_bad_settings_exit_with_every_problem(tmp_path, capsys) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("admission:\n  similarity_threshold: 2\nproducer:\n  backend: nope\n")
    assert main(["index", "stats", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "2 problem(s)" in err
    assert "admission.similarity_threshold" in err and "producer.backend" in err


def test_export_needs_out(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["corpus", "export"])
    assert exc.value.code == 2
    assert "--out" in capsys.readouterr().err


def test_worker_role_is_required() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker"])


def test_score_json_one_result_per_line(tmp_path, demo_models) -> None:
    texts = ["Il gatto dorme sul divano.", "divano sul dorme gatto Il.", "   "]
    src = tmp_path / "in.txt"
    src.write_text("\n".join(texts) + "\n", encoding="utf-8")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "corpusfactory",
            "--log-level",
            "WARNING",
            "score",
            "--model",
            str(demo_models.scorer),
            "--file",
            str(src),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["text"] for r in rows] == texts
    assert all(set(r) >= {"text", "nll", "tokens"} for r in rows)
    assert rows[0]["tokens"] > 0 and rows[0]["nll"] > 0
    assert rows[2]["tokens"] == 0 and rows[2]["nll"] is None
    from corpusfactory.engines.scoring.nll import MLMScorer

    direct = MLMScorer(str(demo_models.scorer)).score(texts[:1])[0]
    assert rows[0]["nll"] == pytest.approx(direct.nll, rel=1e-5)
