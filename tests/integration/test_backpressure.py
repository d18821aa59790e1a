"""Fault scenario 9: back-pressure. A burst of candidates far beyond the scoring
capacity keeps every worker's memory bounded, no consumer leaves its group, and
every candidate is decided exactly once (I1).

The burst is written at once, as fast as a producer can, to ``turns.candidates``
of a real stack (the broker, a scorer and an admitter worker): more than twice
what the scorer's stream buffer holds, and minutes of scoring work, many times
the consumer session timeout. Faust buffers at most ``stream_buffer_maxsize``
events per stream and stops fetching a partition whose buffer is under pressure
(what one fetch already brought, at most 1 MiB per partition, is still taken), so
the rest of the backlog waits in Kafka. While the stack drains it, the test
samples each worker process's RSS, the state and members of both consumer
groups, and the number of decisions written.
"""

from __future__ import annotations

import itertools
import random
import re
import time
from dataclasses import dataclass, field

import psutil
import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.admin import KafkaAdminClient

from corpusfactory import contract
from corpusfactory.kafka_clients import ensure_topics
from corpusfactory.tools.stack import WorkerProcess, stop_all
from streams.app import app_id_for
from tests.integration.conftest import make_settings
from tests.integration.pipeline_util import (
    candidate,
    check_i1,
    producer,
    wait_for,
)

pytestmark = pytest.mark.integration

WARMUP = 64  # candidates decided before the baseline is taken (models warm, allocator settled)
# More than twice the scorer's stream buffer (1024 events), written in 1-2 s. The stack spends
# about 0.06 CPU-s per decided turn (scorer 0.045, admitter 0.013): some 20-30 turns/s on 2
# idle cores, so about 100 s of scoring; on a busy machine, as long as it takes.
BURST = 2400
# Allowance over the baseline RSS, per worker process (see the test's docstring).
MARGIN = 128 * 2**20
SAMPLE_S = 0.25

SUBJECTS = ("Marco", "Giulia", "Sara", "Luca", "Paolo", "Chiara", "Anna", "Franco", "Elena",
            "Pietro", "Il nonno", "La nonna", "Mia zia", "Il cuoco", "Il medico", "La maestra",
            "Il vicino", "Mio fratello", "Tua sorella", "Il sindaco")  # fmt: skip
VERBS = ("legge", "prepara", "compra", "cerca", "porta", "dipinge", "ripara", "racconta",
         "scrive", "trova", "vende", "regala", "lava", "nasconde", "disegna", "presta",
         "ordina", "aspetta", "pulisce", "sceglie")  # fmt: skip
OBJECTS = ("un libro", "la cena", "una lettera", "il pane", "una storia", "la bicicletta",
           "un regalo", "il giornale", "una torta", "la mappa", "il vino", "una sedia",
           "le chiavi", "il cappello", "una lampada", "il treno", "le scarpe", "un quadro",
           "la radio", "un ombrello")  # fmt: skip

# aiokafka and faust log lines of a group that changes: a member leaving, being
# evicted (its session expired) or joining again.
REBALANCE = re.compile(
    r"revok|rebalanc|re-?join|leav(e|ing) group|heartbeat (failed|session expired)|"
    r"unknownmemberid|illegalgeneration",
    re.IGNORECASE,
)


def texts(n: int) -> list[str]:
    """n distinct short Italian sentences (a fixed shuffle of all the combinations)."""
    combos = list(itertools.product(SUBJECTS, VERBS, OBJECTS))
    random.Random(9).shuffle(combos)
    assert n <= len(combos)
    return [f"{s} {v} {o}." for s, v, o in combos[:n]]


