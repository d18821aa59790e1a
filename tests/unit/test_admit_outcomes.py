"""What the admitter decides for awkward batches, on a real Milvus Lite index.

One turn sent twice in a batch, a turn id reused for another text, a record the
index cannot hold: each gets exactly one first decision or one permanent error,
and nothing of a refused turn is written. The scored turns are built by hand
(unit vectors, fixed NLLs): the point is the bookkeeping, not the models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from corpusfactory import contract
from corpusfactory.engines.index import KIND_TURN, VectorIndex
from corpusfactory.errors import (
    ConflictError,
    IndexRecordError,
    IndexUnavailableError,
    is_transient,
)
from corpusfactory.settings import Settings, load_settings
from streams.admit import Admitter

# Loads a model, runs an engine or builds files: the second tier (make test-fast skips it).
pytestmark = pytest.mark.slow

DIM = 8


def settings(tmp_path: Path) -> Settings:
    return load_settings(
        None,
        environ={},
        overrides={"state_dir": str(tmp_path), "index": {"seed_on_start": False}},
    )


def scored(turn_id: str, text: str, axis: int, nll: float = 1.0) -> contract.ScoredTurn:
    vec = np.zeros(DIM, dtype=np.float32)
    vec[axis] = 1.0
    conv = turn_id.split(":")[0]
    return contract.ScoredTurn(
        schema_version=1,
        candidate=contract.CandidateTurn(
            schema_version=1,
            turn_id=turn_id,
            conversation_id=conv,
            index=0,
            role="user",
            text=text,
        ),
        precheck="",
        embedding=[float(x) for x in vec],
        nll=nll,
        tokens=5,
        embedder="unit",
        scorer="unit",
        nll_threshold=2.0,
    )


@pytest.fixture
def admitter(tmp_path: Path):
    s = settings(tmp_path)
    a = Admitter(s, VectorIndex.from_settings(s, DIM))
    yield a
    assert a.index is not None
    a.index.close()


def test_one_turn_twice_in_a_batch_gets_one_first_decision_and_one_replay(admitter) -> None:
    batch = [
        scored("a:0:0", "Il pane si fa con farina.", 0),
        scored("b:0:0", "Una frase scartata.", 1, nll=9.0),
        scored("a:0:0", "Il pane si fa con farina.", 0),
        scored("b:0:0", "Una frase scartata.", 1, nll=9.0),
    ]
    out = admitter.admit(batch)
    assert [(d.turn_id, d.accepted, d.reason, d.replayed) for d in out] == [
        ("a:0:0", True, "accepted", False),
        ("b:0:0", False, "low_quality", False),
        ("a:0:0", True, "accepted", True),
        ("b:0:0", False, "low_quality", True),
    ]
    assert admitter.index.count(KIND_TURN) == 1
    # In a later batch both are replays of the same first decisions.
    later = admitter.admit(batch[:2])
    assert [(d.accepted, d.reason, d.replayed) for d in later] == [
        (True, "accepted", True),
        (False, "low_quality", True),
    ]
    assert admitter.index.count(KIND_TURN) == 1


def test_a_turn_id_reused_for_another_text_is_a_conflict_not_a_replay(admitter) -> None:
    first = admitter.admit([scored("c:0:0", "Testo originale.", 2)])
    assert first[0].accepted and not first[0].replayed
    # the same id with another text, in a later batch and twice in one batch
    out = admitter.admit(
        [
            scored("c:0:0", "Un altro testo.", 3),
            scored("d:0:0", "Prima versione.", 4),
            scored("d:0:0", "Seconda versione.", 5),
        ]
    )
    assert isinstance(out[0], ConflictError) and "another text" in str(out[0])
    assert isinstance(out[1], contract.Decision) and out[1].accepted
    assert isinstance(out[2], ConflictError)
    assert not is_transient(out[0])
    # nothing of the conflicting texts was written: two vectors, the first texts'
    assert sorted(admitter.index.refs(KIND_TURN)) == ["c:0:0", "d:0:0"]
    # the original text still replays its decision
    again = admitter.admit([scored("c:0:0", "Testo originale.", 2)])
    assert again[0].accepted and again[0].replayed


def test_a_record_the_index_cannot_hold_fails_alone_before_any_write(admitter) -> None:
    long_id = "x" * 600  # passes no contract, but the admitter must not trust that
    out = admitter.admit(
        [
            scored("e:0:0", "Una frase valida.", 6),
            scored(long_id, "Un id troppo lungo.", 7),
        ]
    )
    assert isinstance(out[0], contract.Decision) and out[0].accepted
    assert isinstance(out[1], IndexRecordError) and "600 bytes" in str(out[1])
    assert admitter.index.refs(KIND_TURN) == ["e:0:0"]
    assert admitter.index.prior_decisions([long_id]) == {}


def test_an_embedding_of_another_dimension_fails_alone(admitter) -> None:
    bad = scored("f:0:0", "Vettore corto.", 0)
    bad.embedding = bad.embedding[:4]
    out = admitter.admit([bad, scored("g:0:0", "Vettore giusto.", 1)])
    assert isinstance(out[0], IndexRecordError) and "dimension 4" in str(out[0])
    assert isinstance(out[1], contract.Decision) and out[1].accepted


def test_an_unreachable_server_is_unavailable_and_its_uri_loses_its_password() -> None:
    with pytest.raises(IndexUnavailableError) as info:
        VectorIndex("http://admin:s3cret@127.0.0.1:9", "turns", DIM, timeout_s=2.0)
    assert is_transient(info.value)
    assert "s3cret" not in str(info.value) and "127.0.0.1:9" in str(info.value)
