"""A self-chat producer outlives an outage of its generator's server.

The generator is the OpenAI-compatible backend against a scripted server (a real
server cannot be made to answer 503 on demand) that fails every request of the
first rounds; the producer, on the real broker, logs one line a try, waits, and
generates again, so its candidates reach ``turns.candidates`` once the server
answers. Nothing was sent for the failed rounds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

import pytest

from corpusfactory import contract
from corpusfactory.kafka_clients import ensure_topics
from producers.generators.openai_compat import OpenAICompatGenerator
from producers.service import SelfChatProducer
from tests.integration.conftest import make_settings
from tests.integration.pipeline_util import read_topic
from tests.unit.test_generators import FakeRateLimitedServer

pytestmark = pytest.mark.integration


class ScriptedServer(FakeRateLimitedServer):
    """The scripted server, answering each prompt with a plain Italian sentence."""

    @staticmethod
    def completion(body: Any) -> dict[str, Any]:
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        choices = [
            {"index": i, "text": f" Una frase numero {i} per la prova.", "finish_reason": "stop"}
            for i, _ in enumerate(prompts)
        ]
        return {"id": "cmpl-1", "object": "text_completion", "choices": choices}


def test_the_producer_waits_out_an_unavailable_generator(tmp_path, kafka_bootstrap, caplog) -> None:
    s = make_settings(
        tmp_path / "state",
        kafka_bootstrap,
        f"t{uuid.uuid4().hex[:8]}.",
        producer={"in_flight": 2, "conversations": 2, "producer_id": "p-outage"},
    )
    ensure_topics(s, kafka_bootstrap)
    down = [(503, {}, {"error": "overloaded"})] * 2  # two whole rounds fail (no retries)
    with ScriptedServer(down) as server:
        gen = OpenAICompatGenerator(server.base_url, "tiny", max_retries=0, timeout_s=5.0)
        producer = SelfChatProducer(s, kafka_bootstrap, gen)

        async def run_until_sent() -> None:
            stop = asyncio.Event()
            task = asyncio.create_task(producer.run(stop))
            topic = s.topic(contract.CANDIDATES)
            for _ in range(600):
                await asyncio.sleep(0.1)
                if task.done() or await asyncio.to_thread(read_topic, kafka_bootstrap, topic):
                    break
            stop.set()
            await asyncio.wait_for(task, 60)

        with caplog.at_level(logging.ERROR, logger="producers.service"):
            try:
                asyncio.run(run_until_sent())
            finally:
                gen.close()
    tries = [r.getMessage() for r in caplog.records if "generator unavailable" in r.getMessage()]
    assert len(tries) == 2 and "HTTP 503" in tries[0]
    assert all(r.exc_info is None for r in caplog.records)  # one line a try, no traceback
    sent = [json.loads(r.value) for r in read_topic(kafka_bootstrap, s.topic(contract.CANDIDATES))]
    assert sent and all(c["text"] for c in sent)
    assert len(server.requests) >= 3  # the two failures, then the round that was sent
