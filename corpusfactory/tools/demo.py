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
import logging
import time
from typing import Any

from corpusfactory.atomicio import write_json_atomic
from corpusfactory.contract import Reason
from corpusfactory.settings import Settings

log = logging.getLogger(__name__)


def say(message: str) -> None:
    """One progress line on stdout, with the wall-clock time."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class DemoObserver:
    """Progress while the producer runs, and a few decided turns to show afterwards.

    Called by the producer for each decision applied to one of its turns. Prints a
    line when a conversation finishes and at most every ``every_s`` seconds otherwise;
    keeps the first ``keep`` accepted turns and up to ``keep`` rejected turns per reason,
    with their NLL and nearest neighbour (whose text is looked up among the seeds and
    the turns of this run).
    """

    def __init__(
        self,
        target: int,
        neighbours: dict[str, str] | None = None,
        every_s: float = 10.0,
        keep: int = 3,
    ) -> None:
        self.target = target
        self.every_s = every_s
        self.keep = keep
        self.texts: dict[str, str] = dict(neighbours or {})
        self.examples: dict[str, list[dict[str, Any]]] = {}
        self._last = 0.0
        self._finished = 0
        self._t0 = time.perf_counter()

    def start(self) -> None:
        """Count the elapsed time from now (the producer's start)."""
        self._t0 = time.perf_counter()

    def __call__(self, decision: Any, text: str, stats: Any) -> None:
        self.texts.setdefault(decision.turn_id, text)
        kept = self.examples.setdefault(decision.reason, [])
        if len(kept) < self.keep and text.strip():
            kept.append(
                {
                    "text": text,
                    "reason": decision.reason,
                    "nll": round(float(decision.nll), 3),
                    "nll_threshold": round(float(decision.nll_threshold), 3),
                    "neighbour_id": decision.neighbour_id,
                    "neighbour": self.texts.get(decision.neighbour_id, ""),
                    "similarity": round(float(decision.similarity), 3),
                }
            )
        now = time.perf_counter()
        if stats.finished != self._finished or now - self._last >= self.every_s:
            self._finished = stats.finished
            self._last = now
            say(self.progress(stats, now - self._t0))

    def progress(self, stats: Any, elapsed: float) -> str:
        decided = sum(stats.decisions.values())
        accepted = stats.decisions.get(Reason.ACCEPTED, 0)
        rejected = ", ".join(
            f"{k} {v}" for k, v in sorted(stats.decisions.items()) if k != Reason.ACCEPTED
        )
        rate = f"{100.0 * accepted / decided:.0f} %" if decided else "-"
        return (
            f"self-chat {elapsed:5.0f} s: conversations finished {stats.finished}/{self.target}"
            f" (+{stats.truncated} truncated), turns decided {decided}, accepted "
            f"{accepted} ({rate})" + (f", rejected: {rejected}" if rejected else "")
        )


def _seed_texts(settings: Settings) -> dict[str, str]:
    """Seed message ids -> texts, as the admitter stores them (the neighbours' names)."""
    from corpusfactory.seeds import load_seeds, seed_messages

    try:
        seeds = load_seeds(settings.producer.seed_file, settings.producer.seed_format)
    except Exception:  # the examples are a display: without seeds they show ids only
        return {}
    return {f"seed:{mid}": text for mid, text in seed_messages(seeds)}


def prepare_models(settings: Settings) -> None:
    """Build or unpack, once, every model the settings name that the project makes.

    Each is cached (see corpusfactory.engines.models.registry); the first run says what it
    builds and how long it took, later runs find them at once.
    """
    from corpusfactory.engines.models.registry import form_for_backend, is_built_here, resolve_model

    wanted = [
        (settings.models.generator, form_for_backend(settings.producer.backend), "generator"),
        (settings.models.scorer, "hf", "scorer"),
        (settings.training.base_model, "hf", "training base model"),
    ]
    for name, form, role in wanted:
        if not is_built_here(name):
            continue
        t0 = time.perf_counter()
        path = resolve_model(name, settings.models.models_dir, form=form)
        took = time.perf_counter() - t0
        if took > 1.0:
            say(f"models: {role} {name} ready in {took:.0f} s ({path})")


def run_pipeline(settings: Settings, conversations: int) -> dict[str, Any]:
    """Start workers, produce ``conversations``, drain the corpus; return figures."""
    from consumers.store import CorpusStore
    from consumers.writer import CorpusWriter
    from corpusfactory.engines.broker import resolve_bootstrap
    from corpusfactory.engines.models.registry import form_for_backend, resolve_model
    from corpusfactory.kafka_clients import ensure_topics
    from corpusfactory.tools.stack import WorkerProcess, stop_all
    from producers.generators.factory import make_generator
    from producers.service import SelfChatProducer

    t0 = time.perf_counter()
    say("models: checking the demo models (built once, then cached)")
    prepare_models(settings)
    t_models = time.perf_counter() - t0
    bootstrap = resolve_bootstrap(settings)
    ensure_topics(settings, bootstrap)
    say("workers: starting the scorer and the admitter (loading models, seeding the index)")
    workers = [
        WorkerProcess(settings, "admitter").start(),
        WorkerProcess(settings, "scorer").start(),
    ]
    observer = DemoObserver(conversations, _seed_texts(settings))
    try:
        for w in workers:
            w.wait_ready()
        t_ready = time.perf_counter()
        say(f"workers: ready in {t_ready - t0 - t_models:.0f} s")
        settings.producer.conversations = conversations
        generator = make_generator(
            settings.producer,
            resolve_model(
                settings.models.generator,
                settings.models.models_dir,
                form=form_for_backend(settings.producer.backend),
            ),
            settings.models.device,
        )
        say(f"self-chat: {conversations} conversations with {generator.id}")
        observer.start()
        try:
            producer = SelfChatProducer(settings, bootstrap, generator, observer=observer)
            stats = asyncio.run(producer.run())
        finally:
            generator.close()
        t_done = time.perf_counter()
        say(observer.progress(stats, t_done - t_ready))
    finally:
        stop_all(workers)
    say("corpus: writing the accepted conversations into their shards")
    with CorpusWriter(settings, bootstrap) as writer:
        writer.run_once(30.0)
    corpus = CorpusStore(settings.state_path / "corpus", read_only=True).stats()
    decided = sum(stats.decisions.values())
    return {
        "producer": stats.as_dict(),
        "examples": observer.examples,
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
    from corpusfactory.engines.broker import resolve_bootstrap
    from serving.builder import Builder
    from training.evaluation.compare import compare_rows, render_table
    from training.evaluation.service import EvaluatorService
    from training.service import Trainer

    bootstrap = resolve_bootstrap(settings)
    t0 = time.perf_counter()
    say(f"training: fine-tuning a snapshot of {settings.training.base_model} (DeepSpeed, CPU)")
    with Trainer(settings, bootstrap) as trainer:
        snap = trainer.run_once()
    t1 = time.perf_counter()
    say(
        f"training: {'snapshot ' + snap.id if snap else 'nothing new to train on'} "
        f"in {t1 - t0:.0f} s; evaluating the base model and the snapshot"
    )
    with EvaluatorService(settings, bootstrap) as evaluator:
        evaluator.run(once=True)
    t2 = time.perf_counter()
    say(f"evaluation: done in {t2 - t1:.0f} s; building GGUF files (F16, then quantized, gated)")
    builder = Builder(settings, bootstrap)
    builds = builder.build_all()
    t3 = time.perf_counter()
    failed = {k: v for k, v in builder.failures.all().items() if snap is not None and k == snap.id}
    say(f"builds: {len(builds)} in {t3 - t2:.0f} s; asking the Q4_K_M build one question")
    rows = compare_rows(settings)
    return {
        "snapshot": snap.id if snap else None,
        "manifest": snap.manifest if snap else None,
        "evaluation": rows,
        "table": render_table(rows),
        "builds": [b.describe() for b in builds],
        "build_failures": failed,
        "chat": _chat_once(settings),
        "timing_s": {
            "train": round(t1 - t0, 2),
            "evaluate": round(t2 - t1, 2),
            "build": round(t3 - t2, 2),
        },
    }


DEMO_QUESTION = "Ciao! Mi consigli un libro da leggere questa estate?"


CHAT_TRIES = 3


def _chat_once(settings: Settings) -> dict[str, Any] | None:
    """One answer from the newest published build of serving.quant, as `chat` gives it.

    Sampled as `corpusfactory chat` samples (serving.temperature), seeds 0, 1, 2 in
    turn until the answer is not empty: greedy decoding makes a barely tuned base
    model repeat the question, and a sample that opens with a blank line is cut there
    (a turn is one line). ``tries`` says how many samples it took.
    """
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
    answer, tries = "", 0
    try:
        while not answer and tries < CHAT_TRIES:
            params = GenerationParams(
                max_tokens=48,
                temperature=settings.serving.temperature,
                top_p=0.95,
                stop=chat_stops(fmt, ()),
                seed=tries,
            )
            tries += 1
            answer = reply(backend, [("user", DEMO_QUESTION)], fmt, params, io.StringIO())
    finally:
        backend.close()
    return {"model": backend.id, "question": DEMO_QUESTION, "answer": answer, "tries": tries}


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
    for snap_id, rec in result.get("build_failures", {}).items():
        lines.append(f"  build of {snap_id} failed at {rec.get('reason')}: {rec.get('error')}")
    chat = result["chat"]
    if chat:
        tries = chat.get("tries", 1)
        note = f", sample {tries} of {CHAT_TRIES}: the earlier ones were empty" if tries > 1 else ""
        answer = chat["answer"] or "(empty: every sample opened with a blank line)"
        lines += [f"  chat ({chat['model']}{note})", f"    > {chat['question']}", f"    {answer}"]
    lines += [f"  timing (s)                  {result['timing_s']}", "", result["table"], ""]
    return "\n".join(lines)


def _pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f} %" if whole else "-"


def _clip(text: str, width: int = 110) -> str:
    one = " ".join(text.split())
    return one if len(one) <= width else one[: width - 1] + "…"


def _examples(examples: dict[str, list[dict[str, Any]]]) -> list[str]:
    """A few decided turns: what the filter accepted and what it turned down, and why."""
    if not examples:
        return []
    lines = ["", "some decided turns (reason, NLL against its threshold, nearest neighbour)"]
    order = [Reason.ACCEPTED, *sorted(k for k in examples if k != Reason.ACCEPTED)]
    for reason in order:
        for ex in examples.get(reason, []):
            lines.append(
                f"  [{reason}] NLL {ex['nll']:.2f} (threshold {ex['nll_threshold']:.2f}), "
                f"cosine {ex['similarity']:.2f} to {ex['neighbour_id'] or '-'}"
            )
            lines.append(f"      turn:      {_clip(ex['text'])}")
            if ex.get("neighbour"):
                lines.append(f"      neighbour: {_clip(ex['neighbour'])}")
    return lines


def _summary(result: dict[str, Any]) -> str:
    p = result["producer"]
    c = result["corpus"]
    reasons = p["decisions"]
    decided = sum(reasons.values())
    accepted = reasons.get(Reason.ACCEPTED, 0)
    rejected = {k: v for k, v in reasons.items() if k != Reason.ACCEPTED}
    lines = [
        "",
        "corpusfactory demo: summary",
        f"  conversations finished      {p['finished']} (+{p['truncated']} truncated), "
        f"published {p['published']}",
        f"  turns decided               {decided}",
        f"  turns accepted              {accepted} ({_pct(accepted, decided)})",
        "  turns rejected              "
        + (
            ", ".join(f"{k} {v} ({_pct(v, decided)})" for k, v in sorted(rejected.items()))
            or "none"
        ),
        f"  empty generations           {p['empty_generations']}",
    ]
    q = {k: v for k, v in c["turns"]["nll_accepted"].items() if v is not None}
    if q:
        lines.append(
            "  NLL quantiles (accepted)    " + ", ".join(f"{k}={v:.3f}" for k, v in q.items())
        )
    t = result["throughput"]
    rate = c["turns"]["acceptance_rate"]
    lines += [
        f"  throughput                  {t['decided_turns_per_s']} decided turns/s, "
        f"generation {t['generated_per_s']} messages/s",
        f"  corpus on disk              {c['conversations']['total']} conversations "
        f"({c['conversations']['truncated']} truncated), {c['conversations']['messages']} "
        "messages, acceptance rate "
        + (f"{100.0 * rate:.1f} %" if isinstance(rate, int | float) else str(rate)),
        f"  timing (s)                  {result['timing_s']}",
    ]
    lines += _examples(result.get("examples", {}))
    lines.append("")
    return "\n".join(lines)


def run_demo(
    settings: Settings, conversations: int, keep_running: bool = False, train: bool = True
) -> int:
    from corpusfactory.engines.broker import EmbeddedBroker

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
        say("kafka: starting the embedded broker (KRaft, one node)")
        broker.start()
    try:
        result = run_pipeline(settings, conversations)
        if train:
            result["training"] = run_training(settings)
    finally:
        if broker is not None and not keep_running:
            broker.stop()
    out = settings.state_path / "demo-summary.json"
    write_json_atomic(out, result)
    print(_summary(result))
    if "training" in result:
        print(_training_summary(result["training"]))
    print(f"full figures: {out}")
    return 0
