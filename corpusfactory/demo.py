"""``corpusfactory demo``: the whole factory on the embedded stack, then a summary.

Steps: build (or reuse) the demo models, start the embedded Kafka broker,
create the topics, start one scorer and one admitter worker (the admitter
loads the seed messages into Milvus Lite first), run the self-chat producer
for ``--conversations`` conversations, drain the accepted corpus into its
shards, fine-tune a snapshot of the demo generator on the new conversations
(DeepSpeed on CPU), evaluate it and the base model (a SQuAD-it subset, held-out
perplexity, MLM-NLL of its generations), and print what happened: conversations
accepted, turns accepted and rejected by reason, NLL quantiles, throughput, and
the evaluation table; then convert the snapshot to GGUF, quantize it (Q8_0,
Q4_K_M), gate each build, and print one chat answer from the Q4_K_M build.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from corpusfactory.settings import Settings

log = logging.getLogger(__name__)


def run_pipeline(settings: Settings, conversations: int) -> dict[str, Any]:
    """Start workers, produce ``conversations``, drain the corpus; return figures."""
    from consumers.store import CorpusStore
    from consumers.writer import CorpusWriter
    from corpusfactory.kafka_clients import ensure_topics, resolve_bootstrap
    from corpusfactory.models.demo import build_demo_models, resolve_model
    from corpusfactory.stack import WorkerProcess, stop_all
    from producers.generators.base import make_generator
    from producers.service import SelfChatProducer

    t0 = time.perf_counter()
    build_demo_models(settings.models.models_dir)
    t_models = time.perf_counter() - t0
    bootstrap = resolve_bootstrap(settings)
    ensure_topics(settings, bootstrap)
    workers = [
        WorkerProcess(settings, "admitter").start(),
        WorkerProcess(settings, "scorer").start(),
    ]
    try:
        for w in workers:
            w.wait_ready()
        t_ready = time.perf_counter()
        settings.producer.conversations = conversations
        generator = make_generator(
            settings.producer,
            resolve_model(settings.models.generator, settings.models.models_dir),
            settings.models.device,
        )
        try:
            stats = asyncio.run(SelfChatProducer(settings, bootstrap, generator).run())
        finally:
            generator.close()
        t_done = time.perf_counter()
    finally:
        stop_all(workers)
    with CorpusWriter(settings, bootstrap) as writer:
        writer.run_once(30.0)
    corpus = CorpusStore(settings.state_path / "corpus", read_only=True).stats()
    decided = sum(stats.decisions.values())
    return {
        "producer": stats.as_dict(),
        "corpus": corpus,
        "timing_s": {
            "models": round(t_models, 2),
            "workers_ready": round(t_ready - t0 - t_models, 2),
            "produce": round(t_done - t_ready, 2),
        },
        "throughput": {
            "decided_turns_per_s": round(decided / max(t_done - t_ready, 1e-9), 3),
            "generated_per_s": round(stats.generated / max(stats.generate_s, 1e-9), 3),
        },
    }


def run_training(settings: Settings) -> dict[str, Any]:
    """Train one snapshot on what is new in corpus.accepted, then evaluate what is waiting."""
    from corpusfactory.kafka_clients import resolve_bootstrap
    from serving.builder import Builder
    from training.evaluation.compare import compare_rows, render_table
    from training.evaluation.service import EvaluatorService
    from training.service import Trainer

    bootstrap = resolve_bootstrap(settings)
    t0 = time.perf_counter()
    with Trainer(settings, bootstrap) as trainer:
        snap = trainer.run_once()
    t1 = time.perf_counter()
    with EvaluatorService(settings, bootstrap) as evaluator:
        evaluator.run(once=True)
    t2 = time.perf_counter()
    builds = Builder(settings, bootstrap).build_all()
    t3 = time.perf_counter()
    rows = compare_rows(settings)
    return {
        "snapshot": snap.id if snap else None,
        "manifest": snap.manifest if snap else None,
        "evaluation": rows,
        "table": render_table(rows),
        "builds": [b.describe() for b in builds],
        "chat": _chat_once(settings),
        "timing_s": {
            "train": round(t1 - t0, 2),
            "evaluate": round(t2 - t1, 2),
            "build": round(t3 - t2, 2),
        },
    }


DEMO_QUESTION = "Ciao! Mi consigli un libro da leggere questa estate?"


def _chat_once(settings: Settings) -> dict[str, str] | None:
    """One answer from the newest published build of serving.quant, as `chat` gives it."""
    import io

    from corpusfactory.chatformat import ChatFormat
    from serving.backends import GenerationParams
    from serving.chat import open_model, reply
    from serving.follow import newest
    from serving.server.prompts import chat_stops

    if newest(settings, "gguf") is None:
        return None
    fmt = ChatFormat(settings.producer.user_tag, settings.producer.assistant_tag)
    backend = open_model(settings, None)
    try:
        params = GenerationParams(max_tokens=48, temperature=0.0, stop=chat_stops(fmt, ()))
        answer = reply(backend, [("user", DEMO_QUESTION)], fmt, params, io.StringIO())
    finally:
        backend.close()
    return {"model": backend.id, "question": DEMO_QUESTION, "answer": answer}


def _training_summary(result: dict[str, Any]) -> str:
    m = result["manifest"]
    if m is None:
        head = "  no new trainable conversations: no snapshot this run"
    else:
        head = (
            f"  snapshot                    {result['snapshot']} on {m['conversations']} "
            f"conversations, {m['steps']} steps, loss {m['first_loss']} -> {m['final_loss']}, "
            f"{m['tokens_per_s']} tokens/s"
        )
    lines = [head]
    for b in result["builds"]:
        g = b["gate"]
        lines.append(
            f"  build {b['quant']:<21} {b['size_bytes']:,d} bytes, "
            f"KL {g['kl_mean']:.2g}, "
            f"top-1 {g['top1_agreement']:.3f}, ppl {g['ppl_delta_pct']:+.2f}% -> "
            + ("published" if b["published"] else "held back")
        )
    chat = result["chat"]
    if chat:
        lines += [f"  chat ({chat['model']})", f"    > {chat['question']}", f"    {chat['answer']}"]
    lines += [f"  timing (s)                  {result['timing_s']}", "", result["table"], ""]
    return "\n".join(lines)


def _summary(result: dict[str, Any]) -> str:
    p = result["producer"]
    c = result["corpus"]
    reasons = p["decisions"]
    accepted = reasons.get("accepted", 0)
    rejected = {k: v for k, v in reasons.items() if k != "accepted"}
    lines = [
        "",
        "corpusfactory demo: summary",
        f"  conversations finished      {p['finished']} (+{p['truncated']} truncated), "
        f"published {p['published']}",
        f"  turns accepted              {accepted}",
        "  turns rejected              "
        + (", ".join(f"{k}={v}" for k, v in sorted(rejected.items())) or "none"),
        f"  empty generations           {p['empty_generations']}",
    ]
    q = {k: v for k, v in c["turns"]["nll_accepted"].items() if v is not None}
    if q:
        lines.append(
            "  NLL quantiles (accepted)    " + ", ".join(f"{k}={v:.3f}" for k, v in q.items())
        )
    t = result["throughput"]
    lines += [
        f"  throughput                  {t['decided_turns_per_s']} decided turns/s, "
        f"generation {t['generated_per_s']} messages/s",
        f"  corpus on disk              {c['conversations']['total']} conversations "
        f"({c['conversations']['truncated']} truncated), {c['conversations']['messages']} "
        f"messages, acceptance rate {c['turns']['acceptance_rate']}",
        f"  timing (s)                  {result['timing_s']}",
        "",
    ]
    return "\n".join(lines)


def run_demo(
    settings: Settings, conversations: int, keep_running: bool = False, train: bool = True
) -> int:
    from corpusfactory.broker import EmbeddedBroker

    # Each demo run is a new producer, so its conversation count starts at zero while
    # the index and the corpus keep growing from run to run; and it draws new seeds,
    # since the last run's seeds would regenerate texts the index now rejects.
    settings.producer.producer_id = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    run_seed = time.time_ns() % 2**31
    settings.producer.rng_seed = run_seed
    settings.producer.generation.seed = run_seed
    broker = None
    if not settings.kafka.bootstrap_servers:
        broker = EmbeddedBroker(
            settings.state_path,
            settings.kafka.embedded_port,
            settings.kafka.embedded_controller_port,
        )
        broker.start()
    try:
        result = run_pipeline(settings, conversations)
        if train:
            result["training"] = run_training(settings)
    finally:
        if broker is not None and not keep_running:
            broker.stop()
    out = settings.state_path / "demo-summary.json"
    out.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    print(_summary(result))
    if "training" in result:
        print(_training_summary(result["training"]))
    print(f"full figures: {out}")
    return 0
