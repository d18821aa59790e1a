"""GGUF builds: conversion, llama.cpp parity with transformers, quantization, the gate.

Uses the real demo generator (a tiny LlamaForCausalLM with a byte-level BPE tokenizer
and the chat role tags as added tokens) and, for the SentencePiece-style path, a tiny
randomly initialised MistralForCausalLM with grouped-query attention, untied output
and a byte-fallback BPE tokenizer built here. Builds are made once per module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import gguf
import jinja2
import numpy as np
import pytest

from corpusfactory.chatformat import ChatFormat, Message
from corpusfactory.errors import ConversionError, ModelError
from corpusfactory.models.demo import DemoModels
from corpusfactory.seeds import load_seeds
from corpusfactory.settings import GateBudget, ServingSettings
from serving.gguf.convert import chat_template, convert_hf_to_gguf, permute_for_ggml_rope
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

llama_cpp = pytest.importorskip("llama_cpp")

QUANTS = ("Q8_0", "Q4_K_M")
FMT = ChatFormat()

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
    "[|Assistente|][|Umano|][|Assistente|]",
    "",
]


def _gate_texts() -> list[str]:
    """Every third built-in seed conversation, rendered in the chat format."""
    return [FMT.render(s.messages) for s in load_seeds()[::3]]


# -- builds, made once -------------------------------------------------------------------


@pytest.fixture(scope="module")
def builds(demo_models: DemoModels, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("gguf")
    gen = demo_models.generator
    result: dict[str, Any] = {"dir": out, "hf": gen}
    result["f16"] = convert_hf_to_gguf(gen, out / "generator-f16.gguf")
    result["f32"] = convert_hf_to_gguf(gen, out / "generator-f32.gguf", out_type="f32")
    for quant in ("F16", *QUANTS):
        result[quant] = quantize(result["f16"]["path"], out / f"generator-{quant}.gguf", quant)
    return result


@pytest.fixture(scope="module")
def hf_generator(demo_models: DemoModels) -> tuple[Any, Any]:
    return load_hf(demo_models.generator)


@pytest.fixture(scope="module")
def gate_results(builds: dict[str, Any], hf_generator: tuple[Any, Any]) -> dict[str, Any]:
    budgets = ServingSettings().gate_budgets
    texts = _gate_texts()
    return {
        quant: gate(
            builds["hf"],
            builds[quant]["path"],
            texts,
            budgets[quant],
            ServingSettings().gate_max_tokens,
            hf=hf_generator,
        )
        for quant in ("F16", *QUANTS)
    }


# -- conversion --------------------------------------------------------------------------


def test_permutation_maps_rotate_half_pairs_to_adjacent_pairs() -> None:
    heads, dim = 3, 8
    w = np.arange(heads * dim * 2, dtype=np.float32).reshape(heads * dim, 2)
    p = permute_for_ggml_rope(w, heads)
    for h in range(heads):
        for i in range(dim // 2):
            assert np.array_equal(p[h * dim + 2 * i], w[h * dim + i])
            assert np.array_equal(p[h * dim + 2 * i + 1], w[h * dim + dim // 2 + i])
    bias = np.arange(heads * dim, dtype=np.float32)
    assert np.array_equal(permute_for_ggml_rope(bias, heads), p[:, 0] / 2)


def test_f16_file_holds_llama_metadata_and_tensors(builds: dict[str, Any]) -> None:
    meta = builds["f16"]
    assert meta["architecture"] == "llama"
    assert meta["tokenizer"] == "gpt2" and meta["tokenizer_pre"] == "gpt-2"
    assert meta["out_type"] == "f16" and meta["n_tensors"] == 2 + 9 * 2
    assert meta["add_bos"] is True and meta["add_eos"] is False
    assert meta["size_bytes"] == Path(meta["path"]).stat().st_size
    config = json.loads((builds["hf"] / "config.json").read_text())
    reader = gguf.GGUFReader(meta["path"])

    def field(key: str) -> Any:
        f = reader.get_field(key)
        assert f is not None, key
        return f.contents()

    assert field("general.architecture") == "llama"
    assert field("general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    assert field("llama.context_length") == config["max_position_embeddings"]
    assert field("llama.embedding_length") == config["hidden_size"]
    assert field("llama.block_count") == config["num_hidden_layers"]
    assert field("llama.feed_forward_length") == config["intermediate_size"]
    assert field("llama.attention.head_count") == config["num_attention_heads"]
    assert field("llama.attention.head_count_kv") == config["num_key_value_heads"]
    assert field("llama.rope.dimension_count") == config["head_dim"]
    assert field("llama.rope.freq_base") == pytest.approx(10000.0)
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert field("llama.vocab_size") == config["vocab_size"]
    tokens = field("tokenizer.ggml.tokens")
    types = field("tokenizer.ggml.token_type")
    assert len(tokens) == config["vocab_size"]
    assert types[tokens.index("[|Umano|]")] == gguf.TokenType.USER_DEFINED
    assert types[tokens.index("[|Assistente|]")] == gguf.TokenType.USER_DEFINED
    assert types[tokens.index("<s>")] == gguf.TokenType.CONTROL
    assert types[tokens.index("Ġd")] == gguf.TokenType.NORMAL
    assert field("tokenizer.ggml.merges")[0] == "Ġ d"
    assert field("tokenizer.ggml.bos_token_id") == config["bos_token_id"]
    assert field("tokenizer.ggml.eos_token_id") == config["eos_token_id"]
    assert field("tokenizer.ggml.padding_token_id") == config["pad_token_id"]
    names = {t.name: t for t in reader.tensors}
    assert "output.weight" not in names  # tied embeddings: llama.cpp reuses token_embd
    assert names["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert names["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert names["blk.1.ffn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert names["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    f32 = gguf.GGUFReader(builds["f32"]["path"])
    assert {t.tensor_type for t in f32.tensors} == {gguf.GGMLQuantizationType.F32}


def test_chat_template_renders_the_chat_format(builds: dict[str, Any]) -> None:
    reader = gguf.GGUFReader(builds["f16"]["path"])
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


def test_f32_logits_match_transformers(
    builds: dict[str, Any], hf_generator: tuple[Any, Any]
) -> None:
    tokenizer, model = hf_generator
    text = FMT.render(load_seeds()[0].messages)
    ids = tokenizer(text)["input_ids"][:200]
    full = hf_logits(model, ids)
    with open_llama(builds["f32"]["path"], 256) as llm:
        build = llama_logits(llm, ids)
    # llama.cpp keeps its KV cache in f16: agreement to a few thousandths, not bits.
    assert np.abs(full - build).max() < 0.05
    assert (full.argmax(-1) == build.argmax(-1)).all()


def test_f16_greedy_continuation_equals_transformers(
    builds: dict[str, Any], hf_generator: tuple[Any, Any]
) -> None:
    tokenizer, model = hf_generator
    prompts = [
        FMT.prompt([Message("user", "Ciao! Mi consigli un libro da leggere?")], "assistant"),
        FMT.prompt(
            [Message("user", "Come si prepara il caffè?"), Message("assistant", "Con la moka.")],
            "user",
        ),
        FMT.prompt(list(load_seeds()[1].messages[:3]), "assistant"),
    ]
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        expected = hf_greedy(model, ids, 24)
        assert llama_cpp_greedy(builds["f16"]["path"], ids, 24) == expected, prompt


def test_llama_cpp_tokenizer_equals_hf(
    builds: dict[str, Any], hf_generator: tuple[Any, Any]
) -> None:
    tokenizer, _ = hf_generator
    llm = llama_cpp.Llama(model_path=builds["f16"]["path"], vocab_only=True, verbose=False)
    try:
        for text in TOKENIZER_TEXTS:
            expected = tokenizer(text)["input_ids"]
            assert expected[0] == tokenizer.bos_token_id
            assert llm.tokenize(text.encode("utf-8"), add_bos=True) == expected, text
            plain = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(text.encode("utf-8"), add_bos=False) == plain, text
        # Special tokens written in the text: HF parses them, llama.cpp when asked to.
        text = "fine</s>[|Umano|] di nuovo<s>"
        assert llm.tokenize(text.encode(), special=True) == tokenizer(text)["input_ids"]
        assert llm.detokenize(tokenizer("Perché è già così?")["input_ids"]) == (
            "Perché è già così?".encode()
        )
    finally:
        llm.close()


# -- SentencePiece-style tokenizer, GQA, untied output -----------------------------------


def _spm_model(out: Path) -> Path:
    """A tiny random Mistral with a byte-fallback BPE tokenizer à la Llama/Mistral."""
    import torch
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from tokenizers.trainers import BpeTrainer
    from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    def spm_normalizer() -> Any:
        return normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])

    texts = [m.text for s in load_seeds() for m in s.messages]
    specials = ["<unk>", "<s>", "</s>"]
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = spm_normalizer()
    trained.train_from_iterator(
        texts,
        BpeTrainer(vocab_size=600, min_frequency=2, special_tokens=specials, show_progress=False),
    )
    learned = trained.get_vocab(with_added_tokens=False)
    merges = [tuple(m) for m in json.loads(trained.to_str())["model"]["merges"]]
    ordered = [*specials, *(f"<0x{b:02X}>" for b in range(256))]
    ordered += [t for t in sorted(learned, key=learned.__getitem__) if t not in specials]
    tok = Tokenizer(
        models.BPE(
            {t: i for i, t in enumerate(ordered)},
            merges,
            unk_token="<unk>",
            byte_fallback=True,
            fuse_unk=True,
        )
    )
    tok.normalizer = spm_normalizer()
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t in (FMT.user_tag, FMT.assistant_tag)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    config = MistralConfig(
        vocab_size=len(hf_tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        sliding_window=None,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.2,  # peaked distributions: argmax is not a coin toss
        rms_norm_eps=1e-5,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MistralForCausalLM(config)
    model.save_pretrained(out, max_shard_size="300KB")  # sharded: exercises the index
    hf_tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def spm_build(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("spm")
    model_dir = _spm_model(root / "model")
    meta = convert_hf_to_gguf(model_dir, root / "spm-f32.gguf", out_type="f32")
    return {"dir": model_dir, "meta": meta, "hf": load_hf(model_dir)}


def test_spm_gqa_model_converts_and_matches(spm_build: dict[str, Any]) -> None:
    meta = spm_build["meta"]
    assert meta["tokenizer"] == "llama" and meta["hf_architecture"] == "MistralForCausalLM"
    assert len(list(spm_build["dir"].glob("model-*.safetensors"))) > 1
    reader = gguf.GGUFReader(meta["path"])
    assert "output.weight" in {t.name for t in reader.tensors}  # untied
    head_count_kv = reader.get_field("llama.attention.head_count_kv")
    assert head_count_kv is not None and head_count_kv.contents() == 2
    types = reader.get_field("tokenizer.ggml.token_type")
    tokens = reader.get_field("tokenizer.ggml.tokens")
    assert types is not None and tokens is not None
    by_token = dict(zip(tokens.contents(), types.contents(), strict=True))
    assert by_token["<0x0A>"] == gguf.TokenType.BYTE
    assert by_token["<unk>"] == gguf.TokenType.UNKNOWN
    assert by_token["</s>"] == gguf.TokenType.CONTROL
    assert by_token[FMT.user_tag] == gguf.TokenType.USER_DEFINED

    tokenizer, model = spm_build["hf"]
    with open_llama(meta["path"], 256) as llm:
        for text in TOKENIZER_TEXTS:
            assert llm.tokenize(text.encode("utf-8")) == tokenizer(text)["input_ids"], text
        ids = tokenizer(FMT.render(load_seeds()[2].messages))["input_ids"][:120]
        full, build = hf_logits(model, ids), llama_logits(llm, ids)
    assert np.abs(full - build).max() < 0.05
    assert (full.argmax(-1) == build.argmax(-1)).all()


def test_llama_with_biases_and_linear_rope_matches(
    demo_models: DemoModels, hf_generator: tuple[Any, Any], tmp_path: Path
) -> None:
    """Attention and MLP biases, one KV head, linear rope scaling: logits agree."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer, _ = hf_generator
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=128,
        attention_bias=True,
        mlp_bias=True,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = LlamaForCausalLM(config)
        with torch.no_grad():  # biases start at zero: make them count
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.normal_(0.0, 0.2)
    model.eval()
    model_dir = tmp_path / "biased"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    meta = convert_hf_to_gguf(model_dir, tmp_path / "biased.gguf", out_type="f32")
    reader = gguf.GGUFReader(meta["path"])
    names = {t.name for t in reader.tensors}
    assert {"blk.0.attn_q.bias", "blk.1.attn_output.bias", "blk.0.ffn_down.bias"} <= names
    scaling = reader.get_field("llama.rope.scaling.type")
    assert scaling is not None and scaling.contents() == "linear"
    ids = tokenizer(" ".join(FMT.render(s.messages) for s in load_seeds()[:3]))["input_ids"]
    ids = ids[:250]
    assert len(ids) > 200  # positions well past the rope's unscaled range matter
    full = hf_logits(model, ids)
    with open_llama(meta["path"], 256) as llm:
        build = llama_logits(llm, ids)
    assert np.abs(full - build).max() < 0.05
    assert (full.argmax(-1) == build.argmax(-1)).mean() > 0.99


