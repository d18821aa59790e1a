"""Each checkout runs its own code (issue 10, part 9).

Two checkouts of the working tree share the cached environment of the locked
dependencies, and each gets its own thin ``.venv`` from ``make venv``. Each
checkout's ``.venv/bin/python`` and ``.venv/bin/corpusfactory`` must run that
checkout's code, the cached environment must hold no copy of the project (so
nothing in it shadows a checkout) and must not be rebuilt, and a ``.venv`` link
of the previous scheme must be replaced without harm to the cached environment.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _cache_root() -> Path:
    env = os.environ.get("CORPUSFACTORY_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "corpusfactory"


def _shared_env() -> Path:
    """The cached environment of this checkout's lock, as the Makefile names it."""
    lock_hash = hashlib.sha256((ROOT / "requirements.lock").read_bytes()).hexdigest()[:16]
    return (_cache_root() / "venvs" / lock_hash).absolute()


def _clean_env() -> dict[str, str]:
    """The environment of a shell in a checkout: no PYTHONPATH (``make test`` sets it
    to the checkout that runs the suite) and no make variables of an outer make."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"PYTHONPATH", "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEFILES"}
    }
    env["CORPUSFACTORY_CACHE"] = str(_cache_root())
    return env


def _copy_checkout(dest: Path) -> None:
    """A checkout of the working tree as it is now: tracked files (with their
    uncommitted changes) and untracked files git does not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        src = ROOT / name
        if src.is_file():  # a tracked file deleted in the working tree is not copied
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def _run(args: list[str], cwd: Path, timeout: float = 300) -> str:
    proc = subprocess.run(
        args, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _plant(clone: Path, marker: str) -> None:
    """Mark a checkout's code: a module constant and the CLI's program name."""
    init = clone / "corpusfactory" / "__init__.py"
    init.write_text(init.read_text() + f"\nCHECKOUT_MARKER = {marker!r}\n")
    cli = clone / "corpusfactory" / "cli" / "main.py"
    text = cli.read_text()
    assert text.count('prog="corpusfactory",') == 1
    cli.write_text(text.replace('prog="corpusfactory",', f'prog="corpusfactory-{marker}",'))


PROBE = (
    "import corpusfactory, streams; "
    "print(corpusfactory.__file__); print(streams.__file__); "
    "print(getattr(corpusfactory, 'CHECKOUT_MARKER', '-'))"
)


def test_each_checkout_runs_its_own_code(tmp_path: Path) -> None:
    shared = _shared_env()
    complete = shared / ".complete"
    assert complete.is_file(), f"no cached environment at {shared}: run `make venv` first"
    shared_py = shared / "bin" / "python"
    before = (complete.stat().st_mtime_ns, shared_py.stat().st_ino, shared.stat().st_ino)

    clones = {name: tmp_path / name for name in ("a", "b")}
    markers = {name: f"{name}-{uuid.uuid4().hex[:8]}" for name in clones}
    for name, clone in clones.items():
        clone.mkdir()
        _copy_checkout(clone)
        _plant(clone, markers[name])
    # Checkout a still has the previous scheme's .venv, a link to the shared environment,
    # where the previous scheme installed the project (inert files here: other test runs
    # may be using the environment).
    (clones["a"] / ".venv").symlink_to(shared, target_is_directory=True)
    site = next((shared / "lib").glob("python3*/site-packages"))
    stale = f"corpusfactory-0.0.0+stale{uuid.uuid4().hex[:8]}"
    (site / f"{stale}.dist-info").mkdir()
    (site / f"{stale}.dist-info" / "METADATA").write_text(
        f"Name: corpusfactory\nVersion: {stale[14:]}\n"
    )
    (site / f"__editable__.{stale}.pth").write_text("# left by a previous make venv\n")

    seconds = {}
    for name, clone in clones.items():
        t0 = time.monotonic()
        out = _run(["make", "--no-print-directory", "venv"], clone)
        seconds[name] = time.monotonic() - t0
        # a's make replaced its link and cleared the shared environment, and said so
        assert ("link" in out) == ("install from the shared" in out) == (name == "a"), out
    print(f"\nmake venv with a warm cache: {seconds['a']:.1f} s, {seconds['b']:.1f} s")

    # The shared environment was reused, not rebuilt, and holds no copy of the project.
    assert (complete.stat().st_mtime_ns, shared_py.stat().st_ino, shared.stat().st_ino) == before
    leftovers = [
        p.name
        for pattern in ("__editable__*corpusfactory*", "corpusfactory*")
        for p in site.glob(pattern)
    ]
    assert not leftovers, f"the project is installed in the shared environment: {leftovers}"
    assert not (shared / "bin" / "corpusfactory").exists()
    neutral = tmp_path / "elsewhere"
    neutral.mkdir()
    proc = subprocess.run(
        [str(shared_py), "-c", "import corpusfactory"],
        cwd=neutral,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "No module named 'corpusfactory'" in proc.stderr

    for name, clone in clones.items():
        venv = clone / ".venv"
        assert venv.is_dir() and not venv.is_symlink()
        # From a neutral folder: the checkout's python imports the checkout's packages...
        lines = _run([str(venv / "bin" / "python"), "-c", PROBE], neutral).split()
        assert lines == [
            str(clone / "corpusfactory" / "__init__.py"),
            str(clone / "streams" / "__init__.py"),
            markers[name],
        ]
        # ...its console script runs the checkout's CLI...
        usage = _run([str(venv / "bin" / "corpusfactory"), "--help"], neutral)
        assert usage.startswith(f"usage: corpusfactory-{markers[name]} ")
        # ...and, as `make test` runs (the shared interpreter, the checkout first on the
        # path), so do the tests and the workers they start (`python -m corpusfactory`).
        env = _clean_env() | {"PYTHONPATH": str(clone)}
        proc = subprocess.run(
            [str(shared_py), "-m", "corpusfactory", "--help"],
            cwd=neutral,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.stdout.startswith(f"usage: corpusfactory-{markers[name]} "), proc.stderr

    # A second `make venv` keeps a current .venv as it is.
    stamp = clones["b"] / ".venv" / ".corpusfactory-venv"
    mtime = stamp.stat().st_mtime_ns
    t0 = time.monotonic()
    _run(["make", "--no-print-directory", "venv"], clones["b"])
    print(f"make venv again (nothing to do): {time.monotonic() - t0:.1f} s")
    assert stamp.stat().st_mtime_ns == mtime

    # The CI's own entry, `make test`, in checkout b runs b's code under the shared
    # interpreter, in the test process and in the processes it starts.
    probe = clones["b"] / "tests" / "unit" / "test_zz_checkout_probe.py"
    probe.write_text(PROBE_TEST.format(marker=markers["b"], python=str(shared_py)))
    t0 = time.monotonic()
    out = _run(
        ["make", "--no-print-directory", "test", f"PYTEST_ARGS={probe.relative_to(clones['b'])}"],
        clones["b"],
        timeout=600,
    )
    print(f"make test of one probe in a fresh checkout: {time.monotonic() - t0:.1f} s")
    assert "1 passed" in out, out


PROBE_TEST = """
import subprocess
import sys

import corpusfactory


def test_this_checkout() -> None:
    assert sys.executable == {python!r}
    assert corpusfactory.CHECKOUT_MARKER == {marker!r}
    usage = subprocess.run(
        [sys.executable, "-m", "corpusfactory", "--help"],
        cwd="/", capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    assert usage.startswith("usage: corpusfactory-{marker} ")
"""
