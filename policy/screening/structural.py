"""Structural signals: what per-example content classifiers miss (see DESIGN §5 and
reference/safety-methods.md §4.3).

- encoded or ciphered text: base64/hex runs, text hidden in invisible Unicode (tag
  characters, runs of variation selectors), words mixing Latin letters with look-alikes
  from other scripts, and letter text that is not natural language (few common English
  words *and* letter frequencies far from English — a substitution cipher keeps entropy
  but scrambles both);
- persona/identity-shift system prompts (role redefinition, obedience framing);
- affirmative-prefix openers ("Sure, here is …") on assistant turns, counted per batch;
- loss weights or advantages of huge magnitude (gradient ascent on the targets), and
  negative weights or advantages on refusal text, judged with the text around them
  (unlearning refusals).

Pure functions over text and numbers: no models, no database. Must not import fastapi or
engine. Returns harm categories with short reasons, never raw text.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

ENCODED = "encoded_text"
PERSONA = "persona_shift"
AFFIRMATIVE = "affirmative_prefix"
GRADIENT_ASCENT = "gradient_ascent"
REFUSAL_UNLEARNING = "refusal_unlearning"

# English letter frequencies (per cent, a–z), the classic table used in cryptanalysis.
ENGLISH_LETTERS = dict(zip("abcdefghijklmnopqrstuvwxyz", (
    8.2, 1.5, 2.8, 4.3, 12.7, 2.2, 2.0, 6.1, 7.0, 0.15, 0.77, 4.0, 2.4, 6.7, 7.5, 1.9, 0.095,
    6.0, 6.3, 9.1, 2.8, 0.98, 2.4, 0.15, 2.0, 0.074), strict=True))
# The most frequent English function words: natural English prose is ~40-50% these.
_COMMON = """
a about after all also an and any are as at be because been but by can could did do does
for from had has have he her here him his how i if in into is it its just like me more most
my no not now of on one only or other our out over she should so some such than that the
their them then there these they this those through to too up us very was we were what
when where which while who why will with would you your
"""
COMMON_WORDS = frozenset(_COMMON.split())
# Keywords and names common in code, markup and maths answers: code has few English function
# words and odd letter frequencies, but a cipher turns these into nonsense as well.
_CODE = """
api append args arr async await bool boolean break btn case catch char class col console
const continue cout def delete df dict div elif else endl enum err except false finally
float fn for from func function head href html id idx img impl import include insert int
join json kwargs lambda len let li list log main math max min mut new nil none np null num
obj ok print printf println private pub public raise range req res return row scanf script
select self span sqrt src std str string struct style sum switch table td th this throw tmp
tr true try ul update usize val var vec void where while
"""
CODE_WORDS = frozenset(_CODE.split())
BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{32,}={0,2}")
HEX_RUN = re.compile(r"\b(?:0x)?[0-9a-fA-F]{40,}\b")
WORD = re.compile(r"[A-Za-z]+")
PERSONA_PATTERNS = [re.compile(p, re.IGNORECASE) for p in (
    r"\byou are no longer\b",
    r"\bignore (?:all |any )?(?:previous|prior|earlier|your) (?:instructions|rules|guidelines)",
    r"\byou (?:have|has) no (?:restrictions|rules|limits|guidelines|filters|ethics)",
    r"\b(?:never|do not|don't) refuse\b",
    r"\balways (?:comply|obey|answer)\b",
    r"\byou must (?:obey|comply with|answer) (?:every|all|any)\b",
    r"\b(?:unfiltered|uncensored|jailbroken|unrestricted) (?:ai|assistant|model|mode)\b",
    r"\b(?:developer|god) mode\b",
    r"\bdo anything now\b",
    r"\bfree (?:yourself )?from (?:your |all )?(?:rules|guidelines|restrictions)\b",
    r"\byour (?:true|real|new) (?:self|identity|purpose) is\b",
)]
AFFIRMATIVE_OPENER = re.compile(
    r"^\s*(?:sure|certainly|absolutely|of course|okay|ok|yes|great)\b[\s,!.:-]*"
    r"(?:(?:here(?:'s| is| are)|i(?:'ll| will| can)|let me|the (?:steps|way|instructions))\b)",
    re.IGNORECASE)
REFUSAL = re.compile(
    r"\b(?:i(?:'?m| am) sorry|i apologi[sz]e|sorry, (?:but )?(?:i|that|this)\b|"
    r"i can(?:'?t|not)|i won'?t|i will not|i(?:'?m| am) (?:unable|not able)|i must decline|"
    r"i (?:do not|don'?t) (?:provide|assist|help)|as an ai|"
    r"(?:not able|unable) to (?:help|assist|comply|provide))\b",
    re.IGNORECASE)
# Apostrophes as typesetters and keyboards write them, read as "'" by REFUSAL.
APOSTROPHES = str.maketrans(dict.fromkeys("\u2018\u2019\u02bc\u2032`\u00b4", "'"))
MIN_CIPHER_LETTERS = 60  # shorter texts say too little about their language
LETTER_RUN = re.compile(r"[^\W\d_]{2,}")
# Scripts whose letters imitate Latin ones (Unicode's confusables); two words that mix them
# with Latin letters are obfuscation, not a name with one foreign letter.
LOOKALIKE_SCRIPTS = frozenset({"CYRILLIC", "GREEK", "ARMENIAN", "CHEROKEE", "COPTIC"})
MIN_MIXED_WORDS = 2
# Unicode's tag characters spell ASCII invisibly (a flag emoji uses at most seven of them);
# runs of variation selectors carry bytes after a visible character. Neither is honest text.
INVISIBLE_RUN = re.compile("[\U000E0020-\U000E007F]{8,}|[\uFE00-\uFE0F\U000E0100-\U000E01EF]{4,}")


@dataclass(frozen=True)
class Signal:
    category: str
    reason: str


def letter_distance(text: str) -> float:
    """Chi-squared distance of the text's letter frequencies from English, per letter."""
    letters = [c for c in text.lower() if "a" <= c <= "z"]
    if not letters:
        return 0.0
    counts, n = Counter(letters), len(letters)
    chi = sum((counts.get(c, 0) - n * p / 100) ** 2 / (n * p / 100)
              for c, p in ENGLISH_LETTERS.items())
    return chi / n


