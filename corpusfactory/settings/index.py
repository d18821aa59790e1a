"""The vector index: the Milvus connection and how the index is prepared."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from corpusfactory.settings.base import _Section


class MilvusSettings(_Section):
    """The vector index."""

    uri: str | None = Field(
        None, description="Milvus server URI; unset means Milvus Lite at <state_dir>/index.db."
    )
    token: str | None = None
    collection: str = "turns"
    index_type: Literal["FLAT", "IVF_FLAT"] = "FLAT"
    timeout_s: float = Field(
        10.0,
        gt=0.0,
        le=600.0,
        description="Bound of one index call, pymilvus's own retries included.",
    )


class IndexSettings(_Section):
    """How the vector index is prepared."""

    seed_on_start: bool = Field(
        True, description="The admitter loads the seed messages into the index when it starts."
    )
