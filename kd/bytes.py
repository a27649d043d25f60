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
symbols start with the string ``s`` is (docs/spec.md section 7)::

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

Byte-head targets
-----------------
Training needs next-byte distributions at thousands of offsets per batch, from one
teacher pass over its own (canonical) tokens. :func:`marginal_byte_targets` gives, at an
offset ``o`` and for ``k`` bytes ahead, the teacher's marginal over byte ``o + k`` summed
over every token path that leaves the canonical tokenization at most once (those whose
probabilities the one pass holds); the other paths' probability is returned as the
*leak*, a bound on the total-variation error (exact, leak 0, for head 0 at a teacher token
boundary). Inside a teacher token the path through a shorter token that spells the partial
bytes exactly usually carries most of the missing mass; :func:`detours` lists the teacher
histories that add it (one extra batched pass). :class:`ByteVocab` bundles a tokenizer's symbols, a :class:`SymbolIndex` (tokens
sorted by symbols, so a prefix is one contiguous range) and the boundary map, and spells
and re-tokenizes responses.

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
#: "no symbol here": the token is shorter (a column index past the byte alphabet)
NONE = NUM_SYMBOLS

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
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), torch.ones(len(symbols)), (len(symbols), NUM_SYMBOLS),
                                   check_invariants=True)


def boundary_byte_probs(token_probs: Tensor, first_map: Tensor) -> Tensor:
    """``(..., V)`` next-token probabilities -> ``(..., NUM_SYMBOLS)`` next-byte ones."""
    shape = token_probs.shape
    flat = token_probs.reshape(-1, shape[-1]).float()
    return torch.sparse.mm(first_map.t().float(), flat.t()).t().reshape(*shape[:-1], NUM_SYMBOLS)


class SymbolIndex:
    """Tokens sorted by their symbol strings, so the tokens whose ``kappa`` starts with a
    prefix are one contiguous range of :attr:`order` (:meth:`prefix_range`).

    Attributes:
        symbols: ``kappa(v)`` by token id.
        order: ``(V,)`` long tensor, token ids in lexicographic order of their symbols.
        exact: symbol string -> the ids that spell exactly it.
        table: ``(V, max_len + pad)`` int16 tensor, row ``r`` the symbols of token
            ``order[r]`` followed by :data:`NONE` (so ``table[:, k]`` is the ``k``-th symbol
            or NONE where the token is shorter).
    """

    def __init__(self, symbols: Sequence[Symbols], pad: int = 0) -> None:
        self.symbols = list(symbols)
        order = sorted(range(len(self.symbols)), key=lambda v: self.symbols[v])
        self.order = torch.tensor(order, dtype=torch.long)
        self._sorted = [self.symbols[v] for v in order]
        self.exact: dict[Symbols, list[int]] = {}
        for v, sym in enumerate(self.symbols):
            self.exact.setdefault(sym, []).append(v)
        width = max(len(sym) for sym in self.symbols) + pad
        self.table = torch.full((len(order), width), NONE, dtype=torch.int16)  # small for 262k-token vocabularies
        for r, sym in enumerate(self._sorted):
            self.table[r, : len(sym)] = torch.tensor(sym)
        self._ranges: dict[Symbols, tuple[int, int]] = {}
        self._columns: dict[int, Tensor] = {}

    def columns(self, n: int) -> Tensor:
        """``(n, V)`` long: the first ``n`` symbols of every token (sorted order), NONE past
        its end; cached (the whole-vocabulary gather of every token boundary)."""
        if n not in self._columns:
            self._columns[n] = self.table[:, :n].t().long().contiguous()
        return self._columns[n]

    def prefix_range(self, prefix: Symbols) -> tuple[int, int]:
        """``(lo, hi)``: ``order[lo:hi]`` are the tokens whose symbols start with ``prefix``."""
        found = self._ranges.get(prefix)
        if found is None:
            lo = bisect.bisect_left(self._sorted, prefix)
            hi = bisect.bisect_left(self._sorted, prefix + (NONE + 1,), lo)
            found = self._ranges[prefix] = (lo, hi)
        return found


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
        self.index = SymbolIndex(self.symbols)
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

    def _mass(self, history: tuple[int, ...], s: Symbols, weight: float) -> float:
        probs = self._probs(history)
        if probs is None:
            self.leaked += weight
            return 0.0
        lo, hi = self.index.prefix_range(s)
        total = float(probs[self.index.order[lo:hi]].sum()) if hi > lo else 0.0
        for k in range(1, len(s)):
            for v in self.index.exact.get(s[:k], ()):
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


