"""Text metrics on every script: tokens, perfect answers, hand-computed partial scores, ASCII
text scored exactly as the libraries score it on their own, and inputs that must not break."""

from __future__ import annotations

import math
import random
import re
from collections import Counter

import pytest
from pycocoevalcap.cider.cider import Cider
from rouge_score.rouge_scorer import RougeScorer
from rouge_score.tokenize import tokenize as rouge_score_tokenize
from sacrebleu.metrics import BLEU

from fedsim.tasks.text_metrics import (
    cider_tokenize,
    generation_metrics,
    normalize_answer,
    sample_metrics,
)
from fedsim.tasks.text_tokens import Kind, bleu_pretokenize, cider_tokens, classify, rouge_tokens

FAMILY = "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # man ZWJ woman ZWJ girl
FRANCE = "\U0001f1eb\U0001f1f7"  # regional indicators F R
JAPAN = "\U0001f1ef\U0001f1f5"
THUMBS_MEDIUM = "\U0001f44d\U0001f3fd"  # thumbs up + medium skin tone
THUMBS = "\U0001f44d"
KEYCAP_ONE = "1\ufe0f\u20e3"
CODER_DARK = "\U0001f469\U0001f3ff\u200d\U0001f4bb"  # woman, dark skin tone, ZWJ laptop
ENGLAND = "\U0001f3f4\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f"  # tag flag

# --- tokens -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        pytest.param("القطة تجلس على السجادة.", ["القطة", "تجلس", "على", "السجادة"], id="arabic"),
        pytest.param("مرحبا، كيف حالك؟", ["مرحبا", "كيف", "حالك"], id="arabic-punct"),
        pytest.param("שָׁלוֹם, עולם!", ["שָׁלוֹם", "עולם"], id="hebrew-niqqud"),
        pytest.param("猫坐在垫子上。", ["猫", "坐", "在", "垫", "子", "上"], id="chinese"),
        pytest.param(
            "ラーメンを食べた", ["ラ", "ー", "メ", "ン", "を", "食", "べ", "た"], id="japanese"
        ),
        pytest.param(
            "고양이가 매트 위에 앉았다", ["고양이가", "매트", "위에", "앉았다"], id="korean"
        ),
        pytest.param("Кошка СИДИТ", ["кошка", "сидит"], id="cyrillic"),
        pytest.param("Η ΓΆΤΑ κάθεται", ["η", "γάτα", "κάθεται"], id="greek"),
        pytest.param("बिल्ली चटाई पर", ["बिल्ली", "चटाई", "पर"], id="devanagari"),
        pytest.param("แมวนั่ง", ["แ", "ม", "ว", "นั่", "ง"], id="thai"),
        pytest.param(
            f"{FAMILY} {FRANCE}{JAPAN} {THUMBS_MEDIUM}{KEYCAP_ONE}{CODER_DARK}{ENGLAND}",
            [FAMILY, FRANCE, JAPAN, THUMBS_MEDIUM, KEYCAP_ONE, CODER_DARK, ENGLAND],
            id="emoji",
        ),
        pytest.param(
            "The 猫 says مرحبا👋 to Straße",
            ["the", "猫", "says", "مرحبا", "\U0001f44b", "to", "strasse"],
            id="mixed",
        ),
        # Composed and decomposed accents give the same token; underscore separates, as in
        # rouge-score.
        pytest.param("Café cafe\u0301 a_b", ["café", "café", "a", "b"], id="accents"),
    ],
)
def test_rouge_tokens_per_script(text, tokens):
    assert rouge_tokens(text) == tokens


