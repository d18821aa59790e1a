"""``corpusfactory chat`` in a real terminal session, on a GGUF build of the demo generator."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from corpusfactory.engines.models.demo import DemoModels
from serving.gguf.convert import convert_hf_to_gguf
from serving.gguf.quantize import quantize

# Loads a model, runs an engine or builds files: the second tier (make test-fast skips it).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def q4_build(demo_models: DemoModels, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("chat-build")
    convert_hf_to_gguf(demo_models.generator, d / "F16.gguf")
    quantize(d / "F16.gguf", d / "Q4_K_M.gguf", "Q4_K_M")
    return d / "Q4_K_M.gguf"


def _chat(args: list[str], stdin: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "corpusfactory", "--log-level", "WARNING", "chat",
         "--state-dir", str(tmp_path / "state"), *args],
        input=stdin, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip


def test_chat_streams_answers_keeps_history_and_resets(q4_build: Path, tmp_path: Path) -> None:
    question = "Ciao, come stai oggi?"
    proc = _chat(
        ["--model", str(q4_build), "--temperature", "0", "--max-tokens", "24"],
        f"{question}\n/reset\n{question}\n/aiuto\n/exit\nnever read\n",
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("chatting with Q4_K_M (llama.cpp)")
    # Each prompt "> " is followed by the streamed answer on the same line.
    answers = [line[2:] for line in lines[1:] if line.startswith("> ") and "(" not in line[:4]]
    first, after_reset = answers[0], answers[1]
    assert first.strip()
    assert after_reset == first  # greedy, and /reset forgot the first exchange
    assert "(conversation reset)" in proc.stdout
    assert "unknown command /aiuto" in proc.stdout
    assert "never read" not in proc.stdout


def test_chat_without_a_build_says_what_to_do(tmp_path: Path) -> None:
    proc = _chat([], "", tmp_path)
    assert proc.returncode == 2
    assert "no published Q4_K_M build" in proc.stderr and "corpusfactory build" in proc.stderr
