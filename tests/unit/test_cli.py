"""The command line: help everywhere, and `score` end to end on the demo scorer."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from corpusfactory.cli import build_parser, main

COMMANDS = ["broker", "worker", "produce", "score", "corpus", "index", "models", "demo", "bench"]


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
    from corpusfactory.scoring.nll import MLMScorer

    direct = MLMScorer(str(demo_models.scorer)).score(texts[:1])[0]
    assert rows[0]["nll"] == pytest.approx(direct.nll, rel=1e-5)
