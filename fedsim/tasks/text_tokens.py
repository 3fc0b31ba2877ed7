"""Unicode-aware tokenisation for the text metrics, one rule set for every script.

Text is cut into grapheme clusters (what a reader sees as one character: a letter with its
accents, an Indic syllable, an emoji with its skin tone or ZWJ family, a flag) with the
``regex`` module's ``\\X``, and each cluster gets a :class:`Kind`:

- letters, marks and digits of a script that puts spaces between words (Latin, Arabic, Hebrew,
  Cyrillic, Greek, Devanagari, Hangul, ...) are *word* clusters: a run of them is one word;
- letters of a script written without spaces (Han, kana, Bopomofo, Thai, Lao, Khmer,
  Myanmar) have no word boundaries to find without a dictionary, so each cluster is a token;
- each emoji cluster is a token;
- whitespace (and the zero-width space) separates; other invisible format characters
  (soft hyphen, word joiner, a stray ZWJ) are ignored.

On ASCII text every cluster is one character and each metric's function below reproduces the
tokeniser the metric used before (rouge-score's, sacrebleu's 13a, our PTB stand-in) character
for character, so ASCII scores are unchanged.
"""

from __future__ import annotations

import enum
import re
import unicodedata
from collections.abc import Callable

import regex

# Emoji: a pictograph, a skin-tone modifier, a regional-indicator (flag) letter or the keycap
# mark. Not the Emoji property itself: that includes the ASCII digits, "#" and "*".
_EMOJI_RE = regex.compile(r"[\p{Extended_Pictographic}\p{Emoji_Modifier}\p{RI}\u20e3]")
# Scripts written without spaces between words. Script_Extensions, so that characters shared
# by them (the prolonged sound mark "ー", the iteration mark "々") count too.
_UNSPACED_RE = regex.compile(
    r"[\p{scx=Han}\p{scx=Hiragana}\p{scx=Katakana}\p{scx=Bopomofo}"
    r"\p{scx=Thai}\p{scx=Lao}\p{scx=Khmer}\p{scx=Myanmar}]"
)
_CLUSTER_RE = regex.compile(r"\X")
_ZERO_WIDTH_SPACE = "\u200b"
# The ASCII punctuation pycocoevalcap drops after PTB tokenisation (our single-character
# splits of "...", "--", quotes and brackets all end up as one of these characters).
_PTB_DROPPED = frozenset(".?!,:;-'`\"()[]{}")
# Characters that may sit inside a CIDEr word ("well-known", "3.5", "1,000", "don't", "a/b").
_CIDER_JOINERS = frozenset("-'.,/")
# Token patterns over one code letter per cluster (_rouge_code, _cider_code): the patterns of
# the character-level regexes they replace, so ASCII text tokenises exactly as before.
_ROUGE_CODE_RE = re.compile(r"w+|t")
_CIDER_CODE_RE = re.compile(r"w+(?:jw+)*|[jt]")


class Kind(enum.Enum):
    """What a grapheme cluster is, for tokenisation."""

    SPACE = "space"
    EMOJI = "emoji"
    UNSPACED = "unspaced"
    WORD = "word"
    IGNORABLE = "ignorable"
    PUNCT = "punct"
    OTHER = "other"


def classify(cluster: str) -> Kind:
    """The kind of one grapheme cluster.

    Args:
        cluster: One grapheme cluster (an element of :func:`clusters`), not empty.

    Returns:
        ``SPACE`` for whitespace and the zero-width space; ``EMOJI`` for a cluster holding a
        pictograph, skin tone, flag letter or keycap; ``UNSPACED`` for a letter or mark of
        Han, kana, Bopomofo, Thai, Lao, Khmer or Myanmar; ``WORD`` for any other letter, mark
        or digit; ``IGNORABLE`` for a non-ASCII invisible format or control character;
        ``PUNCT`` for punctuation; ``OTHER`` for the rest (symbols, ASCII control characters,
        lone surrogates, private-use and unassigned code points).
    """
    first = cluster[0]
    if first.isspace() or first == _ZERO_WIDTH_SPACE:
        return Kind.SPACE
    if _EMOJI_RE.search(cluster):
        return Kind.EMOJI
    category = unicodedata.category(first)
    if category[0] in "LM" and _UNSPACED_RE.match(first):
        return Kind.UNSPACED
    if category[0] in "LMN":
        return Kind.WORD
    if category in ("Cf", "Cc") and not first.isascii():
        return Kind.IGNORABLE
    if category[0] == "P":
        return Kind.PUNCT
    return Kind.OTHER


def clusters(text: str) -> list[tuple[str, Kind]]:
    """Split text into grapheme clusters, each with its kind.

    Args:
        text: Any string (lone surrogates and unassigned code points included).

    Returns:
        ``(cluster, kind)`` pairs in order; the clusters concatenate back to ``text``.
    """
    out = []
    for cluster in _CLUSTER_RE.findall(text):
        kind = classify(cluster)
        if kind is Kind.SPACE and len(cluster) > 1:
            # Marks after a space attach to it ("\r\n", " " + skin tone): the space
            # separates, and what follows it is a cluster of its own.
            out.append((cluster[0], kind))
            cluster = cluster[1:]
            kind = classify(cluster)
        out.append((cluster, kind))
    return out


