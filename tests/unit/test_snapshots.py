"""The snapshot store: atomic publication, what readers see, lineage, crash leftovers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from corpusfactory.atomicio import write_json_atomic
from training.snapshots import (
    CONVERSATIONS,
    MANIFEST,
    MARKER,
    Snapshot,
    SnapshotError,
    SnapshotStore,
)

ROOT = Path(__file__).resolve().parents[2]
ID_RE = re.compile(r"^snap-(\d{5})-(\d{8}T\d{6}Z)$")


def _sid(seq: int) -> str:
    return f"snap-{seq:05d}-20260101T00{seq % 60:02d}00Z"


def _stage(
    store: SnapshotStore,
    sid: str,
    *,
    parent: str = "",
    conversations: list[str] | None = None,
    manifest: bool = True,
    weights: str | None = "model.safetensors",
) -> Path:
    tmp = store.staging(sid)
    seq = int(ID_RE.match(sid).group(1))  # type: ignore[union-attr]
    if manifest:
        write_json_atomic(tmp / MANIFEST, {"id": sid, "seq": seq, "parent": parent})
    if weights:
        (tmp / weights).write_bytes(b"not really weights")
    if conversations is not None:
        (tmp / CONVERSATIONS).write_text("".join(f"{c}\n" for c in conversations))
    return tmp


def _publish(store: SnapshotStore, sid: str, **kw: Any) -> Snapshot:
    _stage(store, sid, **kw)
    return store.publish(sid)


def test_new_id_format_and_ordering(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "snaps")
    assert (tmp_path / "snaps").is_dir()
    before = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    ids = [store.new_id(n) for n in (1, 2, 10, 99_999)]
    after = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for sid, n in zip(ids, (1, 2, 10, 99_999), strict=True):
        m = ID_RE.match(sid)
        assert m, sid
        assert int(m.group(1)) == n
        assert before <= m.group(2) <= after  # UTC now
    assert ids[0].startswith("snap-00001-")
    # Zero-padded: string order is sequence order.
    assert sorted(ids) == ids
    store.staging(ids[0])  # a generated id is accepted by the store


@pytest.mark.parametrize(
    "bad", ["snap-1-20260101T000000Z", "snap-00001", "../snap-00001-20260101T000000Z", "base"]
)
def test_staging_rejects_bad_ids(tmp_path: Path, bad: str) -> None:
    store = SnapshotStore(tmp_path)
    with pytest.raises(SnapshotError, match="bad snapshot id"):
        store.staging(bad)


def test_staging_is_fresh(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    tmp = _stage(store, _sid(1))
    assert tmp == tmp_path / f".tmp-{_sid(1)}"
    assert (tmp / MANIFEST).is_file()
    again = store.staging(_sid(1))
    assert again == tmp and list(again.iterdir()) == []


def test_publish_makes_a_snapshot_visible_with_its_marker(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    sid = _sid(1)
    _stage(store, sid, conversations=["a", "b"])
    # Staged: invisible.
    assert store.all() == [] and store.latest() is None
    with pytest.raises(SnapshotError):
        store.get(sid)
    snap = store.publish(sid)
    assert snap.id == sid and snap.path == tmp_path / sid
    assert snap.seq == 1 and snap.parent == ""
    assert (snap.path / MARKER).is_file()
    assert not (tmp_path / f".tmp-{sid}").exists()
    assert (snap.path / "model.safetensors").read_bytes() == b"not really weights"
    assert store.all() == [snap]
    assert store.latest() == snap
    assert store.get(sid) == snap
    # Publishing the same id again is refused.
    _stage(store, sid)
    with pytest.raises(SnapshotError, match="already exists"):
        store.publish(sid)


def test_publish_accepts_bin_weights(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    snap = _publish(store, _sid(1), weights="pytorch_model.bin")
    assert store.latest() == snap


def test_publish_refuses_without_manifest(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    _stage(store, _sid(1), manifest=False)
    with pytest.raises(SnapshotError, match=re.escape(f"has no {MANIFEST}")):
        store.publish(_sid(1))
    assert (tmp_path / f".tmp-{_sid(1)}").is_dir()  # left as it was
    assert not (tmp_path / _sid(1)).exists()
    assert store.all() == []


def test_publish_refuses_without_weights(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    _stage(store, _sid(1), weights=None)
    (tmp_path / f".tmp-{_sid(1)}" / "config.json").write_text("{}")
    with pytest.raises(SnapshotError, match="has no weights"):
        store.publish(_sid(1))
    assert not (tmp_path / _sid(1)).exists()
    assert store.all() == []


def test_publish_refuses_an_unstaged_id(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError):
        SnapshotStore(tmp_path).publish(_sid(3))


def test_partial_snapshots_are_invisible_and_cleaned_up(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    good = _publish(store, _sid(1))
    # A crash between the rename and the marker: a complete-looking dir, no marker.
    crashed = _publish(store, _sid(2), parent=good.id)
    (crashed.path / MARKER).unlink()
    # A crash while staging.
    _stage(store, _sid(3), parent=crashed.id)
    # The base model's evaluations are not a snapshot and must survive.
    store.eval_dir("base", "org/Some Model")
    # Neither is visible.
    assert [s.id for s in store.all()] == [good.id]
    assert store.latest() == good
    with pytest.raises(SnapshotError):
        store.get(crashed.id)
    removed = store.cleanup_partial()
    assert sorted(removed) == sorted([crashed.id, f".tmp-{_sid(3)}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([good.id, "base"])
    assert (tmp_path / "base" / "org_Some_Model" / "eval").is_dir()
    assert store.cleanup_partial() == []  # nothing left to remove
    assert store.all() == [good]


def test_all_is_ordered_by_sequence_and_ignores_strangers(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    # Published out of order; the sequence number decides, not the name or time.
    for seq in (3, 1, 2):
        _publish(store, _sid(seq))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / MARKER).write_text("")
    (tmp_path / "README").write_text("hi")
    assert [s.seq for s in store.all()] == [1, 2, 3]
    latest = store.latest()
    assert latest is not None and latest.id == _sid(3)


def test_lineage_and_trained_ids_follow_the_parent_chain(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    s1 = _publish(store, _sid(1), conversations=["a", "b"])
    s2 = _publish(store, _sid(2), parent=s1.id, conversations=["c"])
    s3 = _publish(store, _sid(3), parent=s2.id)  # no conversations file
    s4 = _publish(store, _sid(4), parent=s3.id, conversations=["d", "a", ""])
    # A sibling branch from s1.
    s5 = _publish(store, _sid(5), parent=s1.id, conversations=["x"])
    assert [s.id for s in store.lineage(s4)] == [s4.id, s3.id, s2.id, s1.id]
    assert store.lineage(s1) == [s1]
    assert store.trained_ids(s4) == {"a", "b", "c", "d"}
    assert store.trained_ids(s3) == {"a", "b", "c"}
    assert store.trained_ids(s5) == {"a", "b", "x"}
    assert store.trained_ids(s1) == {"a", "b"}


def test_lineage_with_a_missing_parent_raises(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    orphan = _publish(store, _sid(2), parent=_sid(1))
    with pytest.raises(SnapshotError, match=_sid(1)):
        store.lineage(orphan)


def test_get_unknown_lists_known_ids(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    with pytest.raises(SnapshotError, match=r"known: none"):
        store.get(_sid(9))
    s1 = _publish(store, _sid(1))
    s2 = _publish(store, _sid(2), parent=s1.id)
    with pytest.raises(SnapshotError) as err:
        store.get(_sid(9))
    assert f"known: {s1.id}, {s2.id}" in str(err.value)
    with pytest.raises(SnapshotError, match=s1.id):
        store.get("../etc")


def test_unreadable_manifest_is_a_snapshot_error(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    snap = _publish(store, _sid(1))
    (snap.path / MANIFEST).write_text("{not json")
    with pytest.raises(SnapshotError, match="unreadable manifest"):
        store.get(snap.id)


def test_evaluations_and_describe(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    snap = _publish(store, _sid(1))
    assert store.evaluations(snap.id) == {}
    ev = store.eval_dir(snap.id)
    assert ev == snap.path / "eval" and ev.is_dir()
    write_json_atomic(ev / "heldout.json", {"perplexity": 12.5})
    write_json_atomic(ev / "squad_it.json", {"f1": 0.31, "em": 0.2})
    (ev / "squad_it.predictions.jsonl").write_text("{}\n")  # not a result file
    assert store.evaluations(snap.id) == {
        "heldout": {"perplexity": 12.5},
        "squad_it": {"f1": 0.31, "em": 0.2},
    }
    d = store.describe(snap)
    assert d == {
        "id": snap.id,
        "path": str(snap.path),
        "manifest": {"id": snap.id, "seq": 1, "parent": ""},
        "eval": store.evaluations(snap.id),
    }
    json.dumps(d)  # what `snapshots list --json` prints must serialise
    # The base model's evaluations live apart, per base model.
    base = store.eval_dir("base", "meta-llama/Llama-2-7b")
    assert base == tmp_path / "base" / "meta-llama_Llama-2-7b" / "eval"
    write_json_atomic(base / "heldout.json", {"perplexity": 30.0})
    assert store.evaluations("base", "meta-llama/Llama-2-7b") == {"heldout": {"perplexity": 30.0}}
    assert store.evaluations("base", "other") == {}
    with pytest.raises(SnapshotError):
        store.eval_dir(_sid(7))


def test_write_json_atomic_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    write_json_atomic(path, {"a": 1, "è": "ü", "p": Path("/x")})
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": 1, "è": "ü", "p": "/x"}
    write_json_atomic(path, [1, 2])  # replaces
    assert json.loads(path.read_text(encoding="utf-8")) == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


_PUBLISHER = """
import sys
from pathlib import Path
from corpusfactory.atomicio import write_json_atomic
from training.snapshots import SnapshotStore
store = SnapshotStore(Path(sys.argv[1]))
sid = sys.argv[2]
tmp = store.staging(sid)
write_json_atomic(tmp / "manifest.json", {"id": sid, "seq": 1, "parent": ""})
(tmp / "model.safetensors").write_bytes(b"weights")
store.publish(sid)
print("published without pausing", flush=True)
"""


def test_kill_between_rename_and_marker_leaves_nothing_visible(tmp_path: Path) -> None:
    root = tmp_path / "snaps"
    pause_dir = tmp_path / "pause"
    sid = _sid(1)
    env = dict(
        os.environ,
        CORPUSFACTORY_PAUSE_AT="snapshot.publish",
        CORPUSFACTORY_PAUSE_DIR=str(pause_dir),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", _PUBLISHER, str(root), sid],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while not (pause_dir / "snapshot.publish").is_file():
            if proc.poll() is not None:
                out = proc.stdout.read().decode() if proc.stdout else ""
                pytest.fail(f"publisher exited {proc.returncode} before pausing:\n{out}")
            if time.monotonic() > deadline:
                pytest.fail("publisher never reached the pause point")
            time.sleep(0.05)
        assert (pause_dir / "snapshot.publish").read_text() == str(proc.pid)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
    final = root / sid
    assert final.is_dir()
    assert (final / MANIFEST).is_file() and (final / "model.safetensors").is_file()
    assert not (final / MARKER).exists()
    assert not (root / f".tmp-{sid}").exists()  # the rename happened
    store = SnapshotStore(root)
    assert store.all() == [] and store.latest() is None
    with pytest.raises(SnapshotError, match="known: none"):
        store.get(sid)
    assert store.cleanup_partial() == [sid]
    assert list(root.iterdir()) == []
    # The id is free again: a retry publishes.
    _stage(store, sid)
    assert store.publish(sid).id == sid


def test_cleanup_leaves_foreign_directories_and_ids_must_match_whole(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    (tmp_path / "jobs").mkdir()  # not ours: a shared directory may hold anything
    (tmp_path / ".tmp-other").mkdir()
    assert store.cleanup_partial() == []
    assert (tmp_path / "jobs").is_dir() and (tmp_path / ".tmp-other").is_dir()
    with pytest.raises(SnapshotError):
        store.staging("snap-00001-20260101T000000Z\n")
