"""Token LMs as byte LMs (docs/spec.md section 7): token bytes, exact next-byte
distributions, the bounded computation's leak, ULD."""

from __future__ import annotations

import pytest
import torch

from kd import ConfigError
from kd.bytes import EOS, NUM_SYMBOLS, OTHER, ByteOracle, boundary_byte_probs, first_symbol_map, token_symbols

A, B = ord("a"), ord("b")


def _unigram():
    symbols = [(A,), (B,), (A, B), (B, A)]
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    return ByteOracle(lambda history: probs, symbols), symbols, probs


def test_unigram_vectors_exact_byte_probabilities():
    oracle, _, _ = _unigram()
    first = oracle.next_byte(())
    assert first[A].item() == pytest.approx(0.4) and first[B].item() == pytest.approx(0.6)
    after_a, after_b = oracle.next_byte((), (A,)), oracle.next_byte((), (B,))
    assert after_a[B].item() == pytest.approx(0.9) and after_a[A].item() == pytest.approx(0.1)
    assert after_b[A].item() == pytest.approx(0.8) and after_b[B].item() == pytest.approx(0.2)
    assert after_a[B].item() != pytest.approx(0.75)  # the single-token shortcut's wrong value
    for s, mass in {(A, A): 0.04, (A, B): 0.36, (B, A): 0.48, (B, B): 0.12}.items():
        assert oracle.prefix_mass((), s) == pytest.approx(mass)
    for dist in (first, after_a, after_b):
        assert dist.sum().item() == pytest.approx(1.0)


def test_budget_cuts_are_reported_as_leaked_mass():
    _, symbols, probs = _unigram()
    bounded = ByteOracle(lambda history: probs, symbols, max_calls=1)  # one LM call per query: the root
    assert bounded.prefix_mass((), (A, B)) == pytest.approx(0.3)  # Q_{h.a}(b) was cut ...
    assert bounded.leaked == pytest.approx(0.1)  # ... and the p(a) that led to it is reported
    assert bounded.prefix_mass((), (A, B)) == pytest.approx(0.36)  # a new query, a new call: exact


def test_boundary_map_equals_the_oracle_and_distributions_sum_to_one():
    torch.manual_seed(0)
    symbols = [(EOS,), (OTHER,), (A,), (B,), (A, B), (B, A, A), (0xC3,), (0xA9,), (0xC3, 0xA9)]
    table = {}

    def lm(history):
        if history not in table:
            table[history] = torch.softmax(torch.randn(len(symbols)), -1)
        return table[history]

    oracle = ByteOracle(lm, symbols)
    exact = oracle.next_byte((2,))
    mapped = boundary_byte_probs(lm((2,)).unsqueeze(0), first_symbol_map(symbols))[0]
    torch.testing.assert_close(mapped.double(), exact, atol=1e-6, rtol=0)
    assert exact.shape == (NUM_SYMBOLS,) and exact.sum().item() == pytest.approx(1.0)
    # inside a multi-byte UTF-8 character split across tokens: 0xC3 then 0xA9
    inside = oracle.next_byte((2,), (0xC3,))
    assert inside.sum().item() == pytest.approx(1.0) and inside[0xA9] > 0
    assert oracle.leaked == 0.0


def test_byte_level_bpe_tokens_spell_their_utf8_bytes():
    from kd.data.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["héllo wörld"] * 20 + ["abc"] * 5, vocab_size=262)  # few merges: bytes stay split
    symbols = token_symbols(tok)
    assert symbols[tok.eos_token_id] == (EOS,) and symbols[tok.pad_token_id] == (OTHER,)
    ids = tok("héllo", add_special_tokens=False)["input_ids"]
    assert b"".join(bytes(symbols[i]) for i in ids) == "héllo".encode()
    # "é" (C3 A9) split across the two single-byte tokens of the base alphabet
    first, second = symbols.index((0xC3,)), symbols.index((0xA9,))
    assert tok.decode([first, second]) == "é"


def test_sentencepiece_style_pieces_map_spaces_and_byte_fallback():
    from kd.data.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["ab ab", "ba ba"] * 20, vocab_size=40, byte_level=False)
    symbols = token_symbols(tok)
    pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    space = pieces.index("▁")
    assert symbols[space] == (0x20,)
    assert all(symbols[i][-1] == 0x20 for i, p in enumerate(pieces) if p and p.endswith("▁") and len(p) > 1)


def test_text_rewriting_normalizers_are_refused():
    from kd.data.tokenizer import train_wordpiece_tokenizer

    with pytest.raises(ConfigError, match="normalizer .* rewrites text"):
        token_symbols(train_wordpiece_tokenizer(["Hello there"] * 20, vocab_size=120))
