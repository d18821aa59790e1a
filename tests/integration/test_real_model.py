"""The factory on the real models, small: Gemma 3 270M (its packaged Q4_K_M, llama.cpp)
writes self-chat conversations through the broker, the workers and the demo's Italian
scorer; the trainer fine-tunes a LoRA snapshot of Gemma 3 270M on the accepted corpus
(DeepSpeed on CPU, merged); llama.cpp's converter makes its F16 and Q4_K_M GGUF files,
the gate passes them against the snapshot, and the Q4_K_M build answers in chat.

This is what `make demo` does, at the smallest size that still runs every real piece;
the other integration tests use the tiny models for speed.
"""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors import safe_open

from consumers.store import CorpusStore
from consumers.writer import CorpusWriter
from corpusfactory.chatformat import ChatFormat
from corpusfactory.engines.models.registry import resolve_model
from producers.generators.factory import make_generator
from producers.service import SelfChatProducer
from serving.backends import GenerationParams
from serving.builder import Builder
from serving.chat import open_model, reply
from serving.server.prompts import chat_stops
from tests.integration.conftest import make_settings
from tests.integration.pipeline_util import Stack, worker_stack
from training.service import Trainer

pytestmark = pytest.mark.integration

CONVERSATIONS = 3
# Words no Italian text of a few sentences goes without.
ITALIAN = {"il", "la", "di", "che", "e", "un", "una", "per", "non", "è", "in", "mi", "ti"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, kafka_bootstrap, built_models) -> Iterator[Stack]:
    settings = make_settings(
        tmp_path_factory.mktemp("real"),
        kafka_bootstrap,
        f"t{uuid.uuid4().hex[:8]}.",
        models={"generator": "gemma3-270m", "scorer": "demo:italian-scorer"},
        producer={
            "backend": "llamacpp",
            "llamacpp_threads": 1,
            "in_flight": CONVERSATIONS,
            "fewshot_k": 1,
            "min_messages": 2,
            "max_messages": 2,
            "generation": {"max_new_tokens": 40, "temperature": 0.8, "top_p": 0.95},
        },
        training={
            "base_model": "gemma3-270m",
            "deepspeed_config": "cpu",
            "precision": "fp32",
            "lora": {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            "seq_len": 128,
            "micro_batch_size": 2,
            "max_steps": 1,
            "learning_rate": 1e-4,
            "warmup_steps": 0,
            "heldout_percent": 0,
            "poll_timeout_s": 0.5,
            "trigger": {"every_conversations": 1},
        },
        serving={"quants": ["Q4_K_M"], "quant": "Q4_K_M", "gate_texts": 2, "gate_max_tokens": 64},
    )
    with worker_stack(settings, kafka_bootstrap) as running:
        yield running


def _words(text: str) -> set[str]:
    return {w.strip(".,;:!?«»\"'()").lower() for w in text.split()}


def test_gemma_self_chat_through_the_pipeline_writes_italian(stack: Stack, tmp_path: Path) -> None:
    s = stack.settings.model_copy(deep=True)
    s.producer.conversations = CONVERSATIONS
    s.producer.producer_id = "p-gemma"
    gen = make_generator(s.producer, resolve_model("gemma3-270m", form="gguf"), "cpu")
    assert gen.id == "llamacpp:gemma-3-270m-q4_k_m.gguf"
    try:
        stats = asyncio.run(SelfChatProducer(s, stack.bootstrap, gen).run())
    finally:
        gen.close()
    assert stats.finished + stats.truncated == CONVERSATIONS
    assert stats.finished >= 1, stats.as_dict()
    assert sum(stats.decisions.values()) >= stats.candidates_sent - stats.resent

    with CorpusWriter(s, stack.bootstrap) as writer:
        assert writer.run_once(60.0).drained
    out = tmp_path / "corpus.jsonl"
    CorpusStore(s.state_path / "corpus", read_only=True).export(out)
    corpus = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    mine = [c for c in corpus if c["producer_id"] == "p-gemma"]
    assert len(mine) == stats.finished
    texts = [t["text"] for c in mine for t in c["turns"]]
    assert all(t.strip() for t in texts)
    # Real Italian: the turns together use common Italian words; every stored turn was
    # scored by the Italian scorer.
    assert len(set().union(*map(_words, texts)) & ITALIAN) >= 3, texts
    for c in mine:
        assert c["generator"] == gen.id
        for t in c["turns"]:
            assert "italian-scorer" in t["scorer"] and t["nll"] > 0, t


def test_a_lora_snapshot_of_gemma_is_built_gated_and_answers(stack: Stack) -> None:
    s = stack.settings
    with Trainer(s, stack.bootstrap) as trainer:
        snap = trainer.run_once()
    assert snap is not None, "no snapshot: the accepted corpus was empty"
    manifest = json.loads((snap.path / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["base_model"] == "gemma3-270m" and manifest["steps"] == 1
    # LoRA merged before publishing: a plain Gemma 3 checkpoint, no adapter tensors.
    names: list[str] = []
    for f in snap.path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            names += list(st.keys())
    assert any("q_proj" in n for n in names) and not any("lora" in n for n in names)
    assert (snap.path / "tokenizer.model").is_file()

    builds = Builder(s, stack.bootstrap).build_all()
    assert [b.quant for b in builds] == ["F16", "Q4_K_M"]
    for b in builds:
        gate = b.record["gate"]
        assert b.published and gate["passed"], gate
        assert gate["tokens"] > 0 and gate["top1_agreement"] > 0.8

    fmt = ChatFormat(s.producer.user_tag, s.producer.assistant_tag)
    backend = open_model(s, None)
    try:
        assert backend.id.endswith("Q4_K_M")
        answer = ""
        for seed in range(3):
            params = GenerationParams(
                max_tokens=32, temperature=0.7, top_p=0.95, stop=chat_stops(fmt, ()), seed=seed
            )
            answer = reply(
                backend, [("user", "Qual è la capitale d'Italia?")], fmt, params, io.StringIO()
            )
            if answer:
                break
    finally:
        backend.close()
    assert answer.strip(), "the Q4_K_M build gave no answer in three samples"
