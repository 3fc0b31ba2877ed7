"""Text-generation metrics: corpus BLEU, ROUGE-L, CIDEr-D and exact match of generations.

Each metric comes from its reference library so numbers can be compared with published ones;
what the libraries tokenise as ASCII-only is tokenised by :mod:`fedsim.tasks.text_tokens`, so
every script (Arabic, Hebrew, CJK, Thai, emoji, ...) is scored, and ASCII text as before:

- ``bleu``: sacrebleu's corpus BLEU-4 (13a tokeniser after
  :func:`~fedsim.tasks.text_tokens.bleu_pretokenize`, ``exp`` smoothing, ``effective_order``
  off), divided by 100 so it lies in [0, 1] like the other scores.
- ``rouge_l``: rouge-score's ROUGE-L F-measure on
  :func:`~fedsim.tasks.text_tokens.rouge_tokens`, averaged over samples, best reference per
  sample.
- ``cider``: pycocoevalcap's CIDEr-D (the COCO caption one: clipped tf-idf, sigma = 6, x10) on
  a pure-Python stand-in for its Java PTB tokeniser (:func:`cider_tokenize`).
- ``exact_match``: share of predictions equal to a reference after :func:`normalize_answer`.

Definitions: docs/algorithms.md §5.2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import regex
from pycocoevalcap.cider.cider import Cider
from sacrebleu.metrics import BLEU

from fedsim.tasks.text_tokens import bleu_pretokenize, cider_tokens, fold_case, rouge_tokens

# Sentence-final punctuation of any script: ". ! ?" in ASCII, and "。", "？", "؟", "।", "۔", ...
_TRAILING_PUNCT_RE = regex.compile(r"\p{Sentence_Terminal}+\Z")


def normalize_answer(s: str) -> str:
    """Normalise a string for exact match: fold case, collapse whitespace, drop a final stop.

    Case folding is Unicode's (:func:`~fedsim.tasks.text_tokens.fold_case`: "Straße" matches
    "STRASSE", composed and decomposed accents match). Only trailing sentence-final
    punctuation goes (``.!?`` and their counterparts in other scripts, such as ``。？؟।``):
    inner punctuation can change an answer's meaning ("3.5" vs "35"), a final full stop cannot.

    Args:
        s: A prediction or reference.

    Returns:
        The normalised string, e.g. ``"  The  Cat sat. "`` -> ``"the cat sat"``.
    """
    collapsed = " ".join(fold_case(s).split())
    return _TRAILING_PUNCT_RE.sub("", collapsed).rstrip()


def cider_tokenize(s: str) -> str:
    """Tokenise a string the way pycocoevalcap's PTBTokenizer does for simple sentences.

    The COCO pipeline runs Stanford's PTBTokenizer (Java) with lower-casing, then drops the
    punctuation tokens. Here (:func:`~fedsim.tasks.text_tokens.cider_tokens`): fold case, split
    punctuation off words, one token per Han/kana/Thai character and per emoji, drop
    punctuation, and join with single spaces. Unlike PTB, clitics are not split ("don't" stays
    one token); predictions and references go through the same function, so scores stay
    comparable.

    Args:
        s: A prediction or reference.

    Returns:
        Space-joined tokens, e.g. ``"A dog, running!"`` -> ``"a dog running"``.
    """
    return " ".join(cider_tokens(s))


def generation_metrics(
    predictions: list[str], references: list[str] | list[list[str]]
) -> dict[str, float]:
    """Corpus-level text metrics of greedy generations against references.

    BLEU uses sacrebleu's ``BLEU(tokenize="13a", smooth_method="exp", effective_order=False)``,
    which are its defaults and the settings behind published sacrebleu numbers; they are passed
    explicitly so a change of library defaults cannot shift our scores. ``exp`` smoothing (NIST
    mteval-v13a) only matters when an n-gram order has no match in the whole corpus; turning
    ``effective_order`` off keeps all four orders in the geometric mean, as corpus BLEU should.

    Tokens (:mod:`fedsim.tasks.text_tokens`): a word of a script that spaces its words is one
    token, each Han, kana, Thai, Lao, Khmer or Myanmar character and each emoji (ZWJ
    sequences, flags and skin tones included) is one token. BLEU spaces those out and leaves the
    rest to sacrebleu's 13a (case-sensitive, ASCII punctuation split off); ROUGE-L and CIDEr-D
    fold case and drop punctuation. On ASCII text all three tokenise exactly as the libraries
    do on their own. BLEU-4 needs 4-grams: a corpus whose outputs all have fewer than four
    tokens scores 0 whatever the script.

    CIDEr-D's idf is ``log(N / df)`` over the N samples, so an n-gram found in every sample's
    references weighs 0. With a single sample that is every reference n-gram, and CIDEr is 0.0
    whatever the prediction: the library's answer, returned as is. A NaN from the library (none
    is known, but its asserts are the only guard) is reported as 0.0, as is a corpus whose
    references hold no tokens at all (the library would crash on it).

    Args:
        predictions: One generated string per sample; an empty string is allowed.
        references: One reference string per sample, or a non-empty list of references per
            sample.

    Returns:
        ``{"bleu", "rouge_l", "cider", "exact_match"}`` as Python floats. BLEU, ROUGE-L and
        exact match lie in [0, 1]; CIDEr-D lies in [0, 10] (COCO's x10 scale).

    Raises:
        TypeError: If ``predictions`` or ``references`` is a bare string.
        ValueError: If there are no predictions, the two lists differ in length, or a sample has
            no reference.
    """
    refs = _check_inputs(predictions, references)
    return {
        "bleu": _bleu(predictions, refs),
        "rouge_l": math.fsum(_rouge_l(p, r) for p, r in zip(predictions, refs)) / len(refs),
        "cider": _cider(predictions, refs),
        "exact_match": sum(_exact_match(p, r) for p, r in zip(predictions, refs)) / len(refs),
    }


def sample_metrics(prediction: str, references: list[str]) -> dict[str, float]:
    """Per-sample ROUGE-L and exact match, for tables of example generations.

    BLEU and CIDEr are left out: both are corpus statistics and mislead on a single sentence.

    Args:
        prediction: One generated string.
        references: Its references (at least one).

    Returns:
        ``{"rouge_l", "exact_match"}`` as Python floats in [0, 1], best reference for each.

    Raises:
        TypeError: If ``references`` is a bare string.
        ValueError: If ``references`` is empty.
    """
    if isinstance(references, str):
        raise TypeError("references must be a list of strings, got a bare string")
    if not references:
        raise ValueError("references is empty: a sample needs at least one reference")
    refs = list(references)
    return {"rouge_l": _rouge_l(prediction, refs), "exact_match": _exact_match(prediction, refs)}


def _check_inputs(
    predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]
) -> list[list[str]]:
    """Validate the corpus and return one list of references per sample."""
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be lists, got a bare string")
    if not predictions:
        raise ValueError("predictions is empty: need at least one sample to score")
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references differ in length: {len(predictions)} predictions, "
            f"{len(references)} references"
        )
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    missing = [i for i, r in enumerate(refs) if not r]
    if missing:
        raise ValueError(f"samples {missing[:10]} have an empty reference list")
    return refs


def _bleu(predictions: Sequence[str], refs: list[list[str]]) -> float:
    """Corpus BLEU-4 on a 0-1 scale."""
    bleu = BLEU(tokenize="13a", smooth_method="exp", effective_order=False)
    # sacrebleu wants reference *streams* (k-th reference of every sample); None pads samples
    # with fewer references, which it documents as the way to vary the count per sample.
    n_streams = max(len(r) for r in refs)
    streams = [
        [bleu_pretokenize(r[k]) if k < len(r) else None for r in refs] for k in range(n_streams)
    ]
    hyps = [bleu_pretokenize(p) for p in predictions]
    return float(bleu.corpus_score(hyps, streams).score) / 100.0


class _RougeTokenizer:
    """rouge-score's tokenizer interface (a ``tokenize`` method) over :func:`rouge_tokens`."""

    def tokenize(self, text: str) -> list[str]:
        return rouge_tokens(text)


@lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    """A shared ROUGE-L scorer, imported on first use (rouge_score pulls nltk: ~1.7 s)."""
    from rouge_score.rouge_scorer import RougeScorer

    # No stemmer (our tokeniser has none): scores depend on the strings alone, not on an nltk
    # version.
    return RougeScorer(["rougeL"], tokenizer=_RougeTokenizer())


def _rouge_l(prediction: str, refs: list[str]) -> float:
    """ROUGE-L F-measure against the best-matching reference."""
    scorer = _rouge_scorer()
    return max(float(scorer.score(ref, prediction)["rougeL"].fmeasure) for ref in refs)


def _cider(predictions: Sequence[str], refs: list[list[str]]) -> float:
    """Corpus CIDEr-D (x10 scale) on :func:`cider_tokenize` tokens."""
    gts = {i: [cider_tokenize(r) for r in sample] for i, sample in enumerate(refs)}
    if not any(any(r) for r in gts.values()):
        # The library takes max() over an empty document-frequency table and raises.
        return 0.0
    res = {i: [cider_tokenize(p)] for i, p in enumerate(predictions)}
    score, _ = Cider().compute_score(gts, res)
    score = float(score)
    return 0.0 if math.isnan(score) else score


def _exact_match(prediction: str, refs: list[str]) -> float:
    """1.0 if the prediction equals any reference after normalisation, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in refs))