def test_cider_tokens_keep_ptb_words_and_drop_punctuation_of_every_script():
    assert cider_tokens("A well-known café, 東京!") == ["a", "well-known", "café", "東", "京"]
    assert cider_tokens("«مرحبا»، كيف حالك؟") == ["مرحبا", "كيف", "حالك"]
    assert cider_tokens("「猫」です。") == ["猫", "で", "す"]
    # ASCII "#", "/", "@" stay tokens as in PTB; emoji are one token each.
    assert cider_tokens(f"#1 @home {FAMILY}{FRANCE}") == ["#", "1", "@", "home", FAMILY, FRANCE]
    assert cider_tokenize("Кошка — СИДИТ…") == "кошка сидит"


def test_bleu_pretokenize_spaces_out_what_13a_cannot_split():
    assert bleu_pretokenize("猫が好き") == " 猫  が  好  き "
    assert bleu_pretokenize("مرحبا، كيف حالك؟").split() == ["مرحبا", "،", "كيف", "حالك", "؟"]
    assert bleu_pretokenize(f"I{THUMBS_MEDIUM}{FRANCE}").split() == ["I", THUMBS_MEDIUM, FRANCE]
    # Case is kept (BLEU is case-sensitive); decomposed accents are composed.
    assert bleu_pretokenize("Cafe\u0301") == "Café"
    # Non-ASCII spaces become spaces; the zero-width space separates; a soft hyphen vanishes.
    assert bleu_pretokenize("a\u3000b\u200bc co\u00adop") == "a b c coop"


@pytest.mark.parametrize(
    ("cluster", "kind"),
    [
        (" ", Kind.SPACE),
        ("\u3000", Kind.SPACE),
        ("\u200b", Kind.SPACE),
        (FAMILY, Kind.EMOJI),
        (KEYCAP_ONE, Kind.EMOJI),
        ("\U0001f3fd", Kind.EMOJI),  # a skin tone on its own
        ("\U0001f1eb", Kind.EMOJI),  # an unpaired flag letter
        ("猫", Kind.UNSPACED),
        ("々", Kind.UNSPACED),
        ("ー", Kind.UNSPACED),
        ("ก", Kind.UNSPACED),
        ("한", Kind.WORD),
        ("é", Kind.WORD),
        ("٣", Kind.WORD),
        ("1", Kind.WORD),
        ("#", Kind.PUNCT),
        ("。", Kind.PUNCT),
        ("\u00ad", Kind.IGNORABLE),
        ("\u200f", Kind.IGNORABLE),
        ("$", Kind.OTHER),
        ("\x00", Kind.OTHER),
        ("\ud800", Kind.OTHER),
        ("\ue000", Kind.OTHER),
    ],
)
def test_cluster_kinds(cluster, kind):
    assert classify(cluster) is kind


# --- perfect answers --------------------------------------------------------------------------

# Two samples per script, each of at least four tokens (BLEU-4 and CIDEr-D need 4-grams). A
# token found in both samples weighs 0 in CIDEr-D, but identical vectors still have cosine 1.
PERFECT = {
    "arabic": ["القطة تجلس على السجادة", "الكلب يركض في الحديقة الكبيرة"],
    "hebrew": ["החתול יושב על השטיח", "הכלב רץ בפארק הגדול"],
    "chinese": ["猫坐在垫子上。", "小狗跑进公园"],
    "japanese": ["猫がマットに座る", "犬は公園を走った"],
    "korean": ["고양이가 매트 위에 앉았다", "큰 개가 공원에서 달렸다"],
    "cyrillic": ["Кошка сидит на коврике", "собака бежит по парку"],
    "greek": ["Η γάτα κάθεται στο χαλί", "ένας σκύλος τρέχει γρήγορα"],
    "devanagari": ["बिल्ली चटाई पर बैठी है", "कुत्ता पार्क में दौड़ रहा"],
    "thai": ["แมวนั่งบนเสื่อ", "หมาวิ่งในสวน"],
    "emoji": [f"{FAMILY} {FRANCE} {THUMBS_MEDIUM} {KEYCAP_ONE}", f"🐶🦊{JAPAN}{CODER_DARK}"],
    "mixed": ["The 猫 says مرحبا 👋🏼 to Ελλάδα", "שלום 世界 and привет 🌍"],
}


