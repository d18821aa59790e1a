"""The fit child process of the trainer: the job directory ``training.fit`` reads, the
command that starts it (plain Python or the DeepSpeed launcher) and the run itself,
whose failure is a ``TrainingError``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from corpusfactory.chatformat import ChatFormat
from corpusfactory.errors import PermanentError
from corpusfactory.settings import TrainingSettings
from training.data import TrainingConversation, write_jsonl
from training.fit import JOB, PARENT_ENV, STATS


class TrainingError(PermanentError):
    """A fine-tuning run failed; its job directory is kept for inspection (until the
    next run or restart)."""


def fit_command(t: TrainingSettings, job_dir: Path) -> list[str]:
    """The command that runs ``training.fit`` on ``job_dir`` (``training.launcher``)."""
    if t.launcher == "deepspeed":
        return ["deepspeed", *t.launcher_args, "--module", "training.fit", str(job_dir)]
    return [sys.executable, "-m", "training.fit", str(job_dir)]


def write_job(
    job_dir: Path,
    snap_id: str,
    init_from: str,
    staging: Path,
    train: list[TrainingConversation],
    t: TrainingSettings,
    ds_config: dict[str, Any],
    fmt: ChatFormat,
) -> None:
    """The job directory ``training.fit`` reads: job.json and train.jsonl."""
    if job_dir.exists():
        shutil.rmtree(job_dir)
    job_dir.mkdir(parents=True)
    write_jsonl(job_dir / "train.jsonl", train)
    job = {
        "snapshot_id": snap_id,
        "init_from": init_from,
        "output_dir": str(staging),
        "data": "train.jsonl",
        "training": t.model_dump(mode="json"),
        "deepspeed": ds_config,
        "chat_format": {"user_tag": fmt.user_tag, "assistant_tag": fmt.assistant_tag},
    }
    (job_dir / JOB).write_text(json.dumps(job, indent=2), encoding="utf-8")


def run_fit(cmd: list[str], job_dir: Path, staging: Path) -> dict[str, Any]:
    """Run ``training.fit`` as a child process (it dies with us); return its stats."""
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(_torch_extensions_dir()))
    # The child dies with us (it sets that up itself: see training.fit.die_with_parent).
    env[PARENT_ENV] = str(os.getpid())
    log_path = job_dir / "fit.log"
    with log_path.open("w", encoding="utf-8") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise TrainingError(
            f"training failed with status {proc.returncode}; log: {log_path}\n{tail}"
        )
    stats_path = staging / STATS
    if not stats_path.is_file():
        raise TrainingError(f"training exited 0 but wrote no {stats_path}")
    stats: dict[str, Any] = json.loads(stats_path.read_text(encoding="utf-8"))
    return stats


def _torch_extensions_dir() -> Path:
    # DeepSpeed compiles a small CPU op on first use (about 50 s); keep it with our caches.
    root = Path(os.environ.get("CORPUSFACTORY_CACHE", "~/.cache/corpusfactory")).expanduser()
    return root / "torch_extensions"
