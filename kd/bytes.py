"""Token language models seen as byte language models (cross-tokenizer distillation).

Two models with different tokenizers predict distributions over different token sets; over
bytes they predict the same thing. This module maps a token LM to next-byte distributions.

Symbols
-------
The byte alphabet has :data:`NUM_SYMBOLS` = 258 symbols: the 256 byte values, :data:`EOS`
(256) for the end-of-sequence token and :data:`OTHER` (257) for every other special token
(pad, bos, unk, ...). ``kappa(v)``, the symbol string of token ``v``
(:func:`token_symbols`), is

* byte-level BPE (GPT-2 style; a ``ByteLevel`` decoder): the token string read through
  GPT-2's byte <-> unicode table;
* SentencePiece style (a ``Metaspace`` decoder or ``▁`` pieces): ``▁`` (U+2581) is the
  space byte 0x20, ``<0xNN>`` byte-fallback pieces are that byte, other characters are
  their UTF-8 bytes;
* ``(EOS,)`` for the EOS token and ``(OTHER,)`` for other special tokens.

A tokenizer with a normalizer that rewrites text (lower-casing, NFKC, ...) has no
well-defined byte string per token and is refused, as are decoders we cannot read.
Leading-space conventions (a SentencePiece dummy prefix) are kept as the bytes the
tokens spell, so both models must see the same text: byte distributions are compared on
the bytes the tokens produce.

Exact next-byte distributions
-----------------------------
With ``p(v | h)`` the token LM after token history ``h``, the probability that the next
symbols start with the string ``s`` is (RECIPES.md section 7)::

    Q_h(s) = sum_{v: kappa(v) starts with s} p(v | h)
           + sum_{v: kappa(v) is a strict non-empty prefix of s} p(v | h) * Q_{h.v}(s[len(kappa(v)):])

and ``P(b | h, u) = Q_h(u.b) / Q_h(u)`` after partial bytes ``u``. At a token boundary
(``u`` empty) one LM call is exact: ``P(b | h) = sum_{v: kappa(v)[0] = b} p(v | h)``, a
product with the sparse ``V x 258`` first-symbol map (:func:`first_symbol_map`). Inside a
token the second sum needs the LM at longer histories: :class:`ByteOracle` evaluates the
recursion exactly with memoised LM calls, up to a budget of extra calls per query; when the
budget cuts a branch, its mass is not distributed and is reported as ``leaked`` (so a
bounded computation says how far it is from exact). The single-token shortcut (only the
first sum) is wrong: on the unigram LM {a: .1, b: .2, ab: .3, ba: .4} it gives
``P(b | a) = 0.75`` where the exact value is 0.9.

Non-canonical tokenizations: ``h`` is the one tokenization of the history the data gives
(the tokenizer's canonical one); the recursion sums over every tokenization of the
*future* bytes, but not over alternative tokenizations of the past (Vieira et al. 2025
marginalise those too). That is the approximation every method here makes.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from kd import ConfigError

NUM_SYMBOLS = 258
EOS = 256
OTHER = 257

Symbols = tuple[int, ...]


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's unicode -> byte table: printable bytes map to themselves, the others to
    code points 256 and up, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def _kind(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError("byte-level KD needs a fast (tokenizers-backed) tokenizer; load it with use_fast=True")
    normalizer = backend.normalizer
    if normalizer is not None:
        text = str(normalizer)
        rewrites = [n for n in ("Lowercase", "NFKC", "NFKD", "NFC", "NFD", "Strip", "BertNormalizer") if n in text]
        if rewrites:
            raise ConfigError(f"the tokenizer's normalizer ({', '.join(rewrites)}) rewrites text, so its tokens have no "
                              "well-defined bytes; byte-level KD needs a byte-level BPE or SentencePiece tokenizer")
    decoder = str(backend.decoder)
    if "ByteLevel" in decoder:
        return "byte_level"
    if "Metaspace" in decoder or "ByteFallback" in decoder or "Replace" in decoder:
        return "sentencepiece"
    raise ConfigError(f"cannot read token bytes through the decoder {decoder or None}; byte-level KD supports "
                      "byte-level BPE (GPT-2 style) and SentencePiece tokenizers")


def token_symbols(tokenizer: Any) -> list[Symbols]:
    """``kappa(v)`` for every id ``v < len(tokenizer)`` (see the module docstring)."""
    kind = _kind(tokenizer)
    special = set(tokenizer.all_special_ids)
    eos = tokenizer.eos_token_id
    table = _gpt2_byte_decoder() if kind == "byte_level" else {}
    out: list[Symbols] = []
    for v, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if v == eos:
            out.append((EOS,))
        elif v in special or piece is None:
            out.append((OTHER,))
        elif kind == "byte_level":
            try:
                out.append(tuple(table[c] for c in piece))
            except KeyError as e:
                raise ConfigError(f"token {v} ({piece!r}) is not written in GPT-2's byte alphabet; is this tokenizer "
                                  "really byte-level?") from e
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out.append((int(piece[3:5], 16),))
        else:
            out.append(tuple(piece.replace("▁", " ").encode("utf-8")))
    if any(len(s) == 0 for s in out):
        raise ConfigError("the tokenizer has tokens that spell no bytes; byte-level KD cannot place them")
    return out


def first_symbol_map(symbols: Sequence[Symbols]) -> Tensor:
    """Sparse ``(V, NUM_SYMBOLS)`` float matrix with a 1 at ``(v, kappa(v)[0])``: next-token
    probabilities ``(..., V) @ map`` are the exact next-byte distribution at a boundary."""
    rows = torch.arange(len(symbols))
    cols = torch.tensor([s[0] for s in symbols])
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), torch.ones(len(symbols)), (len(symbols), NUM_SYMBOLS))


def boundary_byte_probs(token_probs: Tensor, first_map: Tensor) -> Tensor:
    """``(..., V)`` next-token probabilities -> ``(..., NUM_SYMBOLS)`` next-byte ones."""
    shape = token_probs.shape
    flat = token_probs.reshape(-1, shape[-1]).float()
    return torch.sparse.mm(first_map.t().float(), flat.t()).t().reshape(*shape[:-1], NUM_SYMBOLS)


class ByteOracle:
    """Exact prefix masses ``Q_h(s)`` and next-byte distributions of a token LM.

    Args:
        next_token_probs: ``history (tuple of ids) -> (V,)`` probabilities of the next
            token (one LM call; results are memoised per history).
        symbols: ``kappa(v)`` of every token (:func:`token_symbols`).
        max_calls: extra LM calls one query may make beyond the ones already memoised
            (None: no bound, exact). A branch cut by the budget adds the probability of
            reaching it (an upper bound on the mass it would have added) to ``leaked``,
            which accumulates over queries until reset by the caller.
    """

    def __init__(self, next_token_probs: Callable[[tuple[int, ...]], Tensor], symbols: Sequence[Symbols],
                 max_calls: int | None = None) -> None:
        self.lm = next_token_probs
        self.symbols = list(symbols)
        self.max_calls = max_calls
        self._cache: dict[tuple[int, ...], Tensor] = {}
        self._order = sorted(range(len(self.symbols)), key=lambda v: self.symbols[v])
        self._sorted = [self.symbols[v] for v in self._order]
        self._exact: dict[Symbols, list[int]] = {}
        for v, s in enumerate(self.symbols):
            self._exact.setdefault(s, []).append(v)
        self.calls = 0
        self.leaked = 0.0

    def _probs(self, history: tuple[int, ...]) -> Tensor | None:
        if history not in self._cache:
            if self.max_calls is not None and self._budget <= 0:
                return None
            self._budget -= 1
            self.calls += 1
            self._cache[history] = self.lm(history).double()
        return self._cache[history]

    def _starting_with(self, s: Symbols) -> list[int]:
        lo = bisect.bisect_left(self._sorted, s)
        hi = lo
        while hi < len(self._sorted) and self._sorted[hi][: len(s)] == s:
            hi += 1
        return self._order[lo:hi]

    def _mass(self, history: tuple[int, ...], s: Symbols, weight: float) -> float:
        probs = self._probs(history)
        if probs is None:
            self.leaked += weight
            return 0.0
        ids = self._starting_with(s)
        total = float(probs[ids].sum()) if ids else 0.0
        for k in range(1, len(s)):
            for v in self._exact.get(s[:k], ()):
                pv = float(probs[v])
                if pv > 0:
                    total += pv * self._mass(history + (v,), s[k:], weight * pv)
        return total

    def prefix_mass(self, history: Sequence[int], s: Sequence[int]) -> float:
        """``Q_h(s)``: probability that the symbols after ``history`` start with ``s``."""
        self._budget = self.max_calls if self.max_calls is not None else 0
        if not s:
            return 1.0
        return self._mass(tuple(history), tuple(s), 1.0)

    def next_byte(self, history: Sequence[int], partial: Sequence[int] = ()) -> Tensor:
        """``(NUM_SYMBOLS,)`` float64 ``P(b | h, u)`` after ``history`` and the partial
        symbols ``u`` of an unfinished token; sums to 1 when exact (``leaked`` == 0)."""
        u = tuple(partial)
        q = torch.tensor([self.prefix_mass(history, u + (b,)) for b in range(NUM_SYMBOLS)], dtype=torch.float64)
        return q / self.prefix_mass(history, u) if u else q


def uld_distance(student_probs: Tensor, teacher_probs: Tensor) -> Tensor:
    """ULD (Boizard et al. 2024): ``sum_i |sort_desc(p_S)_i - sort_desc(p_T)_i|`` with the
    shorter vocabulary zero-padded; ``(..., V_S), (..., V_T) -> (...)``. Tokenizer-free:
    only the sorted probability values are compared."""
    width = max(student_probs.shape[-1], teacher_probs.shape[-1])
    s = torch.nn.functional.pad(student_probs.sort(-1, descending=True).values, (0, width - student_probs.shape[-1]))
    t = torch.nn.functional.pad(teacher_probs.sort(-1, descending=True).values, (0, width - teacher_probs.shape[-1]))
    return (s - t).abs().sum(-1)