@pytest.mark.parametrize("script", sorted(PERFECT))
def test_a_perfect_answer_scores_full_marks_in_every_script(script):
    texts = PERFECT[script]
    out = generation_metrics(list(texts), list(texts))
    assert out["bleu"] == pytest.approx(1.0)
    assert out["rouge_l"] == pytest.approx(1.0)
    assert out["cider"] == pytest.approx(10.0)
    assert out["exact_match"] == 1.0
    for text in texts:
        assert sample_metrics(text, [text]) == {"rouge_l": pytest.approx(1.0), "exact_match": 1.0}


@pytest.mark.parametrize(
    "answer", ["猫", "مرحبا", "שלום", "🐱", FAMILY, FRANCE, THUMBS_MEDIUM, "한국어", "ไทย"]
)
def test_a_one_token_answer_scores_full_rouge_and_exact_match(answer):
    assert sample_metrics(answer, [answer]) == {"rouge_l": pytest.approx(1.0), "exact_match": 1.0}


# --- ROUGE-L by hand --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        # 猫 坐 在 地 上 (5) vs 猫 坐 在 垫 子 上 (6): LCS 猫坐在上 = 4, P = 4/5, R = 4/6,
        # F = 2PR / (P + R) = (16/15) / (22/15) = 8/11.
        pytest.param("猫坐在地上", "猫坐在垫子上", 8 / 11, id="chinese"),
        # 猫 が 座 る (4) vs 猫 が マ ッ ト に 座 る (8): LCS 4, P = 1, R = 1/2, F = 2/3.
        pytest.param("猫が座る", "猫がマットに座る", 2 / 3, id="japanese"),
        # 4 words against 4, the last differs: LCS 3, P = R = 3/4, F = 3/4.
        pytest.param("القطة تجلس على الأرض", "القطة تجلس على السجادة", 3 / 4, id="arabic"),
        # Punctuation dropped: 2 words against 4, LCS 2, P = 1, R = 1/2, F = 2/3.
        pytest.param("החתול, יושב!", "החתול יושב על השטיח", 2 / 3, id="hebrew"),
        # Case folded: LCS 2 of 3 and 2 (кошка, сидит), P = 2/3, R = 1, F = 4/5.
        pytest.param("КОШКА тихо СИДИТ", "кошка сидит", 4 / 5, id="cyrillic"),
        # A skin tone makes another emoji: LCS 2 of 3 and 3, F = 2/3.
        pytest.param(f"{FAMILY} {FRANCE} {THUMBS}", f"{FAMILY} {FRANCE} {THUMBS_MEDIUM}", 2 / 3),
        # The family is one token, not its three people: no token in common.
        pytest.param("👨 👩 👧", FAMILY, 0.0, id="zwj-family"),
        # Thai, per cluster: แ ม ว กิ น (5) vs แ ม ว นั่ ง (5): LCS 3, F = 3/5.
        pytest.param("แมวกิน", "แมวนั่ง", 3 / 5, id="thai"),
    ],
)
def test_rouge_l_from_lcs_in_other_scripts(prediction, reference, expected):
    out = generation_metrics([prediction], [reference])
    assert out["rouge_l"] == pytest.approx(expected, abs=1e-12)


# --- BLEU by a slow reference -----------------------------------------------------------------


def _reference_bleu(hyps: list[list[str]], refs: list[list[str]]) -> float:
    """Corpus BLEU-4 with mteval 'exp' smoothing, one reference per sample, from token lists."""
    correct, total = [0] * 4, [0] * 4
    for hyp, ref in zip(hyps, refs):
        for n in range(1, 5):
            h = Counter(tuple(hyp[i : i + n]) for i in range(len(hyp) - n + 1))
            r = Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
            correct[n - 1] += sum(min(c, r[g]) for g, c in h.items())
            total[n - 1] += sum(h.values())
    smooth, logs = 1.0, []
    for c, t in zip(correct, total):
        if c == 0:
            smooth *= 2
            logs.append(math.log(1 / (smooth * t)))
        else:
            logs.append(math.log(c / t))
    hyp_len, ref_len = sum(map(len, hyps)), sum(map(len, refs))
    bp = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
    return bp * math.exp(sum(logs) / 4)