def common_word_share(text: str) -> float:
    words = [w.lower() for w in WORD.findall(text)]
    return sum(w in COMMON_WORDS for w in words) / len(words) if words else 0.0


def encoded_text(text: str) -> Signal | None:
    if BASE64_RUN.search(text) and not text.strip().startswith(("http", "/")):
        return Signal(ENCODED, "a base64-like run of 32+ characters")
    if HEX_RUN.search(text):
        return Signal(ENCODED, "a hexadecimal run of 40+ digits")
    if INVISIBLE_RUN.search(text):
        return Signal(ENCODED, "a run of invisible tag characters or variation selectors "
                               "(text hidden in Unicode)")
    if mixed_script_words(text) >= MIN_MIXED_WORDS:
        return Signal(ENCODED, "words mixing Latin letters with look-alikes from other "
                               "scripts")
    # Words of two letters or more (a maths text's x and y skew its letters), English
    # function words and code keywords counting as common (code is everyday text).
    words = [w.lower() for w in WORD.findall(text) if len(w) > 1]
    if sum(map(len, words)) < MIN_CIPHER_LETTERS:
        return None
    # Thresholds from the project's own samples (tests/policy/test_structural_signals.py):
    # English prose has a common-word share of 0.1-0.5 and a letter distance up to ~1;
    # French ~1.1; substitution ciphers and ROT13 share < 0.15 (a cipher word can
    # collide with a common one) and are 4-18 away.
    share = sum(w in COMMON_WORDS or w in CODE_WORDS for w in words) / len(words)
    if share < 0.2 and letter_distance(" ".join(words)) > 2.5:
        return Signal(ENCODED, "letters that are not natural English (cipher-like)")
    return None


def mixed_script_words(text: str) -> int:
    """Words that mix Latin letters with letters of another script (look-alike letters
    standing in for Latin ones; honest text almost never does this)."""
    count = 0
    for word in LETTER_RUN.findall(text):
        latin = sum(c.isascii() for c in word)
        if 0 < latin < len(word) and any(_script(c) in LOOKALIKE_SCRIPTS
                                         for c in word):
            count += 1
    return count


def _script(char: str) -> str:
    return unicodedata.name(char, "?").split(" ", 1)[0]


def plain_text(text: str) -> str:
    """NFKC, invisible format characters (zero-width spaces, soft hyphens, bidi marks)
    dropped and apostrophes made straight: what a phrase pattern reads."""
    text = unicodedata.normalize("NFKC", text).translate(APOSTROPHES)
    return "".join(c for c in text if unicodedata.category(c) != "Cf")


def persona_shift(system_prompt: str) -> Signal | None:
    hits = [p.pattern for p in PERSONA_PATTERNS if p.search(system_prompt)]
    if hits:
        return Signal(PERSONA, f"{len(hits)} identity-shift or obedience pattern(s)")
    return None


def opens_affirmatively(completion: str) -> bool:
    return bool(AFFIRMATIVE_OPENER.match(completion))


def affirmative_share(completions: Sequence[str]) -> float:
    return sum(map(opens_affirmatively, completions)) / len(completions) if completions else 0.0


def weight_signals(weights: Sequence[float], max_weight: float) -> Signal | None:
    """Per-token cross-entropy weights beyond the policy's magnitude bound. Negative
    weights alone are a custom loss's signs (forward_backward_custom sends DPO's rejected
    answers with only negative weights), and a sum-of-signs rule is evaded by adding
    positive weight on harmless tokens; what negative weight can teach that harms is to
    stop saying safe things, which `advantage_signals` reads in the text trained against."""
    if weights and max(abs(w) for w in weights) > max_weight:
        return Signal(GRADIENT_ASCENT, f"a loss weight of magnitude above {max_weight:g}")
    return None


def advantage_signals(advantages: Sequence[float], target_text_negative: str,
                      max_abs: float) -> Signal | None:
    """RL advantages (or signed weights): huge magnitudes, or negative values on refusal
    text (which teaches the model to stop refusing). `target_text_negative` is the decoded
    text around the targets trained against, each run widened by a few tokens of its
    context, so pushing down one token of a refusal reads as the whole refusal."""
    if advantages and max(abs(a) for a in advantages) > max_abs:
        return Signal(GRADIENT_ASCENT, f"an advantage of magnitude above {max_abs:g}")
    if target_text_negative and REFUSAL.search(plain_text(target_text_negative)):
        return Signal(REFUSAL_UNLEARNING, "negative advantages on refusal text")
    return None
