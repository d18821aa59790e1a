"""GGUF builds with llama.cpp's maintained converter, for every architecture the trainer makes.

Four checkpoints are converted once per module to F16 with llama.cpp's own
``convert_hf_to_gguf.py`` (fetched from the pinned llama-cpp-python sdist): tiny
randomly initialised, briefly trained ``LlamaForCausalLM`` (tied embeddings), ``MistralForCausalLM``
(grouped-query attention, untied output, sharded safetensors) and
``Gemma3ForCausalLM`` (five sliding-window layers and a global one, q/k norms, scaled
embeddings, ``1 + w`` norms), all with a SentencePiece tokenizer trained here, and the
real demo generator. llama.cpp's greedy continuation of each F16 build must equal
transformers', and the Q8_0 and Q4_K_M builds of llama.cpp's quantizer must pass the
gate. The converter's fetch, its failures and the wrapper's guarantees (no partial
file, one error line naming the log) are tested with stand-ins where a real run would
only cost time.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import gguf
import jinja2
import numpy as np
import pytest

from corpusfactory.chatformat import ChatFormat, Message
from corpusfactory.engines.models.demo import DemoModels
from corpusfactory.engines.models.demo_generator import chat_template, train_chat_tokenizer
from corpusfactory.errors import ConversionError, ModelError, SetupError
from corpusfactory.seeds import load_seeds
from corpusfactory.settings import GateBudget, ServingSettings
from serving.gguf import convert, fetch
from serving.gguf.convert import convert_hf_to_gguf
from serving.gguf.fetch import ConverterUnavailableError, ensure_converter, llama_cpp_version
from serving.gguf.gate import (
    gate,
    hf_greedy,
    hf_logits,
    llama_cpp_greedy,
    llama_logits,
    load_hf,
    open_llama,
)
from serving.gguf.quantize import QUANT_TYPES, quantize

# Loads a model, runs an engine or builds files: the second tier (make test-fast skips it).
pytestmark = pytest.mark.slow

llama_cpp = pytest.importorskip("llama_cpp")

QUANTS = ("Q8_0", "Q4_K_M")
FMT = ChatFormat()
MODELS = ("llama", "mistral", "gemma3", "demo")
TRAIN_STEPS = 150  # enough for context-dependent predictions (see _tiny_model)
GATE_TEXTS, GATE_TOKENS = 8, 256  # per gate: about 2000 positions compared
# llama.cpp's architecture for each checkpoint.
ARCHS = {"llama": "llama", "mistral": "llama", "gemma3": "gemma3", "demo": "llama"}

# Italian texts for tokenizer parity: role tags, accents, apostrophes, punctuation,
# numbers, newlines (single, double, trailing), runs of spaces, symbols and emoji.
TOKENIZER_TEXTS = [
    "Ciao, come stai?",
    "[|Umano|] Mi consigli un libro?\n[|Assistente|] Certo: «Il nome della rosa».",
    "[|Umano|]Perché il caffè è così amaro?\n\n[|Assistente|]  Dipende dalla tostatura!",
    "L'università è aperta dalle 8:30 alle 19:45, lunedì–venerdì.",
    "Costa 1.234,56 € (IVA 22% inclusa) — più o meno 3 volte tanto.",
    "Città, perché, però, più, così, già, ciò, virtù; È È È!",
    "Riga uno\nRiga due\n\n\nRiga cinque   con   spazi  \n",
    "Dov'è l'hotel? Nell'angolo, all'incrocio con via Roma n° 42/B.",
    "Ünïcödé, ß, ñ, 漢字 e un'emoji 😀 alla fine…",
    "\t tabulazione e\r\n a capo Windows",
    " uno spazio all'inizio",
    "[|Assistente|][|Umano|][|Assistente|]",
    "",
]


def _gate_texts() -> list[str]:
    """Every third built-in seed conversation in the chat format, the first GATE_TEXTS."""
    return [FMT.render(s.messages) for s in load_seeds()[::3]][:GATE_TEXTS]


def _prompts() -> list[str]:
    return [
        FMT.prompt([Message("user", "Ciao! Mi consigli un libro da leggere?")], "assistant"),
        FMT.prompt(
            [Message("user", "Come si prepara il caffè?"), Message("assistant", "Con la moka.")],
            "user",
        ),
        FMT.prompt(list(load_seeds()[1].messages[:3]), "assistant"),
    ]


# -- the checkpoints, made once ----------------------------------------------------------


def _tiny_model(kind: str, tokenizer: Any, out: Path, steps: int = TRAIN_STEPS) -> Path:
    """A tiny checkpoint of ``kind`` with the SentencePiece tokenizer, briefly trained.

    Randomly initialised (norm weights too, so that their conversion counts), then
    trained for ``steps`` steps on the seed conversations in the chat format (a few
    seconds). A purely random model is no fair test: its top-1 margins are so thin that
    Q8_0 already flips a tenth of them (outside the gate's budget, though the conversion
    is right), and a briefly trained one predicts the most frequent token everywhere, so
    that any build agrees with it. A hundred-odd steps give predictions that depend on
    the context, with margins like those of a real snapshot.
    """
    import torch
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
    )

    hf = tokenizer.hf
    common: dict[str, Any] = {
        "vocab_size": len(hf),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 512,
        "bos_token_id": hf.bos_token_id,
        "eos_token_id": hf.eos_token_id,
        "pad_token_id": hf.pad_token_id,
        "rms_norm_eps": 1e-6,
    }
    model: Any
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if kind == "llama":
            model = LlamaForCausalLM(
                LlamaConfig(num_hidden_layers=2, tie_word_embeddings=True, **common)
            )
        elif kind == "mistral":
            model = MistralForCausalLM(
                MistralConfig(
                    num_hidden_layers=2, tie_word_embeddings=False, sliding_window=None, **common
                )
            )
        else:
            # llama.cpp's gemma3 takes every sixth layer as global and scales queries by
            # 1/sqrt(head_dim) (below 27B): six layers, query_pre_attn_scalar = head_dim.
            model = Gemma3ForCausalLM(
                Gemma3TextConfig(
                    num_hidden_layers=6,
                    sliding_window=16,  # shorter than the prompts: the window matters
                    query_pre_attn_scalar=16,
                    **common,
                )
            )
        with torch.no_grad():  # norms start at one (Gemma: zero, applied as 1 + w)
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.normal_(0.0 if kind == "gemma3" else 1.0, 0.2)
        _train(model, _token_stream(hf), steps)
    model.eval()
    # Sharded: the converter reads the safetensors index too.
    model.save_pretrained(out, max_shard_size="300KB" if kind == "mistral" else "50GB")
    tokenizer.save(out)
    return out


def _token_stream(hf: Any) -> Any:
    import torch

    ids: list[int] = []
    for seed in load_seeds():
        ids += hf(FMT.render(seed.messages))["input_ids"] + [hf.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def _train(model: Any, stream: Any, steps: int, block: int = 64, batch: int = 8) -> None:
    """AdamW on random windows of ``stream``."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(len(stream) - block, (batch, 1))
        x = stream[starts + torch.arange(block)]
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