def test_bleu_on_chinese_characters_by_hand():
    # 猫 坐 在 地 上 vs 猫 坐 在 垫 子 上: 1-grams 4/5, 2-grams 2/4 (猫坐, 坐在), 3-grams 1/3,
    # 4-grams 0/2 -> smoothed 1/(2*2) = 1/4; c = 5 < r = 6 -> BP = exp(1 - 6/5) = exp(-0.2).
    # BLEU = exp(-0.2) * (4/5 * 1/2 * 1/3 * 1/4) ** (1/4) = exp(-0.2) * (1/30) ** 0.25.
    expected = math.exp(-0.2) * (1 / 30) ** 0.25
    hyp, ref = list("猫坐在地上"), list("猫坐在垫子上")
    assert _reference_bleu([hyp], [ref]) == pytest.approx(expected, abs=1e-12)
    assert generation_metrics(["猫坐在地上"], ["猫坐在垫子上"])["bleu"] == pytest.approx(
        expected, abs=1e-9
    )


def test_bleu_on_emoji_by_hand():
    # 🐶 🐱 🐭 🐹 vs 🐶 🐱 🐭 🐰 (no spaces): 3/4, 2/3, 1/2 and 0/1 -> 1/2 smoothed,
    # BLEU = (3/4 * 2/3 * 1/2 * 1/2) ** (1/4) = (1/8) ** 0.25, as for the English case.
    out = generation_metrics(["🐶🐱🐭🐹"], ["🐶🐱🐭🐰"])
    assert out["bleu"] == pytest.approx((1 / 8) ** 0.25, abs=1e-9)


def test_bleu_splits_arabic_punctuation():
    # Prediction مرحبا ، كيف حالك (4 tokens) vs reference مرحبا ، كيف حالك ؟ (5): every n-gram
    # of the prediction matches, BP = exp(1 - 5/4) = exp(-0.25).
    out = generation_metrics(["مرحبا، كيف حالك"], ["مرحبا، كيف حالك؟"])
    assert out["bleu"] == pytest.approx(math.exp(-0.25), abs=1e-9)


def test_bleu_on_a_mixed_script_corpus_matches_the_slow_reference():
    preds = ["القطة تجلس على الأرض", "猫坐在地上", f"{FAMILY} {FRANCE} {THUMBS} 🐱", "Кошка спит"]
    refs = [
        "القطة تجلس على السجادة",
        "猫坐在垫子上",
        f"{FAMILY}{FRANCE}{THUMBS_MEDIUM}🐱",
        "Кошка спит",
    ]
    # The tokens, written out by hand: words, one per Han character, one per emoji; case kept.
    hyp_tokens = [
        ["القطة", "تجلس", "على", "الأرض"],
        ["猫", "坐", "在", "地", "上"],
        [FAMILY, FRANCE, THUMBS, "🐱"],
        ["Кошка", "спит"],
    ]
    ref_tokens = [
        ["القطة", "تجلس", "على", "السجادة"],
        ["猫", "坐", "在", "垫", "子", "上"],
        [FAMILY, FRANCE, THUMBS_MEDIUM, "🐱"],
        ["Кошка", "спит"],
    ]
    expected = _reference_bleu(hyp_tokens, ref_tokens)
    assert 0.0 < expected < 1.0
    assert generation_metrics(preds, refs)["bleu"] == pytest.approx(expected, abs=1e-9)


