"""The vector index behind the diversity filter: Milvus (Lite by default).

One collection holds a vector per seed message and per accepted turn. Primary
keys are a 63-bit xxhash of the reference (the turn id, or ``seed:<id>``), so
writing the same turn twice (a replay, a crash between insert and commit) is an
upsert onto the same key and never a second vector (invariant I4).

Milvus Lite (``<state_dir>/index.db``) allows one process per file: only the
admitter opens it. ``MILVUS_URI`` points at a Milvus server or cluster instead.
Searches use Strong consistency so a vector written moments earlier is seen.

Every failure is sorted into the two kinds of :mod:`corpusfactory.errors`:
``IndexUnavailableError`` (the server is down, restarting or slow: retried by the
caller, nothing decided meanwhile) or ``IndexRecordError`` (Milvus refuses these
records, e.g. a key over its length: writing them again can never work). Records
are checked against the schema's limits before they are sent, so the second kind
is raised before anything of the batch is written. Every call carries
``milvus.timeout_s``, which bounds pymilvus's own retries. Messages carry the URI
without its credentials.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from corpusfactory.contract import DecisionLogRow
from corpusfactory.errors import (
    ConfigError,
    CorpusFactoryError,
    IndexRecordError,
    IndexUnavailableError,
)
from corpusfactory.redact import redact_uri
from corpusfactory.settings import Settings

log = logging.getLogger(__name__)


class _QuietRpcErrors(logging.Filter):
    """pymilvus logs every failed call with a whole traceback (about 11 KB) and then
    raises it; Milvus Lite answers "Method not implemented" to a timestamp call at
    every start. The caller reports each failure in one line, so these go."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "Method not implemented" in msg or msg.startswith(("RPC error", "Unexpected error")):
            return False
        # anything else from pymilvus: its first line, without the chained tracebacks
        record.msg, record.args = msg.split("\n", 1)[0], None
        record.exc_info = record.exc_text = record.stack_info = None
        return True


for _name in (
    "pymilvus.decorators",
    "pymilvus.client.grpc_handler",
    "pymilvus.client.connection_manager",
    "pymilvus.milvus_client",
):
    logging.getLogger(_name).addFilter(_QuietRpcErrors())

REF_MAX = 512  # bytes of a reference (the contract keeps turn ids to 256)
DECISION_MAX = 4096  # bytes of a decision-log row
DEFAULT_TIMEOUT_S = 10.0
KIND_SEED = "seed"
KIND_TURN = "turn"
KIND_EVAL = "eval"


def pk_for(ref: str) -> int:
    """A stable, non-negative int64 primary key for a reference string."""
    return xxhash.xxh64_intdigest(ref.encode("utf-8")) & 0x7FFF_FFFF_FFFF_FFFF


@dataclass(frozen=True)
class Neighbour:
    """A stored vector near a query: its ref and cosine similarity (the index's search
    result, and what the admission rules decide with)."""

    ref: str
    similarity: float


def index_uri(settings: Settings) -> str:
    return settings.milvus.uri or str(settings.state_path / "index.db")