@pytest.fixture(scope="module")
def checkpoints(
    demo_models: DemoModels, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    texts = [m.text for s in load_seeds() for m in s.messages]
    tokenizer = train_chat_tokenizer(texts, 600, FMT)
    out = {"demo": demo_models.generator}
    for kind in MODELS[:3]:
        started = time.perf_counter()
        out[kind] = _tiny_model(kind, tokenizer, root / kind)
        print(f"made {kind} in {time.perf_counter() - started:.1f} s")
    return out


@pytest.fixture(scope="module")
def builds(
    checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, Any]]:
    """F16 (the converter), Q8_0 and Q4_K_M (the quantizer) of every checkpoint."""
    out = tmp_path_factory.mktemp("gguf")
    result: dict[str, dict[str, Any]] = {}
    for kind, model_dir in checkpoints.items():
        f16 = convert_hf_to_gguf(model_dir, out / f"{kind}-F16.gguf")
        print(f"converted {kind} in {f16['seconds']:.1f} s")
        result[kind] = {"F16": f16}
        for quant in QUANTS:
            result[kind][quant] = quantize(f16["path"], out / f"{kind}-{quant}.gguf", quant)
    return result


@pytest.fixture(scope="module")
def hf_models(checkpoints: dict[str, Path]) -> dict[str, tuple[Any, Any]]:
    return {kind: load_hf(model_dir) for kind, model_dir in checkpoints.items()}