def test_bleu_is_case_sensitive_in_other_scripts_too():
    # Кошка vs кошка differ: 1-grams 3/4, 2-grams 2/3, 3-grams 1/2, 4-grams 0/1 -> 1/2.
    out = generation_metrics(["Кошка сидит на коврике"], ["кошка сидит на коврике"])
    assert out["bleu"] == pytest.approx((1 / 8) ** 0.25, abs=1e-9)


# --- CIDEr-D by hand --------------------------------------------------------------------------


def test_cider_partial_match_on_chinese_by_hand():
    # Two samples with no n-gram in common, so every reference n-gram has df = 1 and weight
    # tf * log 2 (an n-gram only in the prediction has its df clamped to 1: also log 2). The
    # clipped cosine at each order is then shared / sqrt(n_pred * n_ref).
    # Sample 1 (emoji, 4 tokens) is perfect: 10.
    # Sample 2: 猫 坐 在 地 上 vs 猫 坐 在 垫 上, equal lengths (no penalty):
    #   1-grams 4/5, 2-grams 2/4, 3-grams 1/3, 4-grams 0/2
    #   -> 10 * (4/5 + 1/2 + 1/3 + 0) / 4 = 10 * (49/30) / 4 = 49/12
    # Corpus: (10 + 49/12) / 2 = 169/24 = 7.041667.
    preds = ["🐶🐱🐭🐹", "猫坐在地上"]
    refs = ["🐶🐱🐭🐹", "猫坐在垫上"]
    assert generation_metrics(preds, refs)["cider"] == pytest.approx(169 / 24)


def test_cider_drops_arabic_and_hebrew_punctuation():
    # مرحبا، كيف حالك؟ and שלום, מה שלומך? are three tokens each once punctuation goes: no
    # 4-grams, so each scores 10 * (1 + 1 + 1 + 0) / 4 = 7.5 (with the punctuation kept as
    # tokens they would have 4-grams and score 10).
    preds = ["مرحبا، كيف حالك؟", "שלום, מה שלומך?"]
    assert generation_metrics(preds, list(preds))["cider"] == pytest.approx(7.5)


def test_cider_reference_n_gram_in_every_sample_weighs_nothing():
    # 🐱 starts both samples: df = N = 2, so its weight is 0 and the unigram cosine of sample 1
    # (🐱 🐶 🐭 vs 🐱 🐶 🐹) is 1 shared weighted n-gram (🐶) over norms sqrt(2) and sqrt(2):
    # 1/2; 2-grams: 🐱🐶 shared, 2 per side -> 1/2; 3-grams 0/1. Sample 2 is perfect but short:
    # unigram 🐱 weighs 0, 🐰 log 2 -> cosine 1; 2-grams 1; 3-grams 1; no 4-grams.
    #   sample 1 = 10 * (1/2 + 1/2 + 0 + 0) / 4 = 2.5
    #   sample 2 = 10 * (1 + 1 + 1 + 0) / 4 = 7.5      corpus = 5.0
    preds = ["🐱🐶🐭", "🐱🐰🐻"]
    refs = ["🐱🐶🐹", "🐱🐰🐻"]
    assert generation_metrics(preds, refs)["cider"] == pytest.approx(5.0)


# --- exact match ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("مرحبا؟", "مرحبا", 1.0),  # Arabic question mark is sentence-final
        ("猫。", "猫", 1.0),
        ("猫です！", "猫です", 1.0),  # full-width exclamation mark
        ("बिल्ली।", "बिल्ली", 1.0),  # danda
        ("ΓΆΤΑ", "γάτα", 1.0),
        ("STRASSE", "Straße", 1.0),
        ("cafe\u0301", "Café", 1.0),
        (f"{FAMILY}.", FAMILY, 1.0),
        (THUMBS, THUMBS_MEDIUM, 0.0),  # the skin tone is part of the answer
        ("猫、", "猫", 0.0),  # an ideographic comma is not sentence-final
        ("שלום עולם", "שלום  עולם ", 1.0),
    ],
)
def test_exact_match_in_other_scripts(prediction, reference, expected):
    assert generation_metrics([prediction], [reference])["exact_match"] == expected