def spell(symbols: Sequence[Symbols], ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """The symbols of tokens ``ids`` end to end (``symbols[v]`` is ``kappa(v)``), and the
    offset where each token starts."""
    out: list[int] = []
    starts: list[int] = []
    for v in ids:
        starts.append(len(out))
        out.extend(symbols[v])
    return out, starts


class ByteVocab:
    """A tokenizer seen through its bytes: ``kappa`` of every token, the prefix index and
    the boundary map, and the conversions a cross-tokenizer recipe needs.

    Args:
        tokenizer: a fast transformers tokenizer (see :func:`token_symbols`).
        num_heads: pads :attr:`index`'s table so any ``num_heads`` symbols after any
            in-token offset can be read (the byte heads' count).
    """

    def __init__(self, tokenizer: Any, num_heads: int = 1) -> None:
        self.tokenizer = tokenizer
        self.symbols = token_symbols(tokenizer)
        self.index = SymbolIndex(self.symbols, pad=num_heads)
        self.first_map = first_symbol_map(self.symbols)
        self.eos = tokenizer.eos_token_id

    def __len__(self) -> int:
        return len(self.symbols)

    def spell(self, ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """The symbols of ``ids`` end to end, and the offset where each token starts."""
        return spell(self.symbols, ids)

    def encode(self, symbols: Sequence[int]) -> list[int]:
        """This tokenizer's own tokens for a response spelled by ``symbols``: the bytes up
        to the first EOS read as UTF-8 text and tokenized as the data module tokenizes
        responses, then EOS if there was one. Other special symbols are dropped; invalid
        UTF-8 is replaced, so the result may spell different bytes (compare with
        :meth:`spell`)."""
        ended = EOS in symbols
        body = list(symbols[: symbols.index(EOS)] if ended else symbols)
        text = bytes(b for b in body if b < 256).decode("utf-8", errors="replace")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        return ids + [self.eos] if ended else ids


def detours(token_ids: Sequence[int], index: SymbolIndex, starts: Sequence[int]) -> list[tuple[int, int, int]]:
    """The extra teacher histories that :func:`marginal_byte_targets` can use: for every
    offset ``o`` in ``starts`` inside a teacher token ``i`` whose partial bytes ``u`` are
    exactly some token ``v``, the triple ``(o, i, v)``; run the teacher on its tokens
    ``token_ids[:i] + [v]`` (after the prompt) to get ``p(. | h_i . v)``."""
    spelled, token_start = spell(index.symbols, token_ids)
    out = []
    for o in starts:
        i = bisect.bisect_right(token_start, o) - 1
        if 0 <= i and token_start[i] < o < len(spelled):  # strictly inside token i
            out.extend((o, i, v) for v in index.exact.get(tuple(spelled[token_start[i]:o]), []))
    return out


def marginal_byte_targets(token_probs: Tensor, token_ids: Sequence[int], index: SymbolIndex, starts: Sequence[int],
                          num_heads: int, limit: int | None = None,
                          detour_probs: dict[tuple[int, int], Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The teacher's distribution of byte ``o + k`` given the bytes before ``o``, for
    every offset ``o`` in ``starts`` (where the student's tokens start) and ``k < num_heads``:
    the targets of parallel byte heads, which see only the state at ``o`` and so must
    learn the teacher's *marginal* over byte ``k`` (docs/spec.md section 7), not its
    conditional given the true bytes in between.

    One teacher pass gives ``p(. | h_i)`` before each of its canonical response tokens
    ``t_i``. The marginal sums over every token path that spells bytes ``o .. o+k``; the
    paths computed are those that leave the canonical path at most once: from the teacher
    token ``i`` holding ``o`` (partial bytes ``u``), every token starting with ``u`` and
    reaching past byte ``o + k`` adds its byte there; the canonical token, when it ends
    before ``o + k``, continues into ``p(. | h_{i+1})``, and so on. A path that ends a token
    elsewhere before ``o + k`` (or a token that is a strict prefix of ``u``) would need the
    teacher at a history it was not run on: its probability is the *leak*. At a teacher
    token boundary, head 0's target is exact (leak 0); the targets are normalised over the
    computed mass, and their total-variation distance to the exact marginal is at most
    ``leak``. Inside a teacher token the main missing path is usually the token ``v`` that
    spells ``u`` exactly (a shorter token, then a new one at ``o``): with
    ``detour_probs[(o, v)] = p(. | h_i . v)`` (one extra teacher pass each, see
    :func:`detours`) that path is computed too.

    Args:
        token_probs: ``(m, V)`` teacher next-token probabilities before each of its ``m``
            response tokens ``token_ids``.
        token_ids: the teacher's response tokens (their symbols spell the response).
        index: :class:`SymbolIndex` of the teacher's tokens, padded for ``num_heads``.
        starts: byte offsets of the queries.
        num_heads: bytes per query.
        limit: only bytes before this offset have targets (default: all spelled bytes).
        detour_probs: ``(o, v) -> (V,)`` teacher probabilities after the history that
            ends with token ``v`` at offset ``o`` (optional; :func:`detours` lists them).

    Returns:
        ``targets (Q, num_heads, NUM_SYMBOLS)``, ``valid (Q, num_heads)`` (byte ``o + k``
        exists before ``limit``) and ``leak (Q, num_heads)`` (the uncomputed share of the
        probability mass, 0 where invalid).
    """
    symbols, tok_start = spell(index.symbols, token_ids)
    tok_of = [i for i, v in enumerate(token_ids) for _ in index.symbols[v]]
    n = len(symbols) if limit is None else min(limit, len(symbols))
    probs = token_probs.double()
    canon = [float(probs[i, v]) for i, v in enumerate(token_ids)]

    slots: dict[int, int] = {}  # byte offset -> row of `table`
    table: list[Tensor] = []
    strict_prefix_mass: dict[int, float] = {}

    def slot(x: int) -> int:
        if x not in slots:
            i = tok_of[x]
            ulen = x - tok_start[i]
            prefix = tuple(symbols[tok_start[i]: x])
            lo, hi = index.prefix_range(prefix)
            p = probs[i, index.order[lo:hi]]
            cols = index.columns(num_heads) if ulen == 0 else index.table[lo:hi, ulen: ulen + num_heads].t().long()
            table.append(torch.zeros(num_heads, NUM_SYMBOLS + 1, dtype=torch.float64).scatter_add_(
                1, cols, p.expand(num_heads, -1)))
            strict_prefix_mass[x] = sum(float(probs[i, index.exact.get(prefix[:m], [])].sum()) for m in range(1, ulen))
            slots[x] = len(table) - 1
        return slots[x]

    detour_slots: dict[int, list[tuple[int, float]]] = {}  # offset -> (row of `table`, p(v | h_i))
    for (o, v), after in (detour_probs or {}).items():
        table.append(torch.zeros(num_heads, NUM_SYMBOLS + 1, dtype=torch.float64).scatter_add_(
            1, index.columns(num_heads), after.double()[index.order].expand(num_heads, -1)))
        detour_slots.setdefault(o, []).append((len(table) - 1, float(probs[tok_of[o], v])))

    query, rows, heads, weights = [], [], [], []
    valid = torch.zeros(len(starts), num_heads, dtype=torch.bool)
    leak = torch.zeros(len(starts), num_heads, dtype=torch.float64)
    for q, o in enumerate(starts):
        for k in range(num_heads):
            y = o + k
            if y >= n:
                break
            valid[q, k] = True
            i_last = tok_of[y]
            w = 1.0
            x = o
            for row, pv in detour_slots.get(o, ()):  # v ends at o (it was counted as ended) and continues
                query.append(q * num_heads + k)
                rows.append(row)
                heads.append(k)
                weights.append(pv)
                leak[q, k] -= pv
            for i in range(tok_of[o], i_last + 1):
                query.append(q * num_heads + k)
                rows.append(slot(x))
                heads.append(y - x)
                weights.append(w)
                if i < i_last:  # the canonical token ends before y and continues
                    leak[q, k] -= w * canon[i]
                    w *= canon[i]
                    x = tok_start[i + 1]
            leak[q, k] += strict_prefix_mass[o]
    out = torch.zeros(len(starts) * num_heads, NUM_SYMBOLS + 1, dtype=torch.float64)
    if query:
        stacked = torch.stack(table)[torch.tensor(rows), torch.tensor(heads)]
        out.index_add_(0, torch.tensor(query), stacked * torch.tensor(weights, dtype=torch.float64)[:, None])
    out = out.view(len(starts), num_heads, NUM_SYMBOLS + 1)
    leak = torch.where(valid, leak + out[..., NONE], torch.zeros((), dtype=torch.float64))
    covered = out[..., :NUM_SYMBOLS].sum(-1)
    targets = out[..., :NUM_SYMBOLS] / covered.clamp(min=1e-300).unsqueeze(-1)
    share = torch.where(valid, leak.clamp(min=0) / (covered + leak.clamp(min=0)).clamp(min=1e-300), torch.zeros((), dtype=torch.float64))
    return targets.float(), valid, share.float()