# -- quantization ------------------------------------------------------------------------


def test_quantized_builds(builds: dict[str, Any]) -> None:
    f16 = builds["f16"]
    copy = builds["F16"]
    assert copy["method"] == "copy"
    assert Path(copy["path"]).read_bytes() == Path(f16["path"]).read_bytes()
    q8, q4 = builds["Q8_0"], builds["Q4_K_M"]
    assert q8["method"] == q4["method"] == "llama.cpp"
    assert q4["size_bytes"] < q8["size_bytes"] < f16["size_bytes"]
    for q in (q8, q4):
        assert q["size_bytes"] == Path(q["path"]).stat().st_size
        reader = gguf.GGUFReader(q["path"])
        file_type = reader.get_field("general.file_type")
        assert file_type is not None and file_type.contents() == q["ftype"]
    # The demo's rows hold 128 or 384 values: K-quants (256-value blocks) fall back.
    assert q4["fallbacks"] and {f["wanted"] for f in q4["fallbacks"]} <= {"q4_K", "q6_K"}
    assert not q8["fallbacks"]
    # Every quantized build loads and runs in llama.cpp.
    with open_llama(q4["path"], 64) as llm:
        assert llm.tokenize(b"Ciao") and np.isfinite(llama_logits(llm, [1, 2, 3])).all()


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