def test_normalize_answer_folds_case_and_drops_final_stops_of_any_script():
    assert normalize_answer("  Die  STRAßE. ") == "die strasse"
    assert normalize_answer("Как дела?") == "как дела"
    assert normalize_answer("中文。。") == "中文"


# --- ASCII text scores as before --------------------------------------------------------------

# The regex cider_tokenize used before it learnt other scripts (PTB-like words, each other
# non-space character a token), and the punctuation it then dropped.
_OLD_CIDER_RE = re.compile(r"\w+(?:[-'.,/]\w+)*|[^\w\s]")
_OLD_DROPPED = frozenset(".?!,:;-'`\"()[]{}")


def _old_cider_tokenize(s: str) -> str:
    return " ".join(t for t in _OLD_CIDER_RE.findall(s.lower()) if t not in _OLD_DROPPED)


def _random_ascii(rng: random.Random, n: int) -> str:
    """Every ASCII character half the time, word-like text with punctuation otherwise."""
    if rng.random() < 0.5:
        alphabet = [chr(i) for i in range(128)]
    else:
        alphabet = list("abcABC019" + " " * 4 + ".,-'/_!?\"()$#@\t\n\r\x1c\x00")
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, n)))


def test_ascii_tokens_are_those_of_the_libraries_alone():
    rng = random.Random(27)
    for _ in range(2000):
        s = _random_ascii(rng, 30)
        assert rouge_tokens(s) == rouge_score_tokenize(s, None), repr(s)
        assert cider_tokenize(s) == _old_cider_tokenize(s), repr(s)
        assert bleu_pretokenize(s) == s, repr(s)
        assert normalize_answer(s) == " ".join(s.lower().split()).rstrip(".!?").rstrip(), repr(s)


def _library_scores(preds: list[str], refs: list[list[str]]) -> tuple[float, float, float]:
    """BLEU, mean ROUGE-L and CIDEr-D from the libraries with their own ASCII tokenisers."""
    bleu = BLEU(tokenize="13a", smooth_method="exp", effective_order=False)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(max(map(len, refs)))]
    scorer = RougeScorer(["rougeL"], use_stemmer=False)
    rouge = math.fsum(
        max(scorer.score(t, p)["rougeL"].fmeasure for t in r) for p, r in zip(preds, refs)
    ) / len(refs)
    gts = {i: [_old_cider_tokenize(t) for t in r] for i, r in enumerate(refs)}
    res = {i: [_old_cider_tokenize(p)] for i, p in enumerate(preds)}
    cider = float(Cider().compute_score(gts, res)[0]) if any(any(g) for g in gts.values()) else 0.0
    return bleu.corpus_score(preds, streams).score / 100.0, rouge, cider


def test_ascii_corpora_score_bit_identically_to_the_libraries_alone():
    rng = random.Random(2027)
    words = "the cat sat on a mat dog ran in park Paris 3.5 well-known don't x_y A. b, (c)!".split()
    for _ in range(60):
        k = rng.randint(2, 4)

        def text() -> str:
            if rng.random() < 0.2:
                return _random_ascii(rng, 20)
            return " ".join(rng.choice(words) for _ in range(rng.randint(0, 9)))

        preds = [text() for _ in range(k)]
        refs = [[text() for _ in range(rng.randint(1, 2))] for _ in range(k)]
        out = generation_metrics(preds, refs)
        assert (out["bleu"], out["rouge_l"], out["cider"]) == _library_scores(preds, refs), (
            preds,
            refs,
        )


# --- inputs that must not break the metrics ---------------------------------------------------


