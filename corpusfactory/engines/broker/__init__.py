"""An embedded single-node Apache Kafka broker (KRaft mode) for local runs and tests.

``corpusfactory broker start`` and the test suite run a real Kafka broker rather
than a fake, so the workers are exercised against the same protocol they meet
in production. The broker is the plain ``kafka.Kafka`` main class from Apache
Kafka 3.9.1, acting as both broker and KRaft controller (no ZooKeeper).

* ``ensure_jars`` resolves the broker's classpath once with Maven from
  ``broker/pom.xml`` and caches it outside the checkout, under
  ``$CORPUSFACTORY_CACHE`` (default ``~/.cache/corpusfactory``)
  ``/kafka/<pom hash>/libs``.
* ``EmbeddedBroker`` keeps everything else under ``<state_dir>/kafka/``: the log
  directories, the generated ``server.properties`` and ``log4j.properties``,
  ``broker.pid``, ``broker.log`` and ``ports.json`` (the chosen ports, reused on
  every restart so clients and stored offsets stay valid).

* ``EmbeddedCluster`` runs three such nodes (``size``) as one replicated
  cluster on loopback, for the tests of broker failures (reliability.md,
  scenario 11): every node is broker and controller, ``controller.quorum.voters``
  lists all of them, and one cluster id is formatted into each node's storage.
  Its files live under ``<state_dir>/kafka-cluster/`` (``cluster.json``, then one
  ``node-<id>/kafka/`` per node, laid out as a single broker's).

A broker runs detached in its own session, so it outlives the command that
started it; ``stop`` ends it (``kill`` crashes it, for fault tests). Extra JVM
options can be given in ``CORPUSFACTORY_BROKER_JVM_OPTS`` (e.g. ``-Xmx1g``; later
options win).

The package's modules: ``node`` (``EmbeddedBroker``, ``resolve_bootstrap``),
``cluster`` (``EmbeddedCluster``), ``jars`` (the classpath and java), ``config`` (the
generated configuration), ``probe`` (readiness requests) and ``processes`` (process,
file and port helpers). The names below are the package's API.
"""

from __future__ import annotations

from corpusfactory.engines.broker.cluster import (
    CLUSTER_SIZE,
    ClusterLayout,
    ClusterNode,
    EmbeddedCluster,
)
from corpusfactory.engines.broker.jars import (
    JVM_OPTS_ENV,
    POM_PATH,
    ensure_jars,
    java_executable,
)
from corpusfactory.engines.broker.node import EmbeddedBroker, embedded_broker, resolve_bootstrap
from corpusfactory.engines.broker.processes import HOST

__all__ = [
    "CLUSTER_SIZE",
    "HOST",
    "JVM_OPTS_ENV",
    "POM_PATH",
    "ClusterLayout",
    "ClusterNode",
    "EmbeddedBroker",
    "EmbeddedCluster",
    "embedded_broker",
    "ensure_jars",
    "java_executable",
    "resolve_bootstrap",
]
