"""A Milvus Lite file is free for another process once this one closes its indexes.

Milvus Lite runs its server inside the process that opens the file, and that server
holds the file's lock; closing the client alone left it running, so a restarted
admitter could not open its index while a process that had read it lived on.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from corpusfactory.engines.index import KIND_TURN, VectorIndex

pytestmark = pytest.mark.slow

DIM = 8
ROOT = Path(__file__).resolve().parents[2]

# Another process opens the file and prints how many turn vectors it holds.
_OTHER = """
import sys
from corpusfactory.engines.index import KIND_TURN, VectorIndex
from corpusfactory.errors import CorpusFactoryError
try:
    index = VectorIndex(sys.argv[1], "turns", 8, timeout_s=10.0)
except CorpusFactoryError as exc:
    print("refused:", exc)
    sys.exit(3)
print(index.count(KIND_TURN))
index.close()
"""


def _other_process(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _OTHER, str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _vector(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def test_the_last_close_frees_the_file_for_another_process(tmp_path: Path) -> None:
    path = tmp_path / "index.db"
    first = VectorIndex(str(path), "turns", DIM)
    second = VectorIndex(str(path), "turns", DIM)  # same process, same file
    first.upsert(["t1"], np.stack([_vector(1)]), kind=KIND_TURN)
    first.close()
    assert second.count(KIND_TURN) == 1  # the other index of this process still works
    held = _other_process(path)
    assert held.returncode == 3 and "refused" in held.stdout, held.stdout + held.stderr
    second.close()
    second.close()  # closing twice does nothing more
    freed = _other_process(path)
    assert freed.returncode == 0, freed.stdout + freed.stderr
    assert freed.stdout.strip().splitlines()[-1] == "1"  # what was written is there
    again = VectorIndex(str(path), "turns", DIM)  # and this process can open it again
    try:
        assert again.count(KIND_TURN) == 1
    finally:
        again.close()
