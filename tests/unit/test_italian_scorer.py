"""The demo's Italian scorer: held out by article, cached, deterministic, and it prefers
real Italian to shuffled words and to the toy generator's output."""

from __future__ import annotations

import gzip
import json
import random
import statistics
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from corpusfactory.chatformat import ChatFormat
from corpusfactory.engines.models.demo import MARKER, DemoModels, default_models_dir
from corpusfactory.engines.models.italian import (
    DIR_PREFIX,
    LICENCE,
    MODEL_NAME,
    build_italian_scorer,
    cache_key,
)
from corpusfactory.engines.models.italian_data import (
    default_source,
    heldout_sentences,
    is_heldout_article,
    load_articles,
    split_articles,
)
from corpusfactory.engines.scoring.nll import MLMScorer
from corpusfactory.errors import ModelError

# Loads a model, runs an engine or builds files: the second tier (make test-fast skips it).
pytestmark = pytest.mark.slow

# A reduced build for the determinism test: a few steps, same code path.
SCALE = 0.004

# The held-out articles of the shipped SQuAD-it file under the stable title hash. Pinned,
# so that a change of the rule (which moves the evaluation subset too) is noticed.
HELDOUT_TITLES = [
    "Amazzonia",
    "Programma Apollo",
    "Cloroplasto",
    "Doctor Who",
    "Guerra franco-indiana",
    "Fresno (California)",
    "Islamismo",
    "Kenya",
    "Martin Lutero",
    "Ossigeno",
    "Commutazione di pacchetto",
    "Parlamento scozzese",
    "Docente",
]


@pytest.fixture(scope="session")
def italian_scorer() -> Path:
    """The real Italian scorer in the default cache (built on first use, a few minutes)."""
    return build_italian_scorer()


@pytest.fixture(scope="session")
def scorer(italian_scorer: Path) -> MLMScorer:
    return MLMScorer(italian_scorer)


@pytest.fixture(scope="session")
def heldout_sample() -> list[str]:
    """60 held-out sentences of 6 to 40 words, drawn with a fixed seed."""
    pool = [s for s in heldout_sentences() if 6 <= len(s.split()) <= 40]
    return random.Random(7).sample(pool, 60)


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


# -- the held-out split ---------------------------------------------------------------


def test_heldout_rule_is_stable_and_whole_articles() -> None:
    articles = load_articles()
    assert len(articles) == 48
    assert [a.title for a in articles if is_heldout_article(a.title)] == HELDOUT_TITLES
    training, heldout = split_articles(articles)
    assert [a.title for a in heldout] == HELDOUT_TITLES
    assert len(training) + len(heldout) == len(articles)
    held_contexts = {c for a in heldout for c in a.contexts}
    train_contexts = {c for a in training for c in a.contexts}
    assert held_contexts and train_contexts and not held_contexts & train_contexts
    # Every held-out sentence comes from a held-out context, none from a training one.
    sentences = heldout_sentences()
    assert len(sentences) > 1000
    train_text = " ".join(train_contexts)
    long_ones = [s for s in sentences if len(s) > 80]
    assert sum(s in train_text for s in long_ones) == 0


def test_every_squad_item_of_a_heldout_article_can_be_told() -> None:
    # The rule needs the title only: the evaluator can filter SQuAD-it items with it.
    with gzip.open(default_source(), "rt", encoding="utf-8") as fh:
        data = json.load(fh)
    held = [a for a in data["data"] if is_heldout_article(a["title"])]
    questions = sum(len(p["qas"]) for a in held for p in a["paragraphs"])
    assert 1500 <= questions <= 2500  # plenty for a seeded evaluation subset


# -- the cache ------------------------------------------------------------------------


def test_cached_build_is_reused(italian_scorer: Path) -> None:
    marker = italian_scorer / MARKER
    before = marker.stat().st_mtime_ns
    t = time.perf_counter()
    again = build_italian_scorer()
    assert time.perf_counter() - t < 2.0  # no training, not even a model load
    assert again == italian_scorer
    assert marker.stat().st_mtime_ns == before
    assert italian_scorer == default_models_dir() / f"{DIR_PREFIX}{cache_key()}"


def test_key_depends_on_source_and_steps(tmp_path: Path) -> None:
    copy = tmp_path / "squad.json.gz"
    copy.write_bytes(default_source().read_bytes())
    assert cache_key(copy) == cache_key()
    assert cache_key(steps_scale=SCALE) != cache_key()
    copy.write_bytes(copy.read_bytes() + b"\0")
    assert cache_key(copy) != cache_key()


def test_missing_source_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError):
        build_italian_scorer(tmp_path, source=tmp_path / "absent.json.gz")
    bad = tmp_path / "bad.json"
    bad.write_text('{"data": 3}', encoding="utf-8")
    with pytest.raises(ModelError):
        build_italian_scorer(tmp_path, source=bad)