# -- the gate ----------------------------------------------------------------------------


def test_gate_f16_passes_its_budget(gate_results: dict[str, Any]) -> None:
    r = gate_results["F16"]
    assert r["passed"], r["failures"]
    assert r["texts"] == len(_gate_texts()) and r["tokens"] > 3000
    assert r["kl_mean"] < 1e-4 and r["top1_agreement"] > 0.999
    assert abs(r["ppl_delta_pct"]) < 0.1
    assert r["budget"] == ServingSettings().gate_budgets["F16"].model_dump()


def test_gate_q8_0_within_its_kl_budget(gate_results: dict[str, Any]) -> None:
    r = gate_results["Q8_0"]
    assert r["kl_mean"] <= ServingSettings().gate_budgets["Q8_0"].max_kl
    assert r["passed"], r["failures"]
    assert r["kl_mean"] > gate_results["F16"]["kl_mean"]


def test_gate_q4_k_m_figures_are_computed(gate_results: dict[str, Any]) -> None:
    r = gate_results["Q4_K_M"]
    # Whether it passes the default budget is recorded, not forced.
    print(
        "Q4_K_M gate:",
        {k: r[k] for k in ("kl_mean", "kl_p99", "top1_agreement", "ppl_delta_pct", "passed")},
    )
    assert 0 < r["kl_mean"] <= r["kl_max"] and r["kl_p99"] <= r["kl_max"]
    assert 0.5 < r["top1_agreement"] <= 1.0
    assert r["kl_mean"] > gate_results["Q8_0"]["kl_mean"]
    assert r["ppl_full"] == pytest.approx(gate_results["F16"]["ppl_full"])
    assert r["passed"] == (not r["failures"])