def _assert_defined(out: dict[str, float]) -> None:
    assert all(type(v) is float and math.isfinite(v) for v in out.values())
    assert 0.0 <= out["bleu"] <= 1.0 + 1e-12
    assert 0.0 <= out["rouge_l"] <= 1.0 + 1e-12
    assert 0.0 <= out["cider"] <= 10.0 + 1e-9


def test_only_punctuation_of_several_scripts_scores_zero():
    out = generation_metrics(["。、！", "«»—…"], ["؟،", "״׳"])
    _assert_defined(out)
    assert out == {"bleu": 0.0, "rouge_l": 0.0, "cider": 0.0, "exact_match": 0.0}


def test_only_whitespace_of_several_scripts_scores_zero():
    out = generation_metrics(["\u3000\u00a0 \t", "\u200b\n"], ["猫坐在垫子上", "кошка сидит"])
    _assert_defined(out)
    assert out == {"bleu": 0.0, "rouge_l": 0.0, "cider": 0.0, "exact_match": 0.0}


def test_a_lone_surrogate_in_a_prediction_is_one_more_token():
    # ROUGE-L drops it (not a letter): a perfect 1.0. BLEU counts it: cat ? sat on the mat (6)
    # vs cat sat on the mat (5): 5/6, 3/5, 2/4, 1/3, BP 1 -> (1/12) ** 0.25.
    out = generation_metrics(["cat \ud800 sat on the mat"], ["cat sat on the mat"])
    _assert_defined(out)
    assert out["rouge_l"] == pytest.approx(1.0)
    assert out["bleu"] == pytest.approx((1 / 12) ** 0.25, abs=1e-9)
    assert out["exact_match"] == 0.0


def test_surrogates_private_use_and_unassigned_code_points_alone():
    preds = ["\udfff", "\ue000\U000e0080", "\ud83d"]
    out = generation_metrics(preds, list(preds))
    _assert_defined(out)
    # No letters: no ROUGE-L tokens; under four tokens per sample: no BLEU-4; identical strings.
    assert out["rouge_l"] == 0.0
    assert out["bleu"] == 0.0
    assert out["exact_match"] == 1.0


def test_invisible_marks_do_not_break_a_perfect_answer():
    # Bidi marks, a byte-order mark, a soft hyphen and a word joiner are ignored; a stray ZWJ
    # or combining mark at the start of the text is dropped with them.
    preds = ["\u200fمرحبا كيف حالك اليوم\u200e", "\ufeffthe co\u00adop\u2060erative cat sat"]
    refs = ["مرحبا كيف حالك اليوم", "the cooperative cat sat"]
    out = generation_metrics(preds, refs)
    assert out["bleu"] == pytest.approx(1.0)
    assert out["rouge_l"] == pytest.approx(1.0)
    assert out["cider"] == pytest.approx(10.0)
    assert rouge_tokens("\u200d\u0301abc") == ["abc"]


def test_unpaired_emoji_parts_and_control_characters():
    # An unpaired flag letter, a lone skin tone and a dangling ZWJ are each one token; ASCII
    # control characters behave as before (NUL separates ROUGE words).
    parts = "\U0001f1eb \U0001f3fd \U0001f468\u200d"
    assert rouge_tokens(parts) == ["\U0001f1eb", "\U0001f3fd", "\U0001f468\u200d"]
    out = generation_metrics([parts, "the\x00cat\x1fsat"], [parts, "the cat sat"])
    _assert_defined(out)
    assert out["rouge_l"] == pytest.approx(1.0)


def test_empty_strings_in_other_scripts_mixed_with_text():
    out = generation_metrics(["", "猫坐在垫子上"], ["שלום", ""])
    _assert_defined(out)
    assert out == {"bleu": 0.0, "rouge_l": 0.0, "cider": 0.0, "exact_match": 0.0}
    assert sample_metrics("", [""]) == {"rouge_l": 0.0, "exact_match": 1.0}