@dataclass
class Watch:
    """What the test samples while the stack drains."""

    workers: dict[str, WorkerProcess]
    groups: list[str]
    bootstrap: str
    decisions_topic: str
    rss: dict[str, list[int]] = field(default_factory=dict)
    times: list[float] = field(default_factory=list)
    group_views: list[dict[str, tuple[str, tuple[str, ...]]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.procs = {n: psutil.Process(w.proc.pid) for n, w in self.workers.items() if w.proc}
        self.admin = KafkaAdminClient(bootstrap_servers=self.bootstrap)
        self.consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        parts = self.consumer.partitions_for_topic(self.decisions_topic) or set()
        self.tps = [TopicPartition(self.decisions_topic, p) for p in sorted(parts)]
        self.rss = {n: [] for n in self.procs}

    def close(self) -> None:
        self.admin.close()
        self.consumer.close()

    def sample_rss(self) -> dict[str, int]:
        now = {n: p.memory_info().rss for n, p in self.procs.items()}
        self.times.append(time.monotonic())
        for n, v in now.items():
            self.rss[n].append(v)
        return now

    def decided(self) -> int:
        """Decisions written so far (each is one record of the decisions topic)."""
        return sum(self.consumer.end_offsets(self.tps).values())

    def group_view(self) -> dict[str, tuple[str, tuple[str, ...]]]:
        """Each group's state and its members' ids."""
        out = {}
        for gid, g in self.admin.describe_groups(self.groups).items():
            members = tuple(sorted(m["member_id"] for m in g["members"]))
            out[gid] = (g["group_state"], members)
        return out


def test_burst_keeps_memory_bounded_and_groups_stable(
    tmp_path, kafka_bootstrap, topic_prefix, built_models
) -> None:
    """Memory bound: per worker, its RSS after the warm-up (models loaded, WARMUP
    candidates scored and admitted; the highest of 8 samples over 2 s) plus MARGIN.
    What the burst may add by design is a few MB: Faust holds at most
    stream_buffer_maxsize (1024) events per stream plus one fetch (at most 1 MiB per
    partition) of these ~300-byte events, and the scorer works on score_batch_size
    turns at a time. The rest of MARGIN is the working set of inference and of the
    clients (a batch's tensors, tokenizer and allocator caches, producer batches):
    runs here grew by 1-91 MiB, so 128 MiB. It catches a worker that holds the
    backlog in a heavy form (the scored turns with their embeddings in a few copies)
    or leaks tens of KB per event; the burst's own bytes (under 1 MB) are too few to
    tell a buffer of 1024 events from one of all of them.
    """
    s = make_settings(tmp_path / "state", kafka_bootstrap, topic_prefix)
    ensure_topics(s, kafka_bootstrap)
    all_texts = texts(WARMUP + BURST)
    workers = {
        "admitter": WorkerProcess(s, "admitter").start(),
        "scorer": WorkerProcess(s, "scorer").start(),
    }
    groups = [app_id_for(s, role) for role in workers]
    prod = producer(kafka_bootstrap)
    watch: Watch | None = None
    try:
        for w in workers.values():
            w.wait_ready()
        watch = Watch(workers, groups, kafka_bootstrap, s.topic(contract.DECISIONS))

        def send(batch: list[str], offset: int) -> None:
            for i, text in enumerate(batch, start=offset):
                conv = f"bp{i // 4:05d}"
                prompt = all_texts[i - 1] if i % 2 else ""
                cand = candidate(conv, i % 4, text, prompt=prompt)
                prod.send(
                    s.topic(contract.CANDIDATES), key=conv.encode(), value=contract.encode(cand)
                )
            prod.flush()

        send(all_texts[:WARMUP], 0)
        wait_for(lambda: watch.decided() >= WARMUP, 300, "the warm-up's decisions")
        settle = []
        for _ in range(8):
            settle.append(watch.sample_rss())
            time.sleep(SAMPLE_S)
        baseline = {n: max(r[n] for r in settle) for n in workers}
        view0 = watch.group_view()
        assert all(state == "Stable" and len(m) == 1 for state, m in view0.values()), view0
        logs0 = {n: len(w.log_text()) for n, w in workers.items()}

        t0 = time.monotonic()
        send(all_texts[WARMUP:], WARMUP)
        write_s = time.monotonic() - t0
        last_view = t0
        decided = watch.decided()
        while decided < WARMUP + BURST:
            assert all(w.alive for w in workers.values()), "a worker died during the burst"
            assert time.monotonic() - t0 < 900, f"only {decided} decisions after 900 s"
            watch.sample_rss()
            if time.monotonic() - last_view >= 1.0:
                watch.group_views.append(watch.group_view())
                last_view = time.monotonic()
            time.sleep(SAMPLE_S)
            decided = watch.decided()
        drain_s = time.monotonic() - t0
        watch.group_views.append(watch.group_view())
        drain_logs = {n: w.log_text()[logs0[n] :] for n, w in workers.items()}
    finally:
        prod.close()
        if watch is not None:
            watch.close()
        stop_all(list(workers.values()))

    capacity = BURST / drain_s  # the scorer was busy the whole drain: decided turns/s
    peak = {n: max(v) for n, v in watch.rss.items()}
    mib = 2**20
    print(
        f"\nburst {BURST} candidates written in {write_s:.2f} s ({BURST / write_s:.0f}/s); "
        f"drained in {drain_s:.1f} s: capacity {capacity:.1f} decided turns/s; "
        f"{len(watch.group_views)} group views, {len(next(iter(watch.rss.values())))} RSS samples"
    )
    for n in peak:
        series = watch.rss[n][8:]  # the drain's samples (the first 8 made the baseline)
        at = [series[round(q * (len(series) - 1))] for q in (0, 0.1, 0.25, 0.5, 0.75, 1)]
        print(
            f"{n}: RSS baseline {baseline[n] / mib:.0f} MiB, peak {peak[n] / mib:.0f} MiB "
            f"(+{(peak[n] - baseline[n]) / mib:.0f} MiB) at "
            f"{watch.times[8 + series.index(max(series))] - t0:.0f} s, "
            f"bound {(baseline[n] + MARGIN) / mib:.0f} MiB; at 0/10/25/50/75/100% of the "
            f"drain: {' '.join(f'{v / mib:.0f}' for v in at)} MiB"
        )

    # The burst came 10x faster than the stack could decide it: back-pressure was needed.
    assert BURST / write_s >= 10 * capacity, (write_s, capacity)
    # Memory stayed bounded.
    for n in peak:
        assert peak[n] <= baseline[n] + MARGIN, f"{n} grew from {baseline[n]} to {peak[n]} bytes"
    # No consumer left its group: both stayed Stable with the same member throughout.
    changed = [v for v in watch.group_views if v != view0]
    assert not changed, f"groups changed during the drain: {view0} -> {changed[:3]}"
    for n, text in drain_logs.items():
        lines = [ln for ln in text.splitlines() if REBALANCE.search(ln)]
        assert not lines, f"{n} logged a group change during the drain: {lines[:5]}"
    # I1, and exactly once: one decision per candidate, nothing dead-lettered.
    decisions = check_i1(kafka_bootstrap, s)
    assert len(decisions) == WARMUP + BURST
    twice = {t: len(ds) for t, ds in decisions.items() if len(ds) != 1}
    assert not twice, f"candidates decided more than once: {list(twice.items())[:5]}"