def _one_line(exc: BaseException, most: int = 300) -> str:
    """An engine's error in one line (pymilvus messages can span a traceback)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= most else text[: most - 3] + "..."


def _is_record_error(exc: BaseException) -> bool:
    """Whether Milvus refused the records themselves (never worth retrying)."""
    try:
        from pymilvus.exceptions import (
            DataNotMatchException,
            DataTypeNotMatchException,
            MilvusException,
            ParamError,
            PrimaryKeyException,
        )
    except ImportError:  # pragma: no cover - pymilvus is a dependency
        return False
    if isinstance(
        exc, ParamError | DataTypeNotMatchException | DataNotMatchException | PrimaryKeyException
    ):
        return True
    if isinstance(exc, MilvusException) and getattr(exc, "is_input_error", False):
        return True
    text = str(exc).lower()
    return "exceeds max length" in text or "exceeds max_length" in text


def check_ref(ref: str) -> None:
    """Raise IndexRecordError for a reference the index cannot store."""
    try:
        size = len(ref.encode("utf-8"))
    except UnicodeEncodeError:
        raise IndexRecordError(f"reference is not valid UTF-8: {ref[:60]!r}") from None
    if size > REF_MAX:
        raise IndexRecordError(
            f"reference of {size} bytes is over the index's limit {REF_MAX}: {ref[:60]!r}..."
        )


# Milvus Lite runs its server inside the process that opens a file, and that server
# holds the file's lock until it is stopped: closing the client leaves it running,
# so no other process (an admitter started again, a check reading the index) could
# open the file until this one exits. The indexes of this process on each file are
# counted; the last one closed stops the server and frees the file.
_LITE_OPEN: dict[str, int] = {}
_LITE_LOCK = threading.Lock()


def _lite_opened(path: str) -> None:
    with _LITE_LOCK:
        key = os.path.abspath(path)
        _LITE_OPEN[key] = _LITE_OPEN.get(key, 0) + 1


def _lite_closed(path: str) -> None:
    key = os.path.abspath(path)
    with _LITE_LOCK:
        left = _LITE_OPEN.get(key, 0) - 1
        if left > 0:
            _LITE_OPEN[key] = left
            return
        _LITE_OPEN.pop(key, None)
    try:
        from milvus_lite.server_manager import server_manager_instance
    except ImportError:  # a pymilvus without Milvus Lite never opened a file
        return
    server_manager_instance.release_server(key)


class VectorIndex:
    """A narrow interface over one Milvus collection."""

    def __init__(
        self,
        uri: str,
        collection: str,
        dim: int,
        *,
        token: str | None = None,
        index_type: str = "FLAT",
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.uri = uri
        self.shown_uri = redact_uri(uri)
        self.collection = collection
        self.dim = dim
        self.timeout = timeout_s
        self._lite = "://" not in uri  # a Milvus Lite file
        self._closed = False
        if self._lite:
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
            _lite_opened(uri)
        try:
            self._open(token, index_type)
        except BaseException:
            if self._lite:
                _lite_closed(uri)
            raise

    def _open(self, token: str | None, index_type: str) -> None:
        """Connect and make sure the three collections exist and are loaded."""
        from pymilvus import MilvusClient

        collection = self.collection
        try:
            self._client: Any = MilvusClient(uri=self.uri, token=token or "", timeout=self.timeout)
            if not self._client.has_collection(collection):
                self._create(index_type)
            else:
                self._check_dim()
            self._client.load_collection(collection)
            self.log_collection = f"{collection}_decided"
            if not self._client.has_collection(self.log_collection):
                self._create_log()
            self._client.load_collection(self.log_collection)
            # The reserved part: evaluation items a turn must not come close to
            # (decontamination). Apart from the main collection, so a turn's nearest
            # neighbour for the diversity filter is never an evaluation item.
            self.reserved_collection = f"{collection}_reserved"
            if not self._client.has_collection(self.reserved_collection):
                self._create(index_type, self.reserved_collection)
            self._client.load_collection(self.reserved_collection)
        except CorpusFactoryError:
            raise
        except Exception as exc:
            from pymilvus.exceptions import ConnectionConfigException, ParamError

            msg = f"cannot open Milvus at {self.shown_uri!r}: {_one_line(exc)}"
            if isinstance(exc, ParamError | ConnectionConfigException):
                raise ConfigError([f"milvus.uri: {msg}"]) from None
            raise IndexUnavailableError(msg) from None

    @classmethod
    def from_settings(cls, settings: Settings, dim: int) -> VectorIndex:
        m = settings.milvus
        return cls(
            index_uri(settings),
            m.collection,
            dim,
            token=m.token,
            index_type=m.index_type,
            timeout_s=m.timeout_s,
        )

    def _failed(self, what: str, exc: BaseException) -> CorpusFactoryError:
        """The project error for an engine failure: the records' fault or the server's."""
        msg = f"{what} on {self.shown_uri!r}: {_one_line(exc)}"
        if _is_record_error(exc):
            return IndexRecordError(msg)
        return IndexUnavailableError(msg)

    def _create(self, index_type: str, name: str | None = None) -> None:
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("pk", DataType.INT64, is_primary=True)
        schema.add_field("ref", DataType.VARCHAR, max_length=REF_MAX)
        schema.add_field("kind", DataType.VARCHAR, max_length=16)
        schema.add_field("vec", DataType.FLOAT_VECTOR, dim=self.dim)
        params = self._client.prepare_index_params()
        params.add_index(field_name="vec", index_type=index_type, metric_type="COSINE")
        self._client.create_collection(
            name or self.collection, schema=schema, index_params=params, consistency_level="Strong"
        )

    def _create_log(self) -> None:
        """The decision log: every decided turn, accepted or not, by turn id.

        A turn scored again (a scorer restarted mid-batch, a replay) must get its
        first decision back, not a new one: a recomputed NLL can differ in the last
        bits and flip a borderline verdict. Milvus needs a vector in every
        collection; this one holds a constant 2-d placeholder and is never searched.
        """
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("pk", DataType.INT64, is_primary=True)
        schema.add_field("ref", DataType.VARCHAR, max_length=REF_MAX)
        schema.add_field("decision", DataType.VARCHAR, max_length=4096)
        schema.add_field("vec", DataType.FLOAT_VECTOR, dim=2)
        params = self._client.prepare_index_params()
        params.add_index(field_name="vec", index_type="FLAT", metric_type="L2")
        self._client.create_collection(
            self.log_collection, schema=schema, index_params=params, consistency_level="Strong"
        )

    def prior_decisions(self, refs: Sequence[str]) -> dict[str, DecisionLogRow]:
        """The logged decision of each of these turns that was decided before."""
        if not refs:
            return {}
        try:
            rows = self._client.query(
                self.log_collection,
                ids=[pk_for(r) for r in refs],
                output_fields=["ref", "decision"],
                consistency_level="Strong",
                timeout=self.timeout,
            )
        except Exception as exc:
            raise self._failed("decision log query failed", exc) from None
        return {row["ref"]: DecisionLogRow.from_dict(json.loads(row["decision"])) for row in rows}

    @staticmethod
    def check_log_rows(decisions: dict[str, DecisionLogRow]) -> None:
        """Raise IndexRecordError if the decision log could not hold these rows."""
        for ref, d in decisions.items():
            check_ref(ref)
            size = len(json.dumps(d.as_dict()).encode("utf-8"))
            if size > DECISION_MAX:
                raise IndexRecordError(
                    f"decision of {ref[:60]!r} has {size} bytes, over the log's {DECISION_MAX}"
                )

    def log_decisions(self, decisions: dict[str, DecisionLogRow]) -> None:
        """Record decisions by turn id (idempotent: same id, same row)."""
        if not decisions:
            return
        rows = [
            {"pk": pk_for(ref), "ref": ref, "decision": json.dumps(d.as_dict()), "vec": [0.0, 1.0]}
            for ref, d in decisions.items()
        ]
        self.check_log_rows(decisions)
        try:
            self._client.upsert(self.log_collection, rows, timeout=self.timeout)
        except Exception as exc:
            raise self._failed("decision log write failed", exc) from None

    def _check_dim(self) -> None:
        desc = self._client.describe_collection(self.collection)
        for f in desc.get("fields", []):
            if f.get("name") == "vec":
                have = int(f.get("params", {}).get("dim", 0))
                if have != self.dim:
                    raise ConfigError(
                        [
                            f"collection {self.collection!r} at {self.shown_uri!r} has dimension "
                            f"{have}, but the embedder gives {self.dim}: use another collection "
                            "name (milvus.collection) or a fresh state directory"
                        ]
                    )

    def _name(self, reserved: bool) -> str:
        return self.reserved_collection if reserved else self.collection

    def search(
        self, vectors: np.ndarray, exclude: Sequence[str] | None = None, reserved: bool = False
    ) -> list[Neighbour | None]:
        """Nearest stored neighbour by cosine for each row, skipping ``exclude[i]`` itself.

        None when the index holds nothing else. Two hits are fetched so that a turn
        already stored (a replay) reports its nearest *other* neighbour.
        """
        if len(vectors) == 0:
            return []
        try:
            res = self._client.search(
                self._name(reserved),
                data=[v.tolist() for v in vectors],
                limit=2,
                output_fields=["ref"],  # never ask for vectors: that costs ~100 ms a search
                search_params={"metric_type": "COSINE"},
                consistency_level="Strong",
                timeout=self.timeout,
            )
        except Exception as exc:
            raise self._failed("search failed", exc) from None
        out: list[Neighbour | None] = []
        for i, hits in enumerate(res):
            skip = exclude[i] if exclude else None
            best = next((h for h in hits if h["entity"]["ref"] != skip), None)
            out.append(
                None if best is None else Neighbour(best["entity"]["ref"], float(best["distance"]))
            )
        return out

    def existing(self, refs: Sequence[str], reserved: bool = False) -> set[str]:
        """Which of these references already have a vector (replay detection)."""
        if not refs:
            return set()
        try:
            rows = self._client.query(
                self._name(reserved),
                ids=[pk_for(r) for r in refs],
                output_fields=["ref"],
                consistency_level="Strong",
                timeout=self.timeout,
            )
        except Exception as exc:
            raise self._failed("query failed", exc) from None
        return {row["ref"] for row in rows}

    def upsert(
        self, refs: Sequence[str], vectors: np.ndarray, kind: str, reserved: bool = False
    ) -> None:
        """Write vectors under idempotent keys (same ref -> same row)."""
        if not refs:
            return
        for r in refs:
            check_ref(r)
        if vectors.shape != (len(refs), self.dim) or not np.isfinite(vectors).all():
            raise IndexRecordError(
                f"vectors of shape {vectors.shape} (finite: {bool(np.isfinite(vectors).all())}) "
                f"for {len(refs)} references of dimension {self.dim}"
            )
        rows = [
            {"pk": pk_for(r), "ref": r, "kind": kind, "vec": v.tolist()}
            for r, v in zip(refs, vectors, strict=True)
        ]
        try:
            self._client.upsert(self._name(reserved), rows, timeout=self.timeout)
        except Exception as exc:
            raise self._failed("upsert failed", exc) from None

    def count(self, kind: str | None = None, reserved: bool = False) -> int:
        flt = f'kind == "{kind}"' if kind else "pk >= 0"
        try:
            rows = self._client.query(
                self._name(reserved),
                filter=flt,
                output_fields=["count(*)"],
                consistency_level="Strong",
                timeout=self.timeout,
            )
        except Exception as exc:
            raise self._failed("count failed", exc) from None
        return int(rows[0]["count(*)"]) if rows else 0

    def refs(self, kind: str | None = None) -> list[str]:
        """Every stored reference (for invariant checks), read with an iterator."""
        flt = f'kind == "{kind}"' if kind else "pk >= 0"
        out: list[str] = []
        it = self._client.query_iterator(
            self.collection, batch_size=1000, filter=flt, output_fields=["ref"]
        )
        try:
            while rows := it.next():
                out.extend(r["ref"] for r in rows)
        finally:
            it.close()
        return out

    def stats(self) -> dict[str, Any]:
        return {
            "uri": self.shown_uri,
            "collection": self.collection,
            "dim": self.dim,
            "vectors": self.count(),
            "seed_vectors": self.count(KIND_SEED),
            "turn_vectors": self.count(KIND_TURN),
            "reserved_eval_vectors": self.count(KIND_EVAL, reserved=True),
        }

    def close(self) -> None:
        """Close the client; the last index of this process on a Milvus Lite file also
        stops the embedded server, which frees the file for another process. Closing
        twice does nothing more."""
        try:
            self._client.close()
        except Exception as exc:  # closing a dead connection is not worth failing a shutdown for
            log.warning("closing Milvus client failed: %s", exc)
        if self._lite and not self._closed:
            _lite_closed(self.uri)
        self._closed = True
