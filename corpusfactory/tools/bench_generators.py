"""Generator backends compared on the demo's self-chat prompts (``bench generators``).

``run`` plays the producer's loop without Kafka: ``batch`` conversations, each
prompt built as the producer builds it (``producer.fewshot_k`` seed
conversations as examples, then the conversation so far, then the next role's
tag), generated ``rounds`` times in a row, every turn accepted, so each round's
prompts are the previous ones plus the turn just generated (what the llamacpp
backend's prompt cache sees in the factory). For each backend and batch size it
reports turns/s (generated turns per second of ``generate``) and tokens/s (the
tokens of the kept text, cut at the stop strings, counted with the model's own
tokenizer), each round's seconds (the first round prefills whole prompts, later
ones extend them), with the load average next to each figure: on a shared
machine the load says how far to trust it.

The model is Gemma 3 270M (``gemma3-270m``): the packaged Q4_K_M GGUF for
``llamacpp``, its bfloat16 Hugging Face directory for ``transformers`` (loaded as
bfloat16 and as float32). Decided turns/s end to end (generation, scoring,
admission, Kafka) is ``bench pipeline`` with the profile's backend.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from corpusfactory.chatformat import ChatFormat, Message
from corpusfactory.settings import Settings

# name -> (producer backend, model form, transformers dtype)
BACKENDS: dict[str, tuple[str, str, str]] = {
    "llamacpp": ("llamacpp", "gguf", "auto"),
    "transformers-bfloat16": ("transformers", "hf", "bfloat16"),
    "transformers-float32": ("transformers", "hf", "float32"),
}
MODEL = "gemma3-270m"


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _start_histories(
    settings: Settings, n: int, seed: int
) -> list[tuple[list[Any], list[Message]]]:
    """``n`` conversations: their few-shot examples and a history cut from a seed."""
    from corpusfactory.seeds import load_seeds

    p = settings.producer
    seeds = load_seeds(p.seed_file, p.seed_format)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = min(p.fewshot_k, len(seeds))
        examples = [list(s.messages) for s in rng.sample(seeds, k)] if k else []
        # Start part-way into a seed conversation, as a producer's rounds do.
        source = rng.choice(seeds).messages
        history = list(source[: rng.randrange(0, min(len(source), p.max_messages - 1))])
        out.append((examples, history))
    return out


def measure(
    generate: Callable[[list[str]], list[str]],
    count_tokens: Callable[[str], int],
    settings: Settings,
    batch: int,
    rounds: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Self-chat rounds of ``batch`` conversations through ``generate``; figures."""
    fmt = ChatFormat(settings.producer.user_tag, settings.producer.assistant_tag)
    convs = _start_histories(settings, batch, seed)
    generate([fmt.prompt([], "user")])  # warm-up (allocations, thread pools)
    seconds = 0.0
    round_s: list[float] = []
    turns = tokens = empty = 0
    prompt_tokens = 0
    samples: list[str] = []
    load_before = _load()
    for _ in range(rounds):
        prompts = []
        for examples, history in convs:
            role = "user" if len(history) % 2 == 0 else "assistant"
            prompts.append(fmt.prompt(history, role, examples))
        prompt_tokens += sum(count_tokens(x) for x in prompts)
        t = time.perf_counter()
        outs = generate(prompts)
        round_s.append(round(time.perf_counter() - t, 2))
        seconds += round_s[-1]
        for (_, history), raw in zip(convs, outs, strict=True):
            text = fmt.clean_generation(raw)
            turns += 1
            tokens += count_tokens(raw) if raw else 0
            if not text:
                empty += 1
                continue
            role = "user" if len(history) % 2 == 0 else "assistant"
            history.append(Message(role=role, text=text))
            if len(samples) < 6:
                samples.append(f"{fmt.tag(role)} {text}")
    return {
        "batch": batch,
        "rounds": rounds,
        "turns": turns,
        "empty_turns": empty,
        "seconds": round(seconds, 2),
        "round_seconds": round_s,
        "turns_per_s": round(turns / seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "mean_new_tokens": round(tokens / max(turns, 1), 1),
        "mean_prompt_tokens": round(prompt_tokens / max(turns, 1), 1),
        "load_avg_before": load_before,
        "load_avg_after": _load(),
        "samples": samples,
    }


def run(
    settings: Settings,
    *,
    backends: Sequence[str] = tuple(BACKENDS),
    batches: Sequence[int] = (1, 8),
    rounds: int = 3,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Turns/s and tokens/s of each backend at each batch size, on Gemma 3 270M.

    Uses ``settings.producer`` (its generation settings, few-shot count, tags, seed
    set, llamacpp options) and ``settings.models.models_dir``. ``threads`` sets
    both llama.cpp's and torch's threads (default: the usable cores).
    """
    import torch

    from corpusfactory.engines.models.registry import resolve_model
    from producers.generators.factory import make_generator
    from producers.generators.llamacpp import available_cores

    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backends {unknown}; choose from {sorted(BACKENDS)}")
    threads = threads or available_cores()
    torch.set_num_threads(threads)
    say = progress or (lambda _msg: None)
    p = settings.producer
    gen = p.generation
    stops = ChatFormat(p.user_tag, p.assistant_tag).stop_strings
    gguf = resolve_model(MODEL, settings.models.models_dir, form="gguf")
    # One tokenizer counts every backend's tokens (they tokenize alike).
    from producers.generators.llamacpp import LlamaCppGenerator

    counter = LlamaCppGenerator(gguf, batch=1, n_ctx=64)

    def count_tokens(text: str) -> int:
        return max(0, len(counter.tokenize(text)) - 1)  # without BOS

    results: list[dict[str, Any]] = []
    try:
        for name in backends:
            backend, form, dtype = BACKENDS[name]
            model = resolve_model(MODEL, settings.models.models_dir, form=form)
            for batch in batches:
                ps = p.model_copy(
                    update={
                        "backend": backend,
                        "dtype": dtype,
                        "in_flight": batch,
                        "llamacpp_batch": batch,
                        "llamacpp_threads": threads,
                    }
                )
                say(f"{name} batch {batch}: loading")
                t = time.perf_counter()
                generator = make_generator(ps, model, "cpu")
                load_s = time.perf_counter() - t

                def generate(prompts: list[str], g: Any = generator) -> list[str]:
                    out: list[str] = g.generate(prompts, gen, stops)
                    return out

                try:
                    say(f"{name} batch {batch}: {rounds} rounds")
                    figures = measure(
                        generate,
                        count_tokens,
                        settings,
                        batch,
                        rounds,
                    )
                finally:
                    generator.close()
                figures = {
                    "backend": name,
                    "generator": generator.id,
                    "load_s": round(load_s, 2),
                    **figures,
                }
                say(f"{name} batch {batch}: {figures['turns_per_s']} turns/s")
                results.append(figures)
    finally:
        counter.close()
    best = max(results, key=lambda r: r["turns_per_s"]) if results else None
    return {
        "benchmark": "generators",
        "model": MODEL,
        "threads": threads,
        "generation": gen.model_dump(),
        "fewshot_k": p.fewshot_k,
        "results": results,
        "fastest": {"backend": best["backend"], "batch": best["batch"]} if best else None,
        "note": "turns/s of generate() alone in self-chat rounds (every turn accepted); "
        "decided turns/s end to end: bench pipeline",
    }