@pytest.fixture(scope="module")
def gate_results(
    checkpoints: dict[str, Path],
    builds: dict[str, dict[str, Any]],
    hf_models: dict[str, tuple[Any, Any]],
) -> dict[str, dict[str, Any]]:
    serving = ServingSettings()
    texts = _gate_texts()
    return {
        kind: {
            quant: gate(
                checkpoints[kind],
                builds[kind][quant]["path"],
                texts,
                serving.gate_budgets[quant],
                GATE_TOKENS,
                hf=hf_models[kind],
            )
            for quant in ("F16", *QUANTS)
        }
        for kind in MODELS
    }


# -- the converter: where it comes from ---------------------------------------------------


def test_converter_comes_from_the_pinned_sdist() -> None:
    version = llama_cpp_version()
    where = ensure_converter()
    assert where == fetch.converter_dir(version) and (where / fetch.MARKER).is_file()
    assert (where / "convert_hf_to_gguf.py").is_file()
    assert (where / "conversion" / "gemma.py").is_file()
    assert (where / "gguf-py" / "gguf" / "constants.py").is_file()
    assert (where / "LICENSE").read_text().startswith("MIT License")
    source = json.loads((where / "SOURCE.json").read_text())
    assert source["distribution"] == "llama_cpp_python" and source["version"] == version
    assert source["sdist"] == f"llama_cpp_python-{version}.tar.gz"
    assert not (where / "src").exists()  # the converter only, not the C++ tree


def _fake_sdist(path: Path, version: str, extra: dict[str, bytes] | None = None) -> Path:
    """A small tarball laid out like the llama-cpp-python sdist, with traps."""
    top = f"llama_cpp_python-{version}"
    llama = f"{top}/vendor/llama.cpp"
    files = {
        f"{llama}/convert_hf_to_gguf.py": b"print('converter')\n",
        f"{llama}/conversion/__init__.py": b"",
        f"{llama}/gguf-py/gguf/__init__.py": b"",
        f"{llama}/LICENSE": b"MIT License\n",
        f"{llama}/src/llama.cpp": b"// not wanted",
        f"{llama}/convert_lora_to_gguf.py": b"# not wanted",
        f"{top}/llama_cpp/__init__.py": b"# not wanted",
        **(extra or {}),
    }
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo(f"{llama}/conversion/evil.py")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    return path


def test_fetch_keeps_only_the_converter_once_and_atomically(tmp_path: Path) -> None:
    sdist = _fake_sdist(tmp_path / "llama_cpp_python-9.9.9.tar.gz", "9.9.9")
    cache = tmp_path / "cache"
    # An interrupted earlier fetch: a temporary dir and a final dir without its marker.
    stale = cache / fetch.CACHE_SUBDIR / ".tmp-9.9.9-dead"
    stale.mkdir(parents=True)
    (cache / fetch.CACHE_SUBDIR / "9.9.9").mkdir()
    (cache / fetch.CACHE_SUBDIR / "9.9.9" / "junk").write_text("half a fetch")

    where = ensure_converter(sdist=sdist, version="9.9.9", cache=cache)
    assert where == cache / fetch.CACHE_SUBDIR / "9.9.9"
    kept = sorted(str(p.relative_to(where)) for p in where.rglob("*") if p.is_file())
    assert kept == [
        "COMPLETE",
        "LICENSE",
        "SOURCE.json",
        "conversion/__init__.py",
        "convert_hf_to_gguf.py",
        "gguf-py/gguf/__init__.py",
    ]
    assert not stale.exists()
    assert json.loads((where / "SOURCE.json").read_text())["files"] == 4
    # Fetched once: later calls need no sdist at all.
    sdist.unlink()
    assert ensure_converter(sdist=sdist, version="9.9.9", cache=cache) == where
    assert [p.name for p in (cache / fetch.CACHE_SUBDIR).iterdir() if p.is_dir()] == ["9.9.9"]


