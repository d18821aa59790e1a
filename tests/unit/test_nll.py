"""The MLM NLL scorer: the batched computation equals the plain definition."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from corpusfactory.engines.models.demo import DemoModels
from corpusfactory.engines.scoring.nll import (
    MLMScorer,
    direct_nll,
    encoder_parameters,
    flops_per_masked_copy,
    nll_percentile,
    split_sentences,
)
from corpusfactory.errors import ModelError
from corpusfactory.seeds import load_seeds

# Loads a model, runs an engine or builds files: the second tier (make test-fast skips it).
pytestmark = pytest.mark.slow

TEXTS = [
    "Mettili in ammollo in acqua tiepida per circa venti minuti, poi strizzali.",
    "Ciao!",
    "Il treno per Firenze parte alle 8:45 dal binario 3, ma oggi è in ritardo.",
    "Perché il cielo è azzurro? Dipende dalla diffusione della luce nell'atmosfera.",
    "Zürich, Ærø e ħ: caratteri rari, forse sconosciuti al vocabolario.",
    "bene",
]


@pytest.fixture(scope="module")
def scorer(demo_models: DemoModels) -> MLMScorer:
    return MLMScorer(demo_models.scorer, masked_batch_size=128)


def _close(a: float, b: float, tol: float = 1e-4) -> bool:
    return abs(a - b) <= tol


def test_batched_scores_equal_direct_definition(scorer: MLMScorer) -> None:
    results = scorer.score(TEXTS)
    assert len(results) == len(TEXTS)
    for text, r in zip(TEXTS, results, strict=True):
        expected = direct_nll(scorer.model, scorer.tokenizer, text)
        assert not r.too_long
        assert r.tokens == len(scorer.tokenizer(text, add_special_tokens=False)["input_ids"])
        assert math.isfinite(r.nll) and r.nll > 0
        assert _close(r.nll, expected), (text, r.nll, expected)


def test_batch_size_does_not_change_scores(demo_models: DemoModels) -> None:
    one = MLMScorer(demo_models.scorer, masked_batch_size=1).score(TEXTS)
    # 7 copies per batch: batches straddle texts of different lengths (padding).
    seven = MLMScorer(demo_models.scorer, masked_batch_size=7).score(TEXTS)
    many = MLMScorer(demo_models.scorer, masked_batch_size=128).score(TEXTS)
    for a, b, c in zip(one, seven, many, strict=True):
        assert a.tokens == b.tokens == c.tokens
        assert _close(a.nll, c.nll, 1e-5) and _close(b.nll, c.nll, 1e-5)


def test_score_order_and_context_independence(scorer: MLMScorer) -> None:
    alone = [scorer.score([t])[0] for t in TEXTS]
    together = scorer.score(list(reversed(TEXTS)))[::-1]
    for a, b in zip(alone, together, strict=True):
        assert a.tokens == b.tokens
        assert _close(a.nll, b.nll, 1e-5)


def test_empty_texts_have_no_score(scorer: MLMScorer) -> None:
    results = scorer.score(["", "   ", TEXTS[1]])
    for r in results[:2]:
        assert r.tokens == 0 and not r.too_long and math.isnan(r.nll)
    assert results[2].tokens > 0 and math.isfinite(results[2].nll)
    assert scorer.score([]) == []
    assert math.isnan(direct_nll(scorer.model, scorer.tokenizer, ""))


def test_too_long_texts_are_flagged_not_scored(demo_models: DemoModels) -> None:
    short = MLMScorer(demo_models.scorer, max_tokens=8)
    long_text, short_text = TEXTS[0], "Ciao, come stai?"
    n_long = len(short.tokenizer(long_text, add_special_tokens=False)["input_ids"])
    n_short = len(short.tokenizer(short_text, add_special_tokens=False)["input_ids"])
    assert n_long > 8 >= n_short
    r_long, r_short = short.score([long_text, short_text])
    assert r_long.too_long and math.isnan(r_long.nll) and r_long.tokens == n_long
    assert not r_short.too_long and r_short.tokens == n_short
    assert _close(r_short.nll, direct_nll(short.model, short.tokenizer, short_text))


def test_max_tokens_is_capped_by_the_model_positions(demo_models: DemoModels) -> None:
    scorer = MLMScorer(demo_models.scorer, max_tokens=100_000)
    assert scorer.max_tokens == scorer.model.config.max_position_embeddings - 2
    text = "parola " * 600
    n = len(scorer.tokenizer(text, add_special_tokens=False)["input_ids"])
    r = scorer.score([text])[0]
    assert r.too_long and r.tokens == n >= 600 and math.isnan(r.nll)


def test_split_sentences() -> None:
    assert split_sentences("Ciao! Come stai? Bene, grazie.") == [
        "Ciao!",
        "Come stai?",
        "Bene, grazie.",
    ]
    assert split_sentences("Costa 3.50 euro.") == ["Costa 3.50 euro."]
    assert split_sentences("  Una sola frase  ") == ["Una sola frase"]
    assert split_sentences("   ") == []


def test_sentence_granularity_is_token_weighted_mean(demo_models: DemoModels) -> None:
    text = (
        "Stasera vorrei preparare un risotto. Ho solo funghi secchi! "
        "Come devo trattarli prima di cucinarli?"
    )
    sentences = split_sentences(text)
    assert len(sentences) == 3
    scorer = MLMScorer(demo_models.scorer, granularity="sentence")
    tok, model = scorer.tokenizer, scorer.model
    counts = [len(tok(s, add_special_tokens=False)["input_ids"]) for s in sentences]
    nlls = [direct_nll(model, tok, s) for s in sentences]
    expected = sum(n * x for n, x in zip(counts, nlls, strict=True)) / sum(counts)
    result = scorer.score([text])[0]
    assert result.tokens == sum(counts)
    assert _close(result.nll, expected)
    # Each sentence is scored in its own context, so the message-level score differs.
    whole = MLMScorer(demo_models.scorer).score([text])[0]
    assert not _close(whole.nll, result.nll, 1e-3)
    # A single-sentence text scores the same at both granularities.
    single = TEXTS[0]
    at_message = MLMScorer(demo_models.scorer).score([single])[0]
    assert _close(scorer.score([single])[0].nll, at_message.nll, 1e-5)


def test_sentence_granularity_too_long_and_empty(demo_models: DemoModels) -> None:
    scorer = MLMScorer(demo_models.scorer, max_tokens=8, granularity="sentence")
    ok, bad, empty = scorer.score(
        [
            "Ciao. Come stai?",
            "Ciao. Questa frase invece è decisamente troppo lunga per il limite.",
            " ",
        ]
    )
    assert not ok.too_long and math.isfinite(ok.nll)
    assert bad.too_long and math.isnan(bad.nll) and bad.tokens > 8
    assert empty.tokens == 0 and not empty.too_long and math.isnan(empty.nll)


def test_nll_percentile(scorer: MLMScorer) -> None:
    texts = [*TEXTS, ""]
    values = [r.nll for r in scorer.score(TEXTS)]
    assert nll_percentile(scorer, texts, 50) == pytest.approx(float(np.percentile(values, 50)))
    assert nll_percentile(scorer, texts, 100) == pytest.approx(max(values))
    assert nll_percentile(scorer, texts, 10) < nll_percentile(scorer, texts, 90)
    with pytest.raises(ModelError):
        nll_percentile(scorer, ["", " "], 50)
    with pytest.raises(ValueError):
        nll_percentile(scorer, texts, 120)


def test_seed_percentile_threshold_admits_that_share_of_seeds(scorer: MLMScorer) -> None:
    texts = [m.text for c in load_seeds()[:10] for m in c.messages]
    threshold = nll_percentile(scorer, texts, 80)
    admitted = sum(r.nll <= threshold for r in scorer.score(texts))
    assert abs(admitted / len(texts) - 0.8) < 0.05


def test_flops_estimate(scorer: MLMScorer) -> None:
    model, cfg = scorer.model, scorer.model.config
    p_enc = encoder_parameters(model)
    # The BERT MLM has no pooler: the encoder parameters are exactly its layers'.
    assert p_enc == sum(p.numel() for p in model.bert.encoder.parameters())
    h, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    for seq_len in (3, 12, 40):
        expected = 2 * p_enc * seq_len + 4 * layers * seq_len**2 * h + 2 * (h * h + h * vocab)
        assert flops_per_masked_copy(model, seq_len) == pytest.approx(expected)
    # A text of n tokens costs n copies of n + 2 positions; unscored texts cost nothing.
    assert scorer.estimate_flops([10]) == pytest.approx(10 * flops_per_masked_copy(model, 12))
    assert scorer.estimate_flops([0, 10_000]) == 0.0


def test_demo_name_and_id(demo_models: DemoModels) -> None:
    scorer = MLMScorer("demo:scorer")
    assert scorer.id == str(demo_models.scorer)
    assert MLMScorer(demo_models.scorer).id == str(demo_models.scorer)


def test_bad_model_and_arguments(tmp_path: Path, demo_models: DemoModels) -> None:
    with pytest.raises(ModelError):
        MLMScorer(tmp_path)
    with pytest.raises(ValueError):
        MLMScorer(demo_models.scorer, masked_batch_size=0)
    with pytest.raises(ValueError):
        MLMScorer(demo_models.scorer, granularity="word")  # type: ignore[arg-type]


def test_early_stop_gives_the_same_decisions_and_lower_bounds(scorer: MLMScorer) -> None:
    seeds = [m.text for c in load_seeds(None) for m in c.messages][:48]
    full = scorer.score(seeds)
    values = sorted(r.nll for r in full if r.tokens)
    # A bar in the middle (none exactly on it), and one far below every text.
    k = len(values) // 2
    for threshold in ((values[k] + values[k + 1]) / 2, 0.5 * values[0]):
        early = scorer.score(seeds, stop_above=threshold)
        stopped = 0
        for f, e in zip(full, early, strict=True):
            assert e.tokens == f.tokens
            # The decision (reject when nll >= threshold) is the same either way.
            assert (e.nll >= threshold) == (f.nll >= threshold), (threshold, e, f)
            if e.lower_bound:
                stopped += 1
                assert e.nll <= f.nll + 1e-5 and f.nll >= threshold
            else:
                assert e.nll == pytest.approx(f.nll, abs=1e-5)  # other batches: float noise
        if threshold < values[0]:
            assert stopped == sum(1 for r in full if r.tokens)  # all stopped early
    assert not any(r.lower_bound for r in scorer.score(seeds))


@pytest.mark.parametrize(("precision", "tolerance"), [("bfloat16", 0.25), ("int8", 0.25)])
def test_lower_precisions_stay_close_to_float32(
    demo_models: DemoModels, scorer: MLMScorer, precision: str, tolerance: float
) -> None:
    low = MLMScorer(demo_models.scorer, masked_batch_size=128, precision=precision)
    assert low.precision == precision and low.label.endswith(f"@{precision}")
    ref = scorer.score(TEXTS)
    got = low.score(TEXTS)
    for r, g in zip(ref, got, strict=True):
        if r.tokens:
            assert abs(g.nll - r.nll) <= tolerance * max(1.0, r.nll), (precision, r, g)


def test_auto_precision_follows_the_hardware(demo_models: DemoModels) -> None:
    from corpusfactory.engines.hardware import cpu_has_native_bf16

    auto = MLMScorer(demo_models.scorer, precision="auto")
    assert auto.precision == ("bfloat16" if cpu_has_native_bf16() else "float32")
    with pytest.raises(ModelError, match="unknown scorer precision"):
        MLMScorer(demo_models.scorer, precision="float8")