def test_reduced_builds_are_deterministic_and_interruptions_redone(tmp_path: Path) -> None:
    lines: list[str] = []
    first = build_italian_scorer(tmp_path / "a", lines.append, steps_scale=SCALE)
    assert first.name == f"{DIR_PREFIX}{cache_key(steps_scale=SCALE)}"
    assert (first / MARKER).is_file() and lines
    # An interrupted build elsewhere: a leftover temp dir and a final dir without marker.
    other = tmp_path / "b"
    stale = other / f".tmp-{first.name}-dead"
    stale.mkdir(parents=True)
    (other / first.name).mkdir()
    (other / first.name / "junk").write_text("half a build")
    second = build_italian_scorer(other, steps_scale=SCALE)
    assert (second / MARKER).is_file()
    assert not stale.exists() and not (second / "junk").exists()
    ta, tb = _tensors(first), _tensors(second)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == torch.float32
        assert torch.equal(ta[name], tb[name]), name
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()
    ma = json.loads((first / "manifest.json").read_text())
    mb = json.loads((second / "manifest.json").read_text())
    assert ma["final_loss"] == mb["final_loss"]
    assert not list((tmp_path / "a").glob(".tmp-*"))


# -- the model ------------------------------------------------------------------------


def test_manifest_and_licence(italian_scorer: Path) -> None:
    m = json.loads((italian_scorer / "manifest.json").read_text())
    assert m["model"] == MODEL_NAME and m["licence"] == LICENCE == "CC BY-SA 4.0"
    assert m["heldout_articles"] == HELDOUT_TITLES
    assert m["training_articles"] == 48 - len(HELDOUT_TITLES)
    assert 150_000 <= m["training_words"] <= 220_000
    assert m["steps"] == m["hyperparameters"]["steps"] > 0
    assert m["final_loss"] > 0 and m["heldout_mlm_loss"] > 0 and m["build_seconds"] > 0
    readme = (italian_scorer / "README.md").read_text()
    assert "CC BY-SA 4.0" in readme and "Croce" in readme and "SQuAD-it" in readme


def test_loads_offline_with_auto_classes(italian_scorer: Path) -> None:
    tok = AutoTokenizer.from_pretrained(italian_scorer, local_files_only=True)
    model = AutoModelForMaskedLM.from_pretrained(italian_scorer, local_files_only=True)
    assert model.config.vocab_size == len(tok)
    assert next(model.parameters()).dtype == torch.float32
    enc = tok("Roma è la capitale d'Italia.")["input_ids"]
    assert enc[0] == tok.cls_token_id and enc[-1] == tok.sep_token_id
    assert tok.mask_token == "[MASK]" and tok.pad_token == "[PAD]"
    assert tok("Roma")["input_ids"] != tok("roma")["input_ids"]  # cased


def test_prefers_heldout_italian_to_shuffled_words(
    scorer: MLMScorer, heldout_sample: list[str]
) -> None:
    rng = random.Random(11)
    shuffled = []
    for text in heldout_sample:
        words = text.split()
        while words == text.split():
            rng.shuffle(words)
        shuffled.append(" ".join(words))
    real = scorer.score(heldout_sample)
    fake = scorer.score(shuffled)
    mean_real = statistics.mean(r.nll for r in real)
    mean_fake = statistics.mean(r.nll for r in fake)
    # Measured on the full build: 3.81 against 6.26 nats, 60 pairs of 60 won.
    assert mean_real < mean_fake - 1.0, (mean_real, mean_fake)
    wins = sum(a.nll < b.nll for a, b in zip(real, fake, strict=True))
    assert wins >= 55, wins


def test_prefers_heldout_italian_to_the_toy_generator(
    scorer: MLMScorer, heldout_sample: list[str], demo_models: DemoModels
) -> None:
    tok = AutoTokenizer.from_pretrained(demo_models.generator)
    model = AutoModelForCausalLM.from_pretrained(demo_models.generator).eval()
    fmt = ChatFormat()
    prompts = (
        fmt.user_tag,
        f"{fmt.user_tag} Ciao! Come posso cucinare la pasta?\n{fmt.assistant_tag}",
        f"{fmt.user_tag} Qual è la capitale della Francia?\n{fmt.assistant_tag}",
    )
    turns: list[str] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for prompt in prompts:
            enc = tok(prompt, return_tensors="pt")
            for _ in range(6):
                out = model.generate(
                    **enc, max_new_tokens=48, do_sample=True, temperature=0.7, top_p=0.95
                )
                text = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
                assert isinstance(text, str)
                turn = fmt.clean_generation(text)
                if len(turn.split()) >= 4:
                    turns.append(turn)
    assert len(turns) >= 12, turns
    real = scorer.score(heldout_sample)
    generated = scorer.score(turns)
    mean_real = statistics.mean(r.nll for r in real)
    mean_gen = statistics.mean(r.nll for r in generated)
    # Measured on the full build: 3.81 against 5.01 nats (17 turns; the seed messages,
    # real Italian chat outside the training domain, score 4.58).
    assert mean_real < mean_gen - 0.5, (mean_real, mean_gen, turns)
