"""The demo models: cached, deterministic, and good enough at their one job."""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import statistics
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    BertForMaskedLM,
    LlamaForCausalLM,
)

from corpusfactory.chatformat import ChatFormat
from corpusfactory.engines.models.demo import (
    MARKER,
    DemoModels,
    build_demo_models,
    cache_key,
    default_models_dir,
    default_seed_file,
    resolve_model,
)
from corpusfactory.engines.scoring.nll import MLMScorer
from corpusfactory.errors import ModelError
from corpusfactory.seeds import load_seeds

# Loads a model, runs an engine or builds files: the second tier (make test-fast skips it).
pytestmark = pytest.mark.slow

# A reduced build for the tests that build: a few steps, same code path.
SCALE = 0.03


def _words(text: str) -> list[str]:
    return re.findall(r"[^\W\d_]+", text.lower())


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def _assert_same_build(a: DemoModels, b: DemoModels) -> None:
    for part in ("generator", "scorer"):
        da, db = getattr(a, part), getattr(b, part)
        ta, tb = _tensors(da), _tensors(db)
        assert ta.keys() == tb.keys()
        for name in ta:
            assert torch.equal(ta[name], tb[name]), (part, name)
        assert (da / "tokenizer.json").read_bytes() == (db / "tokenizer.json").read_bytes()
        ma = json.loads((da / "manifest.json").read_text())
        mb = json.loads((db / "manifest.json").read_text())
        assert ma["final_loss"] == mb["final_loss"]


def test_cached_build_is_reused(demo_models: DemoModels) -> None:
    marker = demo_models.root / MARKER
    manifest = demo_models.generator / "manifest.json"
    before = (marker.stat().st_mtime_ns, manifest.stat().st_mtime_ns)
    t = time.perf_counter()
    again = build_demo_models()
    assert time.perf_counter() - t < 2.0  # no training, not even a model load
    assert again == demo_models
    assert (marker.stat().st_mtime_ns, manifest.stat().st_mtime_ns) == before
    assert demo_models.root == default_models_dir() / cache_key()
    assert demo_models.key == cache_key()


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CORPUSFACTORY_CACHE", str(tmp_path / "cache"))
    assert default_models_dir() == tmp_path / "cache" / "models"
    monkeypatch.delenv("CORPUSFACTORY_CACHE")
    assert default_models_dir() == Path.home() / ".cache" / "corpusfactory" / "models"


def test_key_depends_on_seeds_and_steps(tmp_path: Path) -> None:
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_bytes(default_seed_file().read_bytes())
    assert cache_key(seeds) == cache_key()
    assert cache_key(steps_scale=SCALE) != cache_key()
    seeds.write_bytes(seeds.read_bytes() + b"\n")
    assert cache_key(seeds) != cache_key()


def test_manifests(demo_models: DemoModels) -> None:
    seed_hash = hashlib.sha256(default_seed_file().read_bytes()).hexdigest()
    top = json.loads((demo_models.root / "manifest.json").read_text())
    assert top["key"] == demo_models.key and top["seed_file_sha256"] == seed_hash
    assert top["build_seconds"] > 0
    for part, arch in (("generator", "LlamaForCausalLM"), ("scorer", "BertForMaskedLM")):
        m = json.loads((getattr(demo_models, part) / "manifest.json").read_text())
        assert m["architecture"] == arch
        assert m["seed_file_sha256"] == seed_hash
        assert m["steps"] == m["hyperparameters"]["steps"] > 0
        assert math.isfinite(m["final_loss"]) and m["final_loss"] > 0
        assert m["build_seconds"] > 0 and m["parameters"] > 0


def test_reduced_builds_are_deterministic_and_interruptions_redone(tmp_path: Path) -> None:
    first = build_demo_models(tmp_path / "a", steps_scale=SCALE)
    assert first.key == cache_key(steps_scale=SCALE)
    assert (first.root / MARKER).is_file()
    # An interrupted build elsewhere: a leftover temp dir and a final dir without marker.
    other = tmp_path / "b"
    stale_tmp = other / f".tmp-{first.key}-dead"
    stale_tmp.mkdir(parents=True)
    (other / first.key / "generator").mkdir(parents=True)
    (other / first.key / "generator" / "junk").write_text("half a build")
    second = build_demo_models(other, steps_scale=SCALE)
    assert (second.root / MARKER).is_file()
    assert not stale_tmp.exists() and not (second.generator / "junk").exists()
    _assert_same_build(first, second)
    # force=True rebuilds a complete build, identically.
    stamp = (first.root / MARKER).stat().st_mtime_ns
    third = build_demo_models(tmp_path / "a", force=True, steps_scale=SCALE)
    assert third == first and (first.root / MARKER).stat().st_mtime_ns != stamp
    _assert_same_build(first, third)
    assert not list((tmp_path / "a").glob(".tmp-*"))


