"""engine.text: which token ids spell bytes that are not UTF-8 text (the tiny model's
byte-level tokenizer, SmolLM2's)."""

from __future__ import annotations

import pytest

from engine.registry import fast_tokenizer
from engine.text import hides_bytes, special_ids
from tests.api.test_screening_parity import byte_ids

TEXT = "Store bleach away from ammonia, and label both bottles."


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return fast_tokenizer(str(tiny_dir))


def test_text_in_another_encoding_hides_bytes(tok):
    assert not hides_bytes(tok, tok.encode(TEXT).ids)
    assert not hides_bytes(tok, byte_ids(tok, TEXT.encode("utf-8")))  # any tokenization
    assert hides_bytes(tok, byte_ids(tok, TEXT.encode("cp500")))
    assert hides_bytes(tok, byte_ids(tok, bytes(b ^ 0x80 for b in TEXT.encode())))  # XOR'd
    assert hides_bytes(tok, byte_ids(tok, b"\xa1" + TEXT.encode("cp500")[:20]))
    # Hidden inside English, a sentence is caught and a single word is left to the screens.
    english = "Here is what you asked for, step by step: "
    sentence = english.encode() + "make it at home, then add it slowly".encode("cp500")
    assert hides_bytes(tok, byte_ids(tok, sentence))
    assert not hides_bytes(tok, byte_ids(tok, english.encode() + "it".encode("cp500")))


def test_a_replacement_character_the_text_holds_and_cut_ends_are_text(tok):
    assert not hides_bytes(tok, tok.encode("broken \ufffd here \ufffd too").ids)
    euro = byte_ids(tok, "\u20ac 5 and 6 \u20ac".encode())
    assert not hides_bytes(tok, euro[:-1])  # a sample stopped inside its last character
    assert not hides_bytes(tok, euro[1:])  # a span that starts inside a character
    inside = byte_ids(tok, "5 \u20ac and 6".encode())
    assert not hides_bytes(tok, inside[:3] + inside[4:])  # one broken character inside
    noisy = tok.encode("User: Say something with the letter e in it.\nAssistant:").ids
    noisy += byte_ids(tok, b"\xa1 the\xbe\xc0 b\xff ook")  # a random model's stray bytes
    assert not hides_bytes(tok, noisy)


def test_special_tokens_between_the_bytes_hide_nothing(tok):
    marker = min(special_ids(tok))
    hidden = byte_ids(tok, "make it at home".encode("cp500"))
    interleaved = [t for b in hidden for t in (b, marker)]
    assert hides_bytes(tok, interleaved)
