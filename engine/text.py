"""What token ids spell, for the screens that read them: a tokenizer's special ids, and
whether ids spell bytes that are not UTF-8 text.

The screens read decoded text. Byte-level tokenizers can spell any bytes, and bytes that
are not UTF-8 decode to U+FFFD, so text in another encoding (EBCDIC, a legacy code page,
XOR'd) would read as "\ufffd\ufffd\ufffd" while a model learns the bytes themselves. The API
process refuses such training data and sampling prompts. Pure functions over a
`tokenizers` Tokenizer; must not load models or know screening policy.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from tokenizers import Tokenizer

REPLACEMENT = "\ufffd"
MAX_LEADING = 3  # continuation bytes of a character cut before the sequence starts


@functools.lru_cache(maxsize=16)
def special_ids(tok: Tokenizer) -> frozenset[int]:
    """The tokenizer's special tokens (chat markers, end of text): they decode to nothing."""
    return frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special)


def hides_bytes(tok: Tokenizer, ids: Sequence[int]) -> bool:
    """Whether token ids spell bytes that are not UTF-8 text. A character cut at either end
    of the sequence is allowed: a sequence that starts inside a character (targets after a
    first token that holds part of one) decodes as up to 3 U+FFFD, one that stops inside
    one (a sample stopped at max_tokens) as one. A U+FFFD the text really holds tokenizes
    back to the same ids. Special tokens are left out."""
    special = special_ids(tok)
    plain = [int(i) for i in ids if int(i) not in special]
    text = tok.decode(plain)
    lead = len(text) - len(text.lstrip(REPLACEMENT))
    inner = text[min(lead, MAX_LEADING):]
    inner = inner[:-1] if inner.endswith(REPLACEMENT) else inner
    return REPLACEMENT in inner and tok.encode(text, add_special_tokens=False).ids != plain
