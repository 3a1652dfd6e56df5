"""The benchmarks' tokenizer for the real shapes' vocabularies: every id a random model samples
decodes to text, the same arguments give the same tokenizer, and text still round-trips."""
from __future__ import annotations

import random

from cortex.tiny_checkpoint import SPECIAL_TOKENS, build_covering_tokenizer, build_tokenizer


def test_every_id_decodes_to_printable_text():
    tok, small = build_covering_tokenizer(20_000), build_tokenizer(512)
    assert tok.get_vocab_size() == 20_000
    base = small.get_vocab_size()
    for token_id in range(base):   # the small tokenizer's ids are unchanged
        assert tok.decode([token_id]) == small.decode([token_id])
    for token_id in range(base, 20_000):
        text = tok.decode([token_id])
        assert 2 <= len(text) <= 8 and all(32 <= ord(c) < 127 for c in text), (token_id, text)


def test_same_arguments_same_tokenizer_and_text_round_trips():
    first, second = build_covering_tokenizer(5_000), build_covering_tokenizer(5_000)
    assert first.to_str() == second.to_str()
    rng = random.Random(0)
    ids = [rng.randrange(len(SPECIAL_TOKENS), 5_000) for _ in range(200)]
    text = first.decode(ids)
    assert first.decode(first.encode(text, add_special_tokens=False).ids) == text
