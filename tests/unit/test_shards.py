"""The integration tier's shard runner (tests/shards.py): which module goes where."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.shards import deal, groups, modules, record

ROOT = Path(__file__).resolve().parents[2]


def _module(folder: Path, name: str, uses: str = "") -> Path:
    path = folder / name
    path.write_text(f"def test_x({uses}) -> None:\n    pass\n", encoding="utf-8")
    return path


def test_users_of_a_shared_fixture_stay_together(tmp_path: Path) -> None:
    a = _module(tmp_path, "test_a.py", "default_stack")
    b = _module(tmp_path, "test_b.py")
    c = _module(tmp_path, "test_c.py", "default_stack")
    d = _module(tmp_path, "test_d.py", "milvus_server")
    e = _module(tmp_path, "test_e.py", "milvus_server, default_stack")  # joins both groups
    found = modules(tmp_path)
    assert found == [a, b, c, d, e]
    assert sorted(map(sorted, groups(found))) == [[a, c, d, e], [b]]
    assert sorted(map(sorted, groups([a, b, c, d]))) == [[a, c], [b], [d]]


def test_longest_first_onto_the_least_loaded_shard(tmp_path: Path) -> None:
    names = {"test_a.py": 50.0, "test_b.py": 40.0, "test_c.py": 30.0, "test_d.py": 20.0}
    found = [_module(tmp_path, n) for n in names]
    shards = deal(found, 2, names)
    assert [[m.name for m in s] for s in shards] == [
        ["test_a.py", "test_d.py"],
        ["test_b.py", "test_c.py"],
    ]
    # an unknown module counts as the median (35 s)
    extra = _module(tmp_path, "test_e.py")
    loads = [sum(names.get(m.name, 35.0) for m in s) for s in deal([*found, extra], 2, names)]
    assert sorted(loads) == [80.0, 95.0]  # a+c, b+e+d
    assert deal(found, 1, names) == [found]
    assert len(deal(found[:1], 3, names)) == 1  # no empty shard


def test_record_sums_each_module_from_junit(tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.integration.test_a" name="t1" time="1.25"/>'
        '<testcase classname="tests.integration.test_a" name="t2" time="2.0"/>'
        '<testcase classname="tests.integration.test_b" name="t1" time="4.5"/>'
        "</testsuite></testsuites>",
        encoding="utf-8",
    )
    out = tmp_path / "durations.json"
    assert record([junit], out) == {"test_a.py": 3.2, "test_b.py": 4.5}
    assert json.loads(out.read_text(encoding="utf-8"))["seconds"]["test_b.py"] == 4.5


def test_shards_run_and_the_first_failure_is_the_exit_status(tmp_path: Path) -> None:
    _module(tmp_path, "test_ok.py")
    (tmp_path / "test_bad.py").write_text("def test_bad():\n    assert 1 == 2\n", "utf-8")
    run = subprocess.run(
        [sys.executable, "-m", "tests.shards", "--shards", "2", "--log-dir",
         str(tmp_path / "logs"), str(tmp_path), "-q", "-p", "no:cacheprovider"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr
    assert run.stdout.count("===== shard") == 2
    assert "1 failed" in run.stdout and "1 passed" in run.stdout
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["shard-0.log", "shard-1.log"]
