"""Gemma 3 270M from its package: the GGUF file, and the transformers directory made from it.

The transformers directory's tokenizer is written from the GGUF vocabulary; it must cut
text into exactly the tokens llama.cpp cuts it into, or training (transformers) and
serving (llama.cpp) would disagree about what a snapshot learnt. Real Italian (SQuAD-it
contexts), runs of spaces, tabs and newlines, emoji and the chat tags are compared token
by token.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from corpusfactory.engines.models import gemma
from corpusfactory.engines.models.registry import (
    GEMMA,
    form_for_backend,
    is_built_here,
    resolve_model,
)
from corpusfactory.errors import ModelError

# Loads a model, runs an engine or builds files: the second tier (make test-fast skips it).
pytestmark = pytest.mark.slow

SQUAD = Path(__file__).resolve().parents[2] / "corpusfactory/data/squad-it/SQuAD_it-test.json.gz"
EDGE_CASES = [
    "Conversazioni in italiano.",
    "[|Umano|] Ciao, come stai?\n[|Assistente|] Bene!  E tu?",
    "Nel 1492 Colombo arrivò in America: €12,50 — «perché»  sì.\t\tfine",
    "emoji 😀 ok",
    "  due spazi all'inizio",
    "a\n\n\nb",
    "x   y    z",
    "<start_of_turn>user\nciao<end_of_turn>",
]


@pytest.fixture(scope="module")
def hf_dir() -> Path:
    return gemma.hf_dir()


def _texts(n: int = 150) -> list[str]:
    with gzip.open(SQUAD) as fh:
        data = json.loads(fh.read())
    texts = list(EDGE_CASES)
    for article in data["data"]:
        for para in article["paragraphs"][:2]:
            texts.append(para["context"])
            if len(texts) >= n:
                return texts
    return texts


def test_names_resolve_to_both_forms(hf_dir: Path) -> None:
    gguf_path = Path(resolve_model(GEMMA, form="gguf"))
    assert gguf_path.suffix == ".gguf" and gguf_path.stat().st_size > 200_000_000
    assert Path(resolve_model(GEMMA)) == hf_dir
    assert (hf_dir / "tokenizer.model").is_file() and (hf_dir / "model.safetensors").is_file()
    assert is_built_here(GEMMA) and is_built_here("demo:scorer")
    assert not is_built_here("/models/x") and resolve_model("/models/x") == "/models/x"
    assert form_for_backend("llamacpp") == "gguf" and form_for_backend("transformers") == "hf"
    with pytest.raises(ModelError, match="transformers directory"):
        resolve_model("demo:scorer", form="gguf")
    with pytest.raises(ModelError, match="form"):
        resolve_model(GEMMA, form="onnx")


def test_transformers_tokenizer_equals_llama_cpp(hf_dir: Path) -> None:
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    llm = Llama(str(gemma.gguf_file()), vocab_only=True, verbose=False)
    texts = _texts()
    assert len(texts) >= 100
    differ = [
        t[:60]
        for t in texts
        if tok(t)["input_ids"] != llm.tokenize(t.encode("utf-8"), add_bos=True, special=True)
    ]
    assert differ == []
    # BOS first, as llama.cpp adds it; the text comes back from the ids.
    ids = tok(EDGE_CASES[2])["input_ids"]
    assert ids[0] == tok.bos_token_id == 2
    assert tok.decode(ids, skip_special_tokens=True) == EDGE_CASES[2]


def test_config_is_gemma3_in_bfloat16(hf_dir: Path) -> None:
    config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    assert config["dtype"] == "bfloat16"
    assert "quantization_config" not in config
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (2, 1, 0)
