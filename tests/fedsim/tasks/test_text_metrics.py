"""Text metrics against values worked out by hand on fixed strings."""

from __future__ import annotations

import math

import pytest

from fedsim.tasks import text_metrics
from fedsim.tasks.text_metrics import (
    cider_tokenize,
    generation_metrics,
    normalize_answer,
    sample_metrics,
)

KEYS = {"bleu", "rouge_l", "cider", "exact_match"}


def test_identical_corpus_scores_one_everywhere():
    preds = ["the cat sat on the mat", "a dog ran in the park"]
    out = generation_metrics(preds, list(preds))
    assert set(out) == KEYS
    assert all(type(v) is float for v in out.values())
    assert out["bleu"] == pytest.approx(1.0)
    assert out["rouge_l"] == pytest.approx(1.0)
    assert out["exact_match"] == 1.0


# --- BLEU -------------------------------------------------------------------------------------


def test_bleu_modified_precisions_no_brevity_penalty():
    # pred "the cat sat on the mat" (6 tokens) vs ref "the cat sat on a mat" (6 tokens):
    #   1-grams: the x2 (clipped to 1), cat, sat, on, mat match -> 5/6
    #   2-grams: the cat, cat sat, sat on match; on the, the mat do not -> 3/5
    #   3-grams: the cat sat, cat sat on match of 4 -> 2/4
    #   4-grams: the cat sat on matches of 3 -> 1/3
    #   equal lengths -> BP = 1
    #   BLEU = (5/6 * 3/5 * 1/2 * 1/3) ** (1/4) = (1/12) ** 0.25 = 0.537285
    out = generation_metrics(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert out["bleu"] == pytest.approx((1 / 12) ** 0.25, abs=1e-9)


def test_bleu_brevity_penalty():
    # pred "the cat sat on" (4) vs ref "the cat sat on the mat" (6): all precisions 1,
    # BP = exp(1 - 6/4) = exp(-0.5) = 0.606531
    out = generation_metrics(["the cat sat on"], ["the cat sat on the mat"])
    assert out["bleu"] == pytest.approx(math.exp(-0.5), abs=1e-9)


def test_bleu_exp_smoothing_of_a_zero_order():
    # pred "the cat sat down" vs ref "the cat sat up": 3/4, 2/3, 1/2 and 0/1 4-grams.
    # 'exp' smoothing replaces the first zero precision by 1 / (2 * total) = 1/2, so
    #   BLEU = (3/4 * 2/3 * 1/2 * 1/2) ** (1/4) = (1/8) ** 0.25 = 0.594604
    out = generation_metrics(["the cat sat down"], ["the cat sat up"])
    assert out["bleu"] == pytest.approx((1 / 8) ** 0.25, abs=1e-9)


def test_bleu_pools_ngram_counts_over_the_corpus():
    # Sample 1 is the 5/6, 3/5, 2/4, 1/3 case above; sample 2 is a perfect 4-token match
    # (4/4, 3/3, 2/2, 1/1). Corpus BLEU adds numerators and denominators:
    #   (9/10 * 6/8 * 4/6 * 2/4) ** (1/4) = 0.225 ** 0.25 = 0.688737
    # which is not the mean of the sentence scores ((0.537 + 1) / 2 = 0.769).
    preds = ["the cat sat on the mat", "a b c d"]
    refs = ["the cat sat on a mat", "a b c d"]
    assert generation_metrics(preds, refs)["bleu"] == pytest.approx(0.225**0.25, abs=1e-9)


def test_bleu_13a_splits_punctuation_and_keeps_case():
    # 13a makes "mat." two tokens, so the full stop is just one more matching token.
    assert generation_metrics(["the cat sat on the mat."], ["the cat sat on the mat."])[
        "bleu"
    ] == pytest.approx(1.0)
    # No lower-casing: "The" != "the" -> 1-grams 3/4, 2-grams 2/3, 3-grams 1/2, 4-grams 0/1
    # smoothed to 1/2: the same (1/8) ** 0.25 as the smoothing case.
    out = generation_metrics(["The cat sat on"], ["the cat sat on"])
    assert out["bleu"] == pytest.approx((1 / 8) ** 0.25, abs=1e-9)


# --- ROUGE-L ----------------------------------------------------------------------------------


def test_rouge_l_from_lcs():
    # pred "the cat was sitting on the mat" (7) vs ref "the cat sat on the mat" (6):
    #   LCS = "the cat on the mat" = 5, P = 5/7, R = 5/6,
    #   F = 2PR / (P + R) = (50/42) / (65/42) = 10/13 = 0.769231
    out = generation_metrics(["the cat was sitting on the mat"], ["the cat sat on the mat"])
    assert out["rouge_l"] == pytest.approx(10 / 13, abs=1e-9)


def test_rouge_l_is_the_mean_over_samples():
    # Sample 1: 10/13 (above). Sample 2: identical -> 1. Mean = (10/13 + 1) / 2 = 23/26.
    preds = ["the cat was sitting on the mat", "a dog"]
    refs = ["the cat sat on the mat", "a dog"]
    assert generation_metrics(preds, refs)["rouge_l"] == pytest.approx(23 / 26, abs=1e-9)


def test_rouge_l_ignores_case_and_punctuation():
    # rouge-score's tokeniser lower-cases and keeps only [a-z0-9] runs.
    assert sample_metrics("The cat, sat!", ["the cat sat"])["rouge_l"] == pytest.approx(1.0)


# --- exact match ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Paris", "paris"),
        ("Paris.", "paris"),
        ("  Paris  ", "paris"),
        ("New   York\tCity\n", "new york city"),
        ("Really?!", "really"),
        ("wait ...", "wait"),
        ("3.5", "3.5"),
        ("", ""),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_exact_match_after_normalisation():
    # "Paris." == "paris", " new  york " == "New York"; "Lyon" != "Paris" -> 2/3.
    preds = ["Paris.", " new  york ", "Lyon"]
    refs = ["paris", "New York", "Paris"]
    assert generation_metrics(preds, refs)["exact_match"] == pytest.approx(2 / 3)


# --- several references -----------------------------------------------------------------------


def test_multiple_references_take_the_best():
    # ROUGE-L and exact match take the max over references: the second reference matches.
    out = sample_metrics("the cat sat", ["a dog ran", "The cat sat."])
    assert out == {"rouge_l": pytest.approx(1.0), "exact_match": 1.0}
    # Ref 1 "the cat was sitting on the mat" gives 10/13 (LCS 5 of 7 and 6 as above, roles
    # swapped); ref 2 "the cat" gives P = 2/6, R = 2/2, F = (4/6)/(8/6) = 1/2. Max = 10/13.
    out = sample_metrics("the cat sat on the mat", ["the cat was sitting on the mat", "the cat"])
    assert out == {"rouge_l": pytest.approx(10 / 13), "exact_match": 0.0}


def test_bleu_with_multiple_references_clips_against_the_max_count():
    # pred "the cat sat on the mat"; refs "the cat sat on a mat" and "the dog on the mat".
    # n-gram counts are clipped to the max over references, so the second reference adds a
    # second "the" and "on the", "the mat", "on the mat":
    #   1-grams 6/6, 2-grams 5/5, 3-grams 3/4 (the cat sat, cat sat on, on the mat),
    #   4-grams 1/3 (the cat sat on); closest reference length 6 -> BP = 1
    #   BLEU = (1 * 1 * 3/4 * 1/3) ** (1/4) = 0.25 ** 0.25 = 0.707107
    out = generation_metrics(
        ["the cat sat on the mat"], [["the cat sat on a mat", "the dog on the mat"]]
    )
    assert out["bleu"] == pytest.approx(0.25**0.25, abs=1e-9)


def test_flat_references_equal_singleton_lists_and_counts_may_vary():
    preds = ["the cat sat on the mat", "a dog ran in the park"]
    flat = ["the cat sat on a mat", "a dog ran in a park"]
    nested = [[r] for r in flat]
    assert generation_metrics(preds, flat) == generation_metrics(preds, nested)
    # One sample with two references, one with one: sacrebleu gets a None-padded stream.
    varied = generation_metrics(preds, [[flat[0], "the cat sat on the mat"], [flat[1]]])
    assert varied["exact_match"] == 0.5
    assert varied["bleu"] > generation_metrics(preds, flat)["bleu"]


# --- CIDEr-D ----------------------------------------------------------------------------------


def test_cider_tokenize_mirrors_ptb_for_simple_strings():
    assert cider_tokenize("A dog, running!") == "a dog running"
    assert cider_tokenize('He said "well-known" (sic)...') == "he said well-known sic"
    assert cider_tokenize("It costs 3.5 dollars.") == "it costs 3.5 dollars"
    assert cider_tokenize("") == ""


def test_cider_perfect_corpus_is_ten():
    # Two samples with no shared n-gram: every reference n-gram has df = 1, so its weight is
    # tf * (log 2 - log 1) = log 2 in both prediction and reference. Identical vectors give a
    # cosine of 1 at each order n = 1..4 (both >= 4 tokens), equal lengths give a Gaussian
    # penalty of 1, so each sample scores 10 * mean(1, 1, 1, 1) = 10.
    preds = ["the cat sat on the mat", "a dog ran in a park"]
    assert generation_metrics(preds, list(preds))["cider"] == pytest.approx(10.0)


def test_cider_short_sentences_lose_the_missing_orders():
    # Three tokens: no 4-grams, so that order contributes 0 -> 10 * (1 + 1 + 1 + 0) / 4 = 7.5.
    preds = ["red apple pie", "blue sky today"]
    assert generation_metrics(preds, list(preds))["cider"] == pytest.approx(7.5)


def test_cider_partial_match_by_hand():
    # Sample 1 perfect: 10. Sample 2 pred "e f g x" vs ref "e f g h": every n-gram has weight
    # log 2 (x is unseen, its df is clamped to 1), so the clipped cosine at each order is
    # (shared n-grams) / (n-grams per side):
    #   1-grams 3/4, 2-grams 2/3, 3-grams 1/2, 4-grams 0, same length -> no penalty
    #   sample 2 = 10 * (3/4 + 2/3 + 1/2 + 0) / 4 = 10 * (23/12) / 4 = 230/48
    #   corpus = (10 + 230/48) / 2 = 710/96 = 7.395833
    preds = ["a b c d", "e f g x"]
    refs = ["a b c d", "e f g h"]
    assert generation_metrics(preds, refs)["cider"] == pytest.approx(710 / 96)


def test_cider_orders_perfect_partial_disjoint():
    refs = ["the cat sat on the mat", "a dog ran in a park", "birds fly over the sea"]
    perfect = generation_metrics(list(refs), refs)["cider"]
    partial = generation_metrics(
        ["the cat sat on a rug", "a dog ran in the yard", "birds fly over"], refs
    )["cider"]
    disjoint = generation_metrics(["zebra", "quantum flux", "purple monkey dishwasher"], refs)[
        "cider"
    ]
    assert perfect > partial > disjoint
    assert disjoint == 0.0


def test_cider_single_sample_is_zero():
    # idf = log(1) - log(df) = 0 for every reference n-gram of a one-sample corpus.
    out = generation_metrics(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert out["cider"] == 0.0


def test_cider_nan_from_library_becomes_zero(monkeypatch):
    class NanCider:
        def compute_score(self, gts, res):
            return float("nan"), None

    monkeypatch.setattr(text_metrics, "Cider", NanCider)
    preds = ["a b", "c d"]
    assert generation_metrics(preds, list(preds))["cider"] == 0.0


# --- edge cases -------------------------------------------------------------------------------


def test_empty_prediction_scores_zero():
    out = generation_metrics(["", ""], ["the cat sat", "a dog ran"])
    assert out == {"bleu": 0.0, "rouge_l": 0.0, "cider": 0.0, "exact_match": 0.0}
    assert all(type(v) is float for v in out.values())


def test_empty_references_do_not_crash():
    out = generation_metrics(["a b", "c d"], ["", ""])
    assert all(not math.isnan(v) for v in out.values())
    assert out["cider"] == 0.0


def test_empty_inputs_raise():
    with pytest.raises(ValueError, match="predictions is empty"):
        generation_metrics([], [])
    with pytest.raises(ValueError, match="references is empty"):
        sample_metrics("a", [])
    with pytest.raises(ValueError, match=r"samples \[1\] have an empty reference list"):
        generation_metrics(["a", "b"], [["a"], []])


def test_length_mismatch_names_both_lengths():
    with pytest.raises(ValueError, match="2 predictions, 3 references"):
        generation_metrics(["a", "b"], ["a", "b", "c"])


def test_bare_string_is_rejected():
    with pytest.raises(TypeError, match="bare string"):
        generation_metrics(["a"], "a")
    with pytest.raises(TypeError, match="bare string"):
        sample_metrics("a", "a")