def fold_case(text: str) -> str:
    """Caseless form of a string: canonical decomposition, Unicode case folding, recomposition.

    Folding (not ``lower``) so that "Straße" matches "STRASSE" and final sigma matches sigma;
    the normalisations so that a precomposed "é" matches "e" + combining accent. ASCII text
    comes back as ``text.lower()``.

    Args:
        text: Any string.

    Returns:
        The folded string in NFC.
    """
    return unicodedata.normalize("NFC", unicodedata.normalize("NFD", text).casefold())


def rouge_tokens(text: str) -> list[str]:
    """ROUGE-L tokens: case-folded words, one token per unspaced-script character or emoji.

    Everything that is not a letter, mark, digit or emoji separates tokens and is dropped, as
    rouge-score's own tokeniser does with everything outside ``[a-z0-9]``; on ASCII text the
    two give the same tokens.

    Args:
        text: A prediction or reference.

    Returns:
        The tokens, e.g. ``"Le café, 猫👍🏽!"`` -> ``["le", "café", "猫", "👍🏽"]``.
    """
    return _tokens(clusters(fold_case(text)), _ROUGE_CODE_RE, _rouge_code)


def cider_tokens(text: str) -> list[str]:
    """CIDEr tokens: case-folded PTB-like words, punctuation dropped.

    A word may hold inner hyphens, apostrophes, dots, commas and slashes ("well-known", "3.5");
    unspaced-script characters and emoji are one token each; any other symbol is a token of its
    own. Punctuation is then dropped: the ASCII marks pycocoevalcap drops after PTB
    tokenisation (``.?!,:;-'`"()[]{}``; ``# & / @ % * _`` stay) and every non-ASCII one
    ("。", "،", "«", "—", ...), which PTB would map to one of those or drop as well.

    Args:
        text: A prediction or reference.

    Returns:
        The tokens, e.g. ``"A well-known café, 東京!"`` ->
        ``["a", "well-known", "café", "東", "京"]``.
    """
    tokens = _tokens(clusters(fold_case(text)), _CIDER_CODE_RE, _cider_code)
    return [t for t in tokens if t not in _PTB_DROPPED]


def bleu_pretokenize(text: str) -> str:
    """Space out what sacrebleu's 13a tokeniser cannot split, leaving the rest to 13a.

    13a splits on whitespace and ASCII punctuation only: a Chinese or Japanese sentence, a run
    of emoji or "مرحبا،" would stay one token. Here each unspaced-script character, emoji and
    non-ASCII punctuation mark or symbol gets spaces around it, non-ASCII whitespace becomes a
    space and invisible format characters go; the text is NFC-normalised and not case-folded
    (13a BLEU is case-sensitive). ASCII text comes back unchanged, so its 13a tokens are too.

    Args:
        text: A prediction or reference.

    Returns:
        The text with spaces inserted, e.g. ``"猫が好き👍🏽"`` -> ``" 猫  が  好  き  👍🏽 "``.
    """
    out = []
    for cluster, kind in clusters(unicodedata.normalize("NFC", text)):
        if cluster.isascii() or kind is Kind.WORD:
            out.append(cluster)
        elif kind is Kind.IGNORABLE:
            continue
        elif kind is Kind.SPACE:
            out.append(" ")
        else:
            out.append(f" {cluster} ")
    return "".join(out)


def _rouge_code(cluster: str, kind: Kind) -> str:
    """One letter per cluster for _ROUGE_CODE_RE: word, token, or separator."""
    if kind is Kind.WORD:
        return "w"
    if kind is Kind.EMOJI or kind is Kind.UNSPACED:
        return "t"
    return " "


def _cider_code(cluster: str, kind: Kind) -> str:
    """One letter per cluster for _CIDER_CODE_RE: word, joiner, token, or separator."""
    # "_" is a word character, as in the \w of the regex this replaces.
    if kind is Kind.WORD or cluster == "_":
        return "w"
    if cluster in _CIDER_JOINERS:
        return "j"
    # Non-ASCII punctuation separates like a space: PTB would drop it as a token anyway.
    if kind is Kind.SPACE or (kind is Kind.PUNCT and not cluster.isascii()):
        return " "
    return "t"


def _tokens(
    parts: list[tuple[str, Kind]], pattern: re.Pattern[str], code: Callable[[str, Kind], str]
) -> list[str]:
    """Match ``pattern`` on the clusters' code letters and join each match's clusters."""
    # Ignorable clusters vanish before matching, so a soft hyphen does not split a word.
    kept = [(c, k) for c, k in parts if k is not Kind.IGNORABLE]
    codes = "".join(code(c, k) for c, k in kept)
    return ["".join(c for c, _ in kept[m.start() : m.end()]) for m in pattern.finditer(codes)]
