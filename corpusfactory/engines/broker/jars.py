"""The broker's Java side: its classpath, fetched once with Maven, and the java binary.

``ensure_jars`` resolves the classpath of ``broker/pom.xml`` (at the repository root)
with Maven and caches it under ``$CORPUSFACTORY_CACHE/kafka/<pom hash>/libs``;
``java_executable`` finds Java 17+; extra JVM options come from
``CORPUSFACTORY_BROKER_JVM_OPTS``.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
from pathlib import Path

from corpusfactory.cache import cache_root as default_cache_root
from corpusfactory.engines.broker.processes import file_lock, tail_lines
from corpusfactory.errors import BrokerError, JavaMissingError

POM_PATH = Path(__file__).resolve().parents[3] / "broker" / "pom.xml"
JVM_OPTS_ENV = "CORPUSFACTORY_BROKER_JVM_OPTS"
COMPLETE_MARKER = "COMPLETE"
JAVA_MISSING_MESSAGE = (
    "Java 17+ is needed for the embedded Kafka broker: install a JDK "
    "(e.g. apt-get install openjdk-17-jre-headless) or set KAFKA_BOOTSTRAP_SERVERS "
    "to use an existing cluster"
)


def ensure_jars(cache_root: Path | None = None) -> Path:
    """The directory holding the broker's classpath, downloading it on first use."""
    if not POM_PATH.is_file():
        raise BrokerError(f"the broker build file {POM_PATH} is missing from the checkout")
    pom_bytes = POM_PATH.read_bytes()
    # Keyed by the pom's content, so a version bump gets a fresh classpath.
    digest = hashlib.sha256(pom_bytes).hexdigest()
    base = Path(cache_root or default_cache_root()) / "kafka" / digest[:16]
    libs = base / "libs"
    marker = base / COMPLETE_MARKER
    if marker.is_file() and libs.is_dir():
        return libs
    base.mkdir(parents=True, exist_ok=True)
    with file_lock(base / ".lock"):
        # Another process may have finished the download while we waited.
        if not (marker.is_file() and libs.is_dir()):
            _download_jars(base, libs)
            # Written last: without it the next call redoes an interrupted download.
            marker.write_text(digest + "\n", encoding="utf-8")
    return libs


def _download_jars(base: Path, libs: Path) -> None:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError(
            "Maven (mvn) is needed once to download the Kafka broker jars: install it "
            "(e.g. apt-get install maven) or set KAFKA_BOOTSTRAP_SERVERS to use an existing cluster"
        )
    partial = base / f"libs.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    cmd = [
        mvn, "-q", "-B", "-Dstyle.color=never", "-f", str(POM_PATH),
        "dependency:copy-dependencies", f"-DoutputDirectory={partial}",
    ]  # fmt: skip
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    except subprocess.TimeoutExpired as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise BrokerError("mvn took over 30 minutes to download the Kafka broker jars") from exc
    if done.returncode != 0 or not any(partial.glob("kafka_2.13-*.jar")):
        shutil.rmtree(partial, ignore_errors=True)
        raise BrokerError(
            f"mvn could not download the Kafka broker jars (exit {done.returncode}):\n"
            + tail_lines(done.stdout + done.stderr)
        )
    # Swap in the complete directory in one rename, replacing any leftover.
    shutil.rmtree(libs, ignore_errors=True)
    partial.rename(libs)


# --------------------------------------------------------------------------- java


def java_executable() -> str:
    """The java binary: ``$JAVA_HOME/bin/java``, else ``java`` on PATH."""
    home = os.environ.get("JAVA_HOME")
    if home:
        candidate = Path(home) / "bin" / "java"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("java")
    if found:
        return found
    raise JavaMissingError(JAVA_MISSING_MESSAGE)


def classpath(libs: Path) -> str:
    # Java expands "dir/*" itself, so no shell is involved.
    return str(libs / "*")


def extra_jvm_opts() -> list[str]:
    return shlex.split(os.environ.get(JVM_OPTS_ENV, ""))
