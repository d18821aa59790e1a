"""``corpusfactory bench pipeline``: the streaming factory against its slowest stage.

Two measurements in one run, same machine, same models, same settings:

1. **Each stage alone**, in this process, with nothing else running: the producer's
   generator on batches of ``producer.in_flight`` prompts (self-chat turns built from
   the seeds as the producer builds them), the scorer's models (prechecks, NLL,
   embedding; ``streams.score.ScoringModels``) on those turns in batches of
   ``admission.score_batch_size``, and the admitter (``streams.admit.Admitter``, a
   fresh Milvus Lite index) on the scored turns in batches of
   ``admission.admit_batch_size``. Each gives turns/s.
2. **The pipeline**: the embedded broker (unless ``KAFKA_BOOTSTRAP_SERVERS``), a scorer
   and an admitter process, and the self-chat producer, on a fresh state directory:
   decided turns/s end to end, and the round trip of a turn split into the stages'
   busy time and the rest (Kafka transport, batching windows, queueing).

``efficiency`` = pipeline turns/s / the slowest stage's turns/s alone. Alone, each stage
has every core; in the pipeline they share them, so ``shared_core_bound`` also states
the best a pipeline of these stages could do on shared cores: 1 / (the sum over stages
of seconds per turn alone), reached only if every stage kept the cores busy all the
time and nothing else ran. ``efficiency_vs_shared_bound`` is the pipeline against that.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from corpusfactory.settings import Settings, load_settings
from corpusfactory.tools.bench_machine import machine


def _self_chat_turns(settings: Settings, conversations: int, rounds: int) -> dict[str, Any]:
    """Generate ``rounds`` turns of ``conversations`` self-chats in batches of
    ``producer.in_flight``, as the producer does; turns/s and the candidate turns."""
    from corpusfactory.chatformat import ChatFormat
    from corpusfactory.engines.models.registry import form_for_backend, resolve_model
    from corpusfactory.seeds import load_seeds
    from producers.conversation import Conversation
    from producers.generators.factory import make_generator

    p = settings.producer
    fmt = ChatFormat(p.user_tag, p.assistant_tag)
    seeds = load_seeds(p.seed_file, p.seed_format)
    rng = random.Random(p.rng_seed)
    model = resolve_model(
        settings.models.generator, settings.models.models_dir, form=form_for_backend(p.backend)
    )
    generator = make_generator(p, model, settings.models.device)
    convs = []
    for i in range(conversations):
        examples = rng.sample(seeds, min(p.fewshot_k, len(seeds)))
        conv = Conversation(f"bench-{i}", "selfchat", rounds + 1, [s.id for s in examples])
        convs.append((conv, [list(s.messages) for s in examples]))
    candidates = []
    busy = 0.0
    try:
        generator.generate(["Ciao"], p.generation, fmt.stop_strings)  # warm-up
        for _ in range(rounds):
            for start in range(0, len(convs), max(1, p.in_flight)):
                batch = convs[start : start + max(1, p.in_flight)]
                prompts = [fmt.prompt(c.history(), c.next_role(), ex) for c, ex in batch]
                t = time.perf_counter()
                raw = generator.generate(prompts, p.generation, fmt.stop_strings)
                busy += time.perf_counter() - t
                for (conv, _), out in zip(batch, raw, strict=True):
                    text = fmt.clean_generation(out) or "..."
                    cand = conv.new_pending(text, generator.id, time.time(), "bench")
                    candidates.append(cand)
                    conv.pending = None  # keep generating: the bench decides nothing
                    conv.messages.append(_accepted(cand))
    finally:
        generator.close()
    return {"turns": len(candidates), "seconds": busy, "candidates": candidates}


def _accepted(cand: Any) -> Any:
    from corpusfactory.contract import AcceptedTurn

    return AcceptedTurn(
        turn_id=cand.turn_id,
        role=cand.role,
        text=cand.text,
        nll=0.0,
        similarity=0.0,
        neighbour_id="",
        embedder="",
        scorer="",
    )


def _score_alone(settings: Settings, candidates: list[Any]) -> dict[str, Any]:
    from streams.score import ScoringModels

    models = ScoringModels.load(settings)
    size = max(1, settings.admission.score_batch_size)
    try:
        models.score(candidates[:size], settings)  # warm-up
        scored = []
        t = time.perf_counter()
        for start in range(0, len(candidates), size):
            scored.extend(models.score(candidates[start : start + size], settings))
        took = time.perf_counter() - t
    finally:
        models.close()
    return {"turns": len(scored), "seconds": took, "scored": scored}


def _admit_alone(settings: Settings, scored: list[Any]) -> dict[str, Any]:
    from streams.admit import Admitter

    admitter = Admitter(settings)
    admitter.prepare()
    size = max(1, settings.admission.admit_batch_size)
    decided = 0
    t = time.perf_counter()
    for start in range(0, len(scored), size):
        out = admitter.admit(scored[start : start + size])
        decided += sum(1 for o in out if not isinstance(o, Exception))
    took = time.perf_counter() - t
    if admitter.index is not None:
        admitter.index.close()
    return {"turns": decided, "seconds": took}


def stages_alone(settings: Settings, conversations: int, rounds: int) -> dict[str, Any]:
    """Turns/s of each stage alone (see the module docstring): every stage with torch's
    default threads (every core), whatever the settings give each process."""
    import torch

    cores = torch.get_num_threads()
    settings = settings.model_copy(deep=True)
    settings.producer.torch_threads = 0
    gen = _self_chat_turns(settings, conversations, rounds)
    torch.set_num_threads(cores)
    score = _score_alone(settings, gen["candidates"])
    torch.set_num_threads(cores)
    admit = _admit_alone(settings, score["scored"])
    out: dict[str, Any] = {}
    for name, r in (("generate", gen), ("score", score), ("admit", admit)):
        out[name] = {
            "turns": r["turns"],
            "seconds": round(r["seconds"], 3),
            "turns_per_s": round(r["turns"] / r["seconds"], 3) if r["seconds"] else None,
        }
    return out


def bench_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    from corpusfactory.engines.broker import EmbeddedBroker
    from corpusfactory.tools.demo import run_pipeline

    rounds = max(1, int(getattr(args, "rounds", 3) or 3))
    with tempfile.TemporaryDirectory(prefix="cf-bench-alone-") as tmp:
        s = load_settings(args.config, overrides={"state_dir": tmp})
        alone = stages_alone(s, args.conversations, rounds)
    with tempfile.TemporaryDirectory(prefix="cf-bench-") as tmp:
        s = load_settings(args.config, overrides={"state_dir": tmp})
        broker = None
        if not s.kafka.bootstrap_servers:
            broker = EmbeddedBroker(Path(tmp))
            broker.start()
        try:
            result = run_pipeline(s, args.conversations)
        finally:
            if broker is not None:
                broker.stop()
    p = result["producer"]
    wall = p["wall_s"]
    decided = sum(p["decisions"].values())
    n = max(decided, 1)
    busy = {"generate": p["generate_s"], **p["stage_s"]}
    per_turn = {k: v / n for k, v in busy.items()}
    # What a turn's round trip spent outside the worker stages: Kafka transport,
    # batching windows, queueing behind other turns.
    roundtrip = p["roundtrip_s"] / n
    per_turn["kafka_and_queueing"] = max(
        0.0, roundtrip - sum(per_turn.get(k, 0.0) for k in ("embed", "score", "admit"))
    )
    total_busy = sum(busy.values())
    rate = decided / wall if wall else 0.0
    rates = {k: v["turns_per_s"] for k, v in alone.items() if v["turns_per_s"]}
    slowest = min(rates, key=lambda k: rates[k])
    shared_bound = 1.0 / sum(1.0 / r for r in rates.values())
    return {
        "benchmark": "pipeline",
        "conversations": args.conversations,
        "in_flight": s.producer.in_flight,
        "stages_alone": alone,
        "slowest_stage": slowest,
        "decided_turns": decided,
        "decisions": p["decisions"],
        "wall_s": round(wall, 2),
        "decided_turns_per_s": round(rate, 3),
        "efficiency": round(rate / rates[slowest], 4),
        "shared_core_bound_turns_per_s": round(shared_bound, 3),
        "efficiency_vs_shared_bound": round(rate / shared_bound, 4),
        "per_turn_s": {k: round(v, 4) for k, v in per_turn.items()},
        "busy_seconds": {k: round(v, 3) for k, v in busy.items()},
        "busy_share": {k: round(v / total_busy, 4) for k, v in busy.items()},
        "mean_roundtrip_s": round(roundtrip, 3),
        "generate_batches": p.get("generate_batches"),
        "startup_s": result["timing_s"],
        "machine": machine(),
        "note": "stages alone each have every core; in the pipeline the producer, scorer "
        "and admitter are separate processes sharing them (busy_share is a share of the "
        "summed busy time, not of wall)",
    }
