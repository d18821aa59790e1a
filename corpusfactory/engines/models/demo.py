"""The demo models: a tiny generator and a tiny scorer, trained here on the seed set.

The pipeline needs a causal LM to generate turns and a masked LM to score them.
Without any model hub, ``build_demo_models`` makes both from the built-in Italian
seed conversations in a couple of minutes on a laptop CPU:

* tokenizers trained on the seed text only: for the generator a SentencePiece BPE
  model (``tokenizer.model``, trained with ``sentencepiece``: byte fallback, the chat
  role tags as user-defined pieces that are never split), read by transformers as a
  ``LlamaTokenizer``; for the scorer a cased WordPiece (``tokenizers`` library). The
  generator's tokenizer is SentencePiece so that llama.cpp's maintained converter
  (``serving.gguf.convert``) builds it as it builds Llama, Mistral and Gemma
  checkpoints, and llama.cpp then tokenizes exactly as transformers does;
* ``generator``: a small ``LlamaForCausalLM`` trained on the seed conversations in
  the chat format (``[|Umano|]`` / ``[|Assistente|]``), one ``</s>`` after each;
* ``scorer``: a small ``BertForMaskedLM`` trained with standard 15% masking on the
  seed messages and sentences.

This module keys, caches and assembles the build; ``demo_generator`` and ``demo_scorer``
train the two models, with the helpers of ``demo_training``.

They are toys: they imitate the seed set and nothing else. Use them to run and
test the pipeline end to end; point the settings at real models for real corpora.

The build is deterministic (fixed seeds, a fixed number of steps) and cached in
``<models_dir>/<key>`` where ``models_dir`` defaults to
``$CORPUSFACTORY_CACHE/models`` (``~/.cache/corpusfactory/models``) and ``key``
hashes the seed file, ``BUILDER_VERSION`` and the hyper-parameters. A build happens
in a temporary directory that is renamed into place once complete, with a marker
file written last, so an interrupted build is redone and a finished one is reused
at once. A file lock keeps concurrent processes from building the same key twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from corpusfactory.cache import MARKER, cached_build, models_root
from corpusfactory.chatformat import Message
from corpusfactory.engines.models.demo_generator import GeneratorHParams, build_generator
from corpusfactory.engines.models.demo_scorer import ScorerHParams, build_scorer
from corpusfactory.errors import ModelError

log = logging.getLogger(__name__)

# Bump whenever the build changes in a way the hyper-parameters do not show.
# 3: the generator's tokenizer is a SentencePiece BPE model (was a byte-level BPE).
BUILDER_VERSION = "3"

DEMO_PREFIX = "demo:"


@dataclass(frozen=True)
class DemoModels:
    """Where the built demo models are: two directories loadable with Auto* classes."""

    generator: Path
    scorer: Path
    root: Path
    key: str


# -- paths and keys ---------------------------------------------------------------


def default_seed_file() -> Path:
    """The built-in Italian seed set."""
    from corpusfactory.seeds import builtin_seed_path

    return builtin_seed_path()


def default_models_dir() -> Path:
    """``$CORPUSFACTORY_CACHE/models``, by default ``~/.cache/corpusfactory/models``."""
    return models_root()


def _scaled(steps: int, scale: float) -> int:
    return max(1, round(steps * scale))


def _hparams(steps_scale: float) -> tuple[GeneratorHParams, ScorerHParams]:
    if not steps_scale > 0:
        raise ValueError("steps_scale must be positive")
    gen, sco = GeneratorHParams(), ScorerHParams()
    gen = dataclasses.replace(gen, steps=_scaled(gen.steps, steps_scale))
    sco = dataclasses.replace(sco, steps=_scaled(sco.steps, steps_scale))
    return gen, sco


def build_key(seed_bytes: bytes, gen: GeneratorHParams, sco: ScorerHParams) -> str:
    """sha256 over the seed file, BUILDER_VERSION and the hyper-parameters, first 16 hex."""
    h = hashlib.sha256()
    h.update(seed_bytes)
    h.update(b"\0" + BUILDER_VERSION.encode())
    params = {"generator": dataclasses.asdict(gen), "scorer": dataclasses.asdict(sco)}
    h.update(b"\0" + json.dumps(params, sort_keys=True).encode())
    return h.hexdigest()[:16]


# -- public API ---------------------------------------------------------------------


def cache_key(seed_file: Path | str | None = None, steps_scale: float = 1.0) -> str:
    """The cache key ``build_demo_models`` uses for this seed file and step scale."""
    seed_path = Path(seed_file) if seed_file is not None else default_seed_file()
    return build_key(_read_seed_bytes(seed_path), *_hparams(steps_scale))


def _read_seed_bytes(seed_path: Path) -> bytes:
    try:
        return seed_path.read_bytes()
    except OSError as exc:
        raise ModelError(
            f"cannot read the seed file {seed_path} for the demo models: {exc}"
        ) from exc


def build_demo_models(
    models_dir: Path | str | None = None,
    force: bool = False,
    *,
    seed_file: Path | str | None = None,
    steps_scale: float = 1.0,
) -> DemoModels:
    """Build the demo models, or reuse the cached build; return their directories.

    ``models_dir`` defaults to ``default_models_dir()``; ``force`` rebuilds even if a
    complete build exists; ``seed_file`` defaults to the built-in seed set;
    ``steps_scale`` multiplies the training steps (tests use a small value for a fast,
    still deterministic build — a different scale is a different cache key).
    """
    seed_path = Path(seed_file) if seed_file is not None else default_seed_file()
    seed_bytes = _read_seed_bytes(seed_path)
    gen_hp, sco_hp = _hparams(steps_scale)
    key = build_key(seed_bytes, gen_hp, sco_hp)
    root = models_root(models_dir) / key
    result = DemoModels(generator=root / "generator", scorer=root / "scorer", root=root, key=key)
    cached_build(
        root,
        lambda tmp: _build_into(tmp, seed_path, seed_bytes, gen_hp, sco_hp, key),
        force=force,
    )
    return result


def resolve_model(name: str, models_dir: Path | str | None = None) -> str:
    """``demo:generator`` / ``demo:scorer`` -> the local directory (built if needed).

    Any other name (a path, a hub id) is returned unchanged.
    """
    if not name.startswith(DEMO_PREFIX):
        return name
    which = name[len(DEMO_PREFIX) :]
    if which not in ("generator", "scorer"):
        raise ModelError(f"unknown demo model {name!r}: use 'demo:generator' or 'demo:scorer'")
    models = build_demo_models(models_dir)
    return str(models.generator if which == "generator" else models.scorer)


# -- the build ----------------------------------------------------------------------


def _load_conversations(seed_path: Path) -> list[tuple[Message, ...]]:
    from corpusfactory.seeds import load_seeds

    convs = [tuple(s.messages) for s in load_seeds(seed_path)]
    convs = [c for c in convs if c]
    if not convs:
        raise ModelError(f"the seed file {seed_path} holds no conversation to train on")
    return convs


def _build_into(
    out: Path,
    seed_path: Path,
    seed_bytes: bytes,
    gen_hp: GeneratorHParams,
    sco_hp: ScorerHParams,
    key: str,
) -> None:
    started = time.perf_counter()
    convs = _load_conversations(seed_path)
    seed_hash = hashlib.sha256(seed_bytes).hexdigest()
    common = {
        "builder_version": BUILDER_VERSION,
        "key": key,
        "seed_file": str(seed_path),
        "seed_file_sha256": seed_hash,
        "seed_conversations": len(convs),
        "torch_version": torch.__version__,
    }
    log.info("building demo models %s from %d seed conversations", key, len(convs))
    # Each model seeds torch's global generator; leave the caller's state as it was.
    with torch.random.fork_rng(devices=[]):
        gen_stats = build_generator(out / "generator", convs, gen_hp)
        sco_stats = build_scorer(out / "scorer", convs, sco_hp)
    _write_manifest(out / "generator", common, gen_stats, gen_hp)
    _write_manifest(out / "scorer", common, sco_stats, sco_hp)
    total = time.perf_counter() - started
    (out / "manifest.json").write_text(
        json.dumps(
            {
                **common,
                "generator": gen_stats,
                "scorer": sco_stats,
                "build_seconds": round(total, 2),
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    (out / MARKER).write_text(f"{key}\n", encoding="utf-8")  # last: the build is whole
    log.info("demo models %s built in %.1f s", key, total)


def _write_manifest(
    model_dir: Path, common: dict[str, Any], stats: dict[str, Any], hp: Any
) -> None:
    manifest = {**common, **stats, "hyperparameters": dataclasses.asdict(hp)}
    (model_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", "utf-8")
