"""What token ids spell, for the screens that read them: a tokenizer's special ids, and
whether ids spell bytes that are not UTF-8 text.

The screens read decoded text. Byte-level tokenizers can spell any bytes, and bytes that
are not UTF-8 decode to U+FFFD, so text in another encoding (EBCDIC, a legacy code page,
XOR'd) would read as "\ufffd\ufffd\ufffd" while a model learns the bytes themselves. The API
process refuses such training data and sampling prompts. Single words hidden this way
inside English are below the bar (see `hides_bytes`): the screens read the English around
them. Pure functions over a
`tokenizers` Tokenizer; must not load models or know screening policy.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from tokenizers import Tokenizer

REPLACEMENT = "\ufffd"
MAX_LEADING = 3  # continuation bytes of a character cut before the sequence starts
# Text hidden in another encoding reads as U+FFFD almost letter for letter (EBCDIC letters,
# XOR'd bytes); a sentence of it is well over these.
MIN_HIDDEN = 8
MIN_HIDDEN_SHARE = 0.2


@functools.lru_cache(maxsize=16)
def special_ids(tok: Tokenizer) -> frozenset[int]:
    """The tokenizer's special tokens (chat markers, end of text): they decode to nothing."""
    return frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special)


def hides_bytes(tok: Tokenizer, ids: Sequence[int]) -> bool:
    """Whether token ids spell text hidden in bytes that are not UTF-8: at least
    `MIN_HIDDEN` characters decode as U+FFFD inside the sequence, and they are at least
    `MIN_HIDDEN_SHARE` of its visible characters. A few stray ones are left to the screens:
    a character cut at either end of a sequence (a span boundary, a sample stopped inside
    one), a real model's rare broken character, or a random-weights test model's noise
    between words; a U+FFFD the text really holds tokenizes back to the same ids. Special
    tokens are left out."""
    special = special_ids(tok)
    plain = [int(i) for i in ids if int(i) not in special]
    text = tok.decode(plain)
    lead = len(text) - len(text.lstrip(REPLACEMENT))
    inner = text[min(lead, MAX_LEADING):]
    inner = inner[:-1] if inner.endswith(REPLACEMENT) else inner
    hidden = inner.count(REPLACEMENT)
    visible = sum(not c.isspace() for c in text)
    return (hidden >= MIN_HIDDEN and hidden >= MIN_HIDDEN_SHARE * visible
            and tok.encode(text, add_special_tokens=False).ids != plain)