def test_gate_too_strict_budget_fails_and_names_the_checks(
    builds: dict[str, Any], hf_generator: tuple[Any, Any]
) -> None:
    strict = GateBudget(max_kl=1e-9, min_top1=1.0, max_ppl_delta_pct=1e-9)
    r = gate(
        builds["hf"], builds["Q4_K_M"]["path"], _gate_texts()[:4], strict, 128, hf=hf_generator
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


def test_gate_needs_a_usable_text(builds: dict[str, Any], hf_generator: tuple[Any, Any]) -> None:
    budget = ServingSettings().gate_budgets["F16"]
    with pytest.raises(ValueError, match="at least one text"):
        gate(builds["hf"], builds["F16"]["path"], [""], budget, hf=hf_generator)


# -- refusals ----------------------------------------------------------------------------


def test_converter_refuses_a_bert_model(demo_models: DemoModels, tmp_path: Path) -> None:
    out = tmp_path / "bert.gguf"
    with pytest.raises(ConversionError, match=r"unsupported architecture BertForMaskedLM.*Llama"):
        convert_hf_to_gguf(demo_models.scorer, out)
    assert list(tmp_path.iterdir()) == []


def _edited_copy(src: Path, dst: Path, file: str, edit: Any) -> Path:
    shutil.copytree(src, dst)
    data = json.loads((dst / file).read_text())
    edit(data)
    (dst / file).write_text(json.dumps(data))
    return dst


@pytest.mark.parametrize(
    ("file", "edit", "message"),
    [
        (
            "tokenizer.json",
            lambda t: t.update(
                pre_tokenizer={
                    "type": "Sequence",
                    "pretokenizers": [
                        {"type": "Split", "pattern": {"Regex": r"\p{N}{1,3}"}},
                        t["pre_tokenizer"],
                    ],
                }
            ),
            r"unsupported BPE tokenizer \(pre-tokenizer Sequence\[Split",
        ),
        (
            "tokenizer.json",
            lambda t: t["model"].update(type="WordPiece"),
            "unsupported tokenizer model 'WordPiece'",
        ),
        (
            "tokenizer.json",
            lambda t: t["pre_tokenizer"].update(add_prefix_space=True),
            "unsupported ByteLevel options",
        ),
        (
            "config.json",
            lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 4.0}),
            "unsupported rope scaling 'yarn'",
        ),
        (
            "config.json",
            lambda c: c.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2"),
            "unsupported architecture Qwen2ForCausalLM",
        ),
        (
            "config.json",
            lambda c: c.update(hidden_act="gelu"),
            "unsupported activation 'gelu'",
        ),
    ],
    ids=["split-regex", "wordpiece", "prefix-space", "yarn", "qwen2", "gelu"],
)
def test_converter_refusals(
    demo_models: DemoModels, tmp_path: Path, file: str, edit: Any, message: str
) -> None:
    model_dir = _edited_copy(demo_models.generator, tmp_path / "model", file, edit)
    with pytest.raises(ConversionError, match=message):
        convert_hf_to_gguf(model_dir, tmp_path / "out" / "x.gguf")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_converter_refuses_missing_pieces(demo_models: DemoModels, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(demo_models.generator, model_dir)
    with pytest.raises(ValueError, match="unknown out_type 'q4'"):
        convert_hf_to_gguf(model_dir, tmp_path / "x.gguf", out_type="q4")
    (model_dir / "model.safetensors").rename(model_dir / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="only PyTorch pickles found"):
        convert_hf_to_gguf(model_dir, tmp_path / "x.gguf")
    (model_dir / "tokenizer.json").unlink()
    with pytest.raises(ConversionError, match=r"no tokenizer\.json"):
        convert_hf_to_gguf(model_dir, tmp_path / "x.gguf")


def test_failed_conversion_keeps_the_previous_file(demo_models: DemoModels, tmp_path: Path) -> None:
    out = tmp_path / "model.gguf"
    out.write_bytes(b"previous build")
    model_dir = _edited_copy(
        demo_models.generator, tmp_path / "model", "config.json", lambda c: c.update(hidden_size=64)
    )
    with pytest.raises(ConversionError, match="shape"):
        convert_hf_to_gguf(model_dir, out)
    assert out.read_bytes() == b"previous build"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.gguf"]
