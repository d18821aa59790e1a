"""One loader for a local transformers causal LM: the producers' transformers
generator, the evaluation, the serving backend and the GGUF gate all load through it.

:func:`load_causal_lm` returns (tokenizer, model): the model in eval mode on the
device, in the dtype asked for (``"auto"``: as saved), with transformers' progress
bars off while loading, and the tokenizer given the end-of-sequence token as its
padding token when it has none. A directory that cannot be loaded raises the
caller's error type, with what was being loaded in the message. Stop strings are cut
with :func:`corpusfactory.text.cut_at_stop`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from corpusfactory.errors import CorpusFactoryError, ModelError


def load_causal_lm(
    path: str | Path,
    *,
    device: Any = "cpu",
    dtype: Any = "float32",
    what: str = "causal LM",
    error: type[CorpusFactoryError] = ModelError,
) -> tuple[Any, Any]:
    """(tokenizer, model) from the local directory ``path``.

    ``dtype`` is a torch dtype, its name (``"float32"``, ``"bfloat16"``, ...) or
    ``"auto"``. Raises ``error`` when the directory is missing or unreadable."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    where = Path(path).expanduser()
    if not where.is_dir():
        raise error(f"{what}: model directory {where} does not exist")
    load_dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the "Loading weights" bars
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(where))
        model: Any = AutoModelForCausalLM.from_pretrained(str(where), dtype=load_dtype)
    except (OSError, ValueError) as exc:
        raise error(f"{what}: cannot load {where}: {exc}") from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model.to(device).eval()