def test_fetch_refuses_a_wrong_or_missing_sdist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    other = _fake_sdist(tmp_path / "llama_cpp_python-1.0.0.tar.gz", "1.0.0")
    with pytest.raises(ConverterUnavailableError, match=r"not the llama_cpp_python 9\.9\.9 sdist"):
        ensure_converter(sdist=other, version="9.9.9", cache=cache)
    monkeypatch.setenv(fetch.SDIST_ENV, str(tmp_path / "absent.tar.gz"))
    with pytest.raises(ConverterUnavailableError, match=r"absent\.tar\.gz: no such file.*SDIST"):
        ensure_converter(version="9.9.9", cache=cache)
    (tmp_path / "broken.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(ConverterUnavailableError, match="cannot extract"):
        ensure_converter(sdist=tmp_path / "broken.tar.gz", version="9.9.9", cache=cache)
    assert isinstance(ConverterUnavailableError("x"), SetupError)
    root = cache / fetch.CACHE_SUBDIR
    assert [p.name for p in root.iterdir() if p.is_dir()] == []  # nothing half-made


def test_fetch_without_the_package_index_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pip cannot reach its index (a closed local port here): one line naming the fixes."""
    monkeypatch.delenv(fetch.SDIST_ENV, raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(ConverterUnavailableError) as info:
        ensure_converter(version=llama_cpp_version(), cache=tmp_path)
    message = str(info.value)
    assert "cannot download the llama_cpp_python==" in message
    assert "make models" in message and fetch.SDIST_ENV in message
    assert "\n" not in message
    root = tmp_path / fetch.CACHE_SUBDIR
    assert [p.name for p in root.iterdir() if p.is_dir()] == []


# -- the F16 builds ----------------------------------------------------------------------


def test_f16_builds_hold_each_architecture(
    builds: dict[str, dict[str, Any]], checkpoints: dict[str, Path]
) -> None:
    for kind in MODELS:
        meta = builds[kind]["F16"]
        config = json.loads((checkpoints[kind] / "config.json").read_text())
        assert meta["architecture"] == ARCHS[kind], kind
        assert meta["hf_architecture"] == config["architectures"][0]
        assert meta["tokenizer"] == "llama" and meta["add_bos"] is True, kind
        assert meta["vocab_size"] == config["vocab_size"]
        assert meta["size_bytes"] == Path(meta["path"]).stat().st_size
        assert "llama_cpp_python" in meta["converter"]
        reader = gguf.GGUFReader(meta["path"])

        def field(key: str, reader: Any = reader, kind: str = kind) -> Any:
            f = reader.get_field(key)
            assert f is not None, (kind, key)
            return f.contents()

        assert field("general.file_type") == gguf.LlamaFileType.MOSTLY_F16
        assert field("tokenizer.ggml.add_space_prefix") is False
        tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
        for tag in (FMT.user_tag, FMT.assistant_tag):  # never split by llama.cpp
            assert types[tokens.index(tag)] == gguf.TokenType.USER_DEFINED, (kind, tag)
        assert types[tokens.index("<s>")] == gguf.TokenType.CONTROL
        assert types[tokens.index("<0x0A>")] == gguf.TokenType.BYTE
        assert field("tokenizer.ggml.eos_token_id") == tokens.index("</s>")
        assert field(f"{ARCHS[kind]}.block_count") == config["num_hidden_layers"]
        names = {t.name for t in reader.tensors}
        assert ("output.weight" in names) == (not config.get("tie_word_embeddings", True))
        if kind == "gemma3":
            assert field("gemma3.attention.sliding_window") == 16
            assert {"blk.0.attn_q_norm.weight", "blk.5.post_ffw_norm.weight"} <= names
        if kind == "mistral":
            assert field("llama.attention.head_count_kv") == 2
            assert len(list(checkpoints[kind].glob("model-*.safetensors"))) > 1


def test_chat_template_travels_with_the_tokenizer(builds: dict[str, dict[str, Any]]) -> None:
    reader = gguf.GGUFReader(builds["demo"]["F16"]["path"])
    field = reader.get_field("tokenizer.chat_template")
    assert field is not None and field.contents() == chat_template(FMT)
    template = jinja2.Environment().from_string(field.contents())
    history = [
        Message("user", " Ciao, come stai? "),
        Message("assistant", "Bene, grazie!"),
        Message("user", "Che ore sono?"),
    ]
    msgs = [{"role": m.role, "content": m.text} for m in history]
    system = [{"role": "system", "content": "ignored"}]
    assert template.render(messages=msgs, add_generation_prompt=False) == FMT.render(history)
    assert template.render(messages=system + msgs, add_generation_prompt=True) == FMT.prompt(
        history, "assistant"
    )
    assert template.render(messages=[], add_generation_prompt=True) == FMT.assistant_tag


# The largest gap between transformers' two best logits that F16 weights may close: the
# F16 builds' logits differ from float32 by up to a few hundredths.
NEAR_TIE = 0.02


@pytest.mark.parametrize("kind", MODELS)
def test_f16_greedy_continuation_equals_transformers(
    kind: str, builds: dict[str, dict[str, Any]], hf_models: dict[str, tuple[Any, Any]]
) -> None:
    """Token for token, up to a near-tie that F16 rounding may break the other way.

    Where transformers' own two best logits are closer than ``NEAR_TIE``, llama.cpp may
    pick the runner-up (then the continuations part ways, both right); everywhere else
    it must pick transformers' token. At least half the tokens must be compared.
    """
    tokenizer, model = hf_models[kind]
    compared, seen = 0, set()
    for prompt in _prompts():
        ids = tokenizer(prompt)["input_ids"]
        expected = hf_greedy(model, ids, 24)
        got = llama_cpp_greedy(builds[kind]["F16"]["path"], ids, 24)
        seen |= set(expected)
        same = next(
            (i for i, (a, b) in enumerate(zip(expected, got, strict=True)) if a != b), len(got)
        )
        compared += same
        if same < len(got):
            logits = hf_logits(model, ids + expected)[len(ids) - 1 + same]
            first, second = np.argsort(logits)[::-1][:2]
            gap = logits[first] - logits[second]
            assert got[same] == second and gap < NEAR_TIE, (prompt, same, gap, expected, got)
    assert compared >= 36, compared
    # Not a degenerate model repeating one token: the comparison means something.
    assert len(seen) > 3, seen


def test_llama_cpp_tokenizes_as_transformers(
    builds: dict[str, dict[str, Any]], hf_models: dict[str, tuple[Any, Any]]
) -> None:
    """The chat server tokenizes prompts with llama.cpp: ids must be transformers'."""
    for kind in ("demo", "gemma3"):
        tokenizer, _ = hf_models[kind]
        llm = llama_cpp.Llama(
            model_path=builds[kind]["F16"]["path"], vocab_only=True, verbose=False
        )
        try:
            for text in [*TOKENIZER_TEXTS, *_prompts()]:
                expected = tokenizer(text)["input_ids"]
                assert expected[0] == tokenizer.bos_token_id
                assert llm.tokenize(text.encode("utf-8"), add_bos=True) == expected, (kind, text)
                plain = tokenizer(text, add_special_tokens=False)["input_ids"]
                assert llm.tokenize(text.encode("utf-8"), add_bos=False) == plain, (kind, text)
            # Special tokens written in the text: HF parses them, llama.cpp when asked to.
            text = "fine</s>[|Umano|] di nuovo<s>"
            assert llm.tokenize(text.encode(), special=True) == tokenizer(text)["input_ids"]
            ids = tokenizer("Perché è già così?", add_special_tokens=False)["input_ids"]
            assert llm.detokenize(ids) == "Perché è già così?".encode()
        finally:
            llm.close()


# -- quantized builds and the gate -------------------------------------------------------


def test_quantized_builds(builds: dict[str, dict[str, Any]]) -> None:
    for kind in MODELS:
        f16, q8, q4 = (builds[kind][q] for q in ("F16", *QUANTS))
        assert q8["method"] == q4["method"] == "llama.cpp"
        assert q4["size_bytes"] < q8["size_bytes"] < f16["size_bytes"], kind
        for q in (q8, q4):
            reader = gguf.GGUFReader(q["path"])
            file_type = reader.get_field("general.file_type")
            assert file_type is not None and file_type.contents() == q["ftype"]
            arch = reader.get_field("general.architecture")
            assert arch is not None and arch.contents() == ARCHS[kind]
    # Rows of 64 or 128 values: the K-quants (256-value blocks) fall back inside llama.cpp.
    assert builds["llama"]["Q4_K_M"]["fallbacks"]
    with open_llama(builds["gemma3"]["Q4_K_M"]["path"], 64) as llm:
        assert np.isfinite(llama_logits(llm, [1, 4, 300, 301])).all()


@pytest.mark.parametrize("quant", ["F16", *QUANTS])
@pytest.mark.parametrize("kind", MODELS)
def test_builds_pass_the_gate(
    kind: str, quant: str, gate_results: dict[str, dict[str, Any]]
) -> None:
    r = gate_results[kind][quant]
    print(
        f"{kind} {quant} gate:",
        {k: r[k] for k in ("kl_mean", "kl_p99", "top1_agreement", "ppl_delta_pct", "tokens")},
    )
    assert r["passed"], r["failures"]
    assert r["texts"] == GATE_TEXTS and r["tokens"] > 1500
    assert r["budget"] == ServingSettings().gate_budgets[quant].model_dump()
    if quant != "F16":  # coarser than F16, and said so
        assert r["kl_mean"] > gate_results[kind]["F16"]["kl_mean"]
        assert r["ppl_full"] == pytest.approx(gate_results[kind]["F16"]["ppl_full"])


def test_gate_too_strict_budget_fails_and_names_the_checks(
    builds: dict[str, dict[str, Any]],
    checkpoints: dict[str, Path],
    hf_models: dict[str, tuple[Any, Any]],
) -> None:
    strict = GateBudget(max_kl=1e-9, min_top1=1.0, max_ppl_delta_pct=1e-9)
    r = gate(
        checkpoints["demo"],
        builds["demo"]["Q4_K_M"]["path"],
        _gate_texts()[:4],
        strict,
        128,
        hf=hf_models["demo"],
    )
    assert r["passed"] is False
    by_metric = {f["metric"]: f for f in r["failures"]}
    assert "kl_mean" in by_metric
    assert ("top1_agreement" in by_metric) == (r["top1_agreement"] < 1.0)
    assert ("ppl_delta_pct" in by_metric) == (r["ppl_delta_pct"] > 1e-9)
    kl = by_metric["kl_mean"]
    assert kl["value"] == r["kl_mean"] and kl["limit"] == 1e-9
    assert kl["by"] == pytest.approx(r["kl_mean"] - 1e-9)
    assert "kl_mean" in kl["message"] and "max_kl" in kl["message"]
    assert r["tokens"] <= 4 * 128


def test_gate_needs_a_usable_text(
    builds: dict[str, dict[str, Any]],
    checkpoints: dict[str, Path],
    hf_models: dict[str, tuple[Any, Any]],
) -> None:
    budget = ServingSettings().gate_budgets["F16"]
    with pytest.raises(ValueError, match="at least one text"):
        gate(checkpoints["demo"], builds["demo"]["F16"]["path"], [""], budget, hf=hf_models["demo"])


def test_quantize_refuses_unknown_quant_and_missing_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown quant 'Q3_X'.*Q4_K_M"):
        quantize(tmp_path / "in.gguf", tmp_path / "out.gguf", "Q3_X")
    with pytest.raises(ValueError, match="no such GGUF file"):
        quantize(tmp_path / "in.gguf", tmp_path / "out.gguf", "Q8_0")
    assert list(tmp_path.iterdir()) == []
    assert {"F16", "Q8_0", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K"} <= set(QUANT_TYPES)


def test_quantize_reports_llama_cpp_failure(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"GGUF not really")
    with pytest.raises(ModelError, match=r"llama\.cpp could not quantize"):
        quantize(bogus, tmp_path / "out.gguf", "Q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bogus.gguf"]


# -- refusals and failures -----------------------------------------------------------------


def test_unsupported_architecture_is_one_line_and_keeps_the_previous_file(
    demo_models: DemoModels, tmp_path: Path
) -> None:
    """A real run of the converter on an architecture llama.cpp does not know (OPT)."""
    model_dir = tmp_path / "opt"
    shutil.copytree(demo_models.generator, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config.update(architectures=["OPTForCausalLM"], model_type="opt")
    (model_dir / "config.json").write_text(json.dumps(config))
    out = tmp_path / "builds" / "F16.gguf"
    out.parent.mkdir()
    out.write_bytes(b"previous build")
    with pytest.raises(ConversionError) as info:
        convert_hf_to_gguf(model_dir, out)
    message = str(info.value)
    log_path = out.with_name("F16.gguf.convert.log")
    assert "\n" not in message
    assert "OPTForCausalLM is not supported" in message and str(log_path) in message
    assert out.read_bytes() == b"previous build"
    assert sorted(p.name for p in out.parent.iterdir()) == ["F16.gguf", log_path.name]
    assert "convert_hf_to_gguf.py" in log_path.read_text()


def test_refusals_before_running_the_converter(demo_models: DemoModels, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown out_type 'q4'"):
        convert_hf_to_gguf(demo_models.generator, tmp_path / "x.gguf", out_type="q4")
    with pytest.raises(ConversionError, match="not a model directory"):
        convert_hf_to_gguf(tmp_path / "absent", tmp_path / "x.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match=r"no config\.json"):
        convert_hf_to_gguf(tmp_path / "empty", tmp_path / "x.gguf")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ConversionError, match="cannot read the model config"):
        convert_hf_to_gguf(tmp_path / "bad", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


@pytest.fixture
def stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Replace the converter by a small script; return a function that writes it."""
    where = tmp_path / "converter"
    where.mkdir()
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    monkeypatch.setattr(convert, "ensure_converter", lambda **_: where)

    def write(body: str) -> Path:
        (where / fetch.SCRIPT).write_text(
            "import sys\nout = sys.argv[sys.argv.index('--outfile') + 1]\n" + body
        )
        return model_dir

    return write


def test_failed_run_leaves_no_partial_file(stand_in: Any, tmp_path: Path) -> None:
    model_dir = stand_in(
        "open(out, 'wb').write(b'GGUF half')\n"
        "print('INFO:hf-to-gguf:Loading model', flush=True)\n"
        "raise KeyError('model.layers.0.mlp.gate_proj.weight')\n"
    )
    out = tmp_path / "out" / "x.gguf"
    with pytest.raises(ConversionError, match=r"KeyError: 'model\.layers\.0\.mlp.*\(log: "):
        convert_hf_to_gguf(model_dir, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.gguf.convert.log"]


def test_missing_package_is_a_setup_error(stand_in: Any, tmp_path: Path) -> None:
    model_dir = stand_in("import sentencepiece_not_installed_here\n")
    with pytest.raises(ConverterUnavailableError, match=r"No module named .*make setup"):
        convert_hf_to_gguf(model_dir, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_a_hung_converter_times_out(stand_in: Any, tmp_path: Path) -> None:
    model_dir = stand_in("import time\nopen(out, 'wb').write(b'GGUF')\ntime.sleep(60)\n")
    with pytest.raises(ConversionError, match=r"timed out after 1 s"):
        convert_hf_to_gguf(model_dir, tmp_path / "x.gguf", timeout=1)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["x.gguf.convert.log"]


def test_success_replaces_the_file_and_clears_an_old_failure_log(
    stand_in: Any, tmp_path: Path
) -> None:
    """The stand-in writes a real (empty) GGUF file, as the converter would."""
    model_dir = stand_in(
        f"sys.path.insert(0, {str(Path(gguf.__file__).parent.parent)!r})\n"
        "import gguf\n"
        "w = gguf.GGUFWriter(out, 'llama')\n"
        "w.write_header_to_file(); w.write_kv_data_to_file(); w.write_ti_data_to_file()\n"
        "w.close()\n"
    )
    out = tmp_path / "x.gguf"
    out.write_bytes(b"older build")
    out.with_name("x.gguf.convert.log").write_text("an earlier failure")
    meta = convert_hf_to_gguf(model_dir, out, "q8_0", name="tiny")
    assert meta["architecture"] == "llama" and meta["n_tensors"] == 0
    assert meta["out_type"] == "q8_0" and meta["hf_architecture"] == "LlamaForCausalLM"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["x.gguf"]


def test_last_error_line() -> None:
    pick = fetch.last_error_line
    assert pick(["INFO:hf-to-gguf:x", "ERROR:hf-to-gguf:Model Foo is not supported"]) == (
        "Model Foo is not supported"
    )
    assert (
        pick(
            [
                "Traceback (most recent call last):",
                '  File "x.py", line 1, in <module>',
                "NotImplementedError: BPE pre-tokenizer was not recognized",
                "",
            ]
        )
        == "NotImplementedError: BPE pre-tokenizer was not recognized"
    )
    assert pick(["ERROR: Could not find a version that satisfies the requirement x"]).startswith(
        "ERROR: Could not find"
    )
    assert pick(["just output", "last words"]) == "last words"
    assert pick([]) == ""


def test_command_line_fetch_prints_the_converter_dir(capsys: pytest.CaptureFixture[str]) -> None:
    assert convert.main(["--fetch"]) == 0
    assert Path(capsys.readouterr().out.strip()) == ensure_converter()
    assert convert.main(["/nonexistent-model", str(Path(sys.prefix) / "x.gguf")]) == 2