def test_resolve_model(demo_models: DemoModels) -> None:
    assert resolve_model("demo:generator") == str(demo_models.generator)
    assert resolve_model("demo:scorer") == str(demo_models.scorer)
    assert resolve_model("some-org/some-model") == "some-org/some-model"
    assert resolve_model("/models/local") == "/models/local"
    with pytest.raises(ModelError):
        resolve_model("demo:embedder")


def test_missing_seed_file_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError):
        build_demo_models(tmp_path, seed_file=tmp_path / "absent.jsonl")


def test_dirs_load_offline_with_auto_classes(demo_models: DemoModels) -> None:
    gen_tok = AutoTokenizer.from_pretrained(demo_models.generator, local_files_only=True)
    gen = AutoModelForCausalLM.from_pretrained(demo_models.generator, local_files_only=True)
    assert isinstance(gen, LlamaForCausalLM)
    cfg = gen.config
    assert cfg.hidden_size // cfg.num_attention_heads == 64 == cfg.head_dim
    assert cfg.tie_word_embeddings and cfg.max_position_embeddings == 512
    assert 2000 <= len(gen_tok) <= 4100 and cfg.vocab_size == len(gen_tok)
    assert gen.generation_config.eos_token_id == gen_tok.convert_tokens_to_ids("</s>")
    assert gen.generation_config.pad_token_id == gen_tok.pad_token_id is not None
    fmt = ChatFormat()
    for tag in (fmt.user_tag, fmt.assistant_tag):
        assert len(gen_tok(tag, add_special_tokens=False)["input_ids"]) == 1
    ids = gen_tok(f"{fmt.user_tag} Ciao, come stai?")["input_ids"]
    assert ids[0] == gen_tok.bos_token_id
    assert gen_tok.decode(ids, skip_special_tokens=True) == f"{fmt.user_tag} Ciao, come stai?"

    sco_tok = AutoTokenizer.from_pretrained(demo_models.scorer, local_files_only=True)
    sco = AutoModelForMaskedLM.from_pretrained(demo_models.scorer, local_files_only=True)
    assert isinstance(sco, BertForMaskedLM)
    assert 2000 <= len(sco_tok) <= 4100 and sco.config.vocab_size == len(sco_tok)
    enc = sco_tok("Roma è bella")["input_ids"]
    assert enc[0] == sco_tok.cls_token_id and enc[-1] == sco_tok.sep_token_id
    assert sco_tok.mask_token == "[MASK]" and sco_tok.pad_token == "[PAD]"
    # Cased: lowercase=False.
    assert sco_tok("Roma")["input_ids"] != sco_tok("roma")["input_ids"]


def test_scorer_prefers_real_seed_text_to_shuffled_words(demo_models: DemoModels) -> None:
    messages = [m.text for c in load_seeds() for m in c.messages]
    rng = random.Random(7)
    sample = rng.sample(messages, 30)
    shuffled = []
    for text in sample:
        words = text.split()
        while words == text.split():
            rng.shuffle(words)
        shuffled.append(" ".join(words))
    scorer = MLMScorer(demo_models.scorer)
    real = scorer.score(sample)
    fake = scorer.score(shuffled)
    mean_real = statistics.mean(r.nll for r in real)
    mean_fake = statistics.mean(r.nll for r in fake)
    assert mean_real < mean_fake - 0.5, (mean_real, mean_fake)
    wins = sum(a.nll < b.nll for a, b in zip(real, fake, strict=True))
    assert wins >= 27, wins


def test_generator_samples_seed_like_italian(demo_models: DemoModels) -> None:
    tok = AutoTokenizer.from_pretrained(demo_models.generator)
    model = AutoModelForCausalLM.from_pretrained(demo_models.generator).eval()
    vocabulary = {w for c in load_seeds() for m in c.messages for w in _words(m.text)}
    fmt = ChatFormat()
    torch.manual_seed(0)
    words: list[str] = []
    turns = []
    for prompt in (fmt.user_tag, f"{fmt.user_tag} Ciao!\n{fmt.assistant_tag}"):
        enc = tok(prompt, return_tensors="pt")
        for _ in range(3):
            out = model.generate(**enc, max_new_tokens=40, do_sample=True)
            decoded = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            assert isinstance(decoded, str)
            text = fmt.clean_generation(decoded)
            turns.append(text)
            words.extend(_words(text))
    assert sum(bool(t) for t in turns) >= 5, turns
    assert len(words) >= 30, turns
    known = sum(w in vocabulary for w in words) / len(words)
    assert known >= 0.75, (known, turns)
