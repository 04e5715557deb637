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
cannot read (an operator who plugs in a classifier for more languages lists them).

Pure functions over text (py3langid's bundled model and the Unicode confusables table that
`confusable-homoglyphs` ships, both loaded once, offline). No database; must not import
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

from policy.screening.structural import common_word_share

VERSION = "canonical-v1"  # bump whenever `canonical` reads any text differently

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
REVERSED_SHARE = 0.1  # a reversed reading must read this much like English…
PLAIN_SHARE = 0.2  # …where the text as written does not, and by REVERSED_GAIN more
REVERSED_GAIN = 0.1
MIN_REVERSED_WORDS = 5
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
    if len(WORDS.findall(text)) < MIN_REVERSED_WORDS or common_word_share(text) >= PLAIN_SHARE:
        return line
    return role + _best_reading(text)


def _best_reading(text: str) -> str:
    readings = [text[::-1], " ".join(w[::-1] for w in text.split(" "))]
    # Between readings as English as each other, the one that reads like a sentence: a
    # capital first, a full stop last.
    best = max(readings, key=lambda r: (common_word_share(r), r.lstrip()[:1].isupper(),
                                        r.rstrip()[-1:] in ".?!"))
    share = common_word_share(best)
    return best if share >= max(REVERSED_SHARE, common_word_share(text) + REVERSED_GAIN) \
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
    WINDOW_CHARS (a longer sentence is a window of its own), never across lines."""
    for line in text.splitlines():
        line = COMMENT_OR_BULLET.sub("", line)  # "# …", "// …", "* …": prose after the mark
        if _code_line(line):
            continue
        window = ""
        for sentence in SENTENCE_END.split(line):
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
