"""The teacher logit cache: a teacher's top-k log-probabilities at every position of a
training split, computed in one pass and kept on disk (DistillKit-style offline signal,
docs/spec.md section 8). :class:`kd.regimes.TeacherLogits` (``regime=teacher_logits``)
reads it; this module owns the format, the key and the teacher pass.

**The teacher pass.** One pass over the training split, in dataset order, stores per
position the ``k`` most likely ids and their log-probabilities at the loss temperature,
``log_softmax(z / T)`` over the tokenizer's vocabulary. A served teacher
(:class:`kd.served.ServedTeacher`) gives its top-k itself (T = 1 only; its cache is keyed
by its fingerprint instead of its weights). The teacher runs through
:func:`kd.batches.outputs`, the call recipes make, so its logits are aligned (position i
predicts token i+1) and cut to the vocabulary exactly as the recipes see them.
Classifier data works too: its "position" is the example.

**The format** (version :data:`LOGIT_CACHE_FORMAT`), an entry ``logits/top<k>-<hash>`` of
:mod:`kd.cache`: ``ids.npy`` ``(N, k)`` uint16 when the vocabulary has at most 65,536
tokens, else uint32; ``logprobs.npy`` ``(N, k)`` float16 (or float32,
:data:`LOGPROB_DTYPES`), descending per row; ``offsets.npy`` ``(E + 1,)`` int64, example
``i``'s response positions being rows ``offsets[i]:offsets[i+1]`` in order (N positions,
E training examples). The arrays are memory-mapped (``numpy.load(mmap_mode="r")``): a
batch reads only its own rows. The entry's facts (``entry.json``) hold the number of
examples and positions, ``k``, the vocabulary, the temperature, the dtypes and the bytes
per token (ids + log-probs + offsets, at k = 64 about 256).

**The key** hashes the teacher's weights (:func:`weights_fingerprint`), the data's kind,
the tokenized training split (a classifier's: its inputs), the vocabulary size, ``top_k``,
the temperature, the log-prob dtype and the format version.

**Reading.** :meth:`LogitCache.read` turns a training batch into a
:class:`kd.divergences.TopK` with ``(B, L-1, k)`` ids and log-probabilities aligned with
the recipe's shifted positions (filler at positions outside the responses, which the mask
drops). Token rows are found by the batch's ``index``; a classifier's by a hash of its
inputs (:func:`row_key`; the teacher's output depends on nothing else), so
``precision=16-true`` / ``bf16-true``, which cast the inputs, cannot use a classifier's
cache.

Deviations: the cache is computed in the teacher's own dtype outside the trainer's
autocast (a live teacher under ``precision=bf16-mixed`` runs in bf16) and stores fp16
log-probabilities (about 3 significant digits); DistillKit stores logits, we store
log-probabilities at the loss temperature so the tail mass needs no normaliser.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, default_collate

from kd import ConfigError, batches
from kd.cache import MARKER, Cache
from kd.cache import key as cache_key
from kd.data.lm import collate_train
from kd.divergences import to_log_probs
from kd.signals import TopK

log = logging.getLogger(__name__)

#: version of the logit cache's on-disk layout (part of every key)
LOGIT_CACHE_FORMAT = 1

#: storage dtypes of the cached log-probabilities
LOGPROB_DTYPES = {"float16": np.float16, "float32": np.float32}


def ids_dtype(vocab: int) -> type:
    """The storage dtype of token ids below ``vocab``: uint16 up to 65,536 tokens, else uint32."""
    return np.uint16 if vocab <= 1 << 16 else np.uint32


def row_key(row: Tensor) -> bytes:
    """A classifier input's identity: a hash of its float32 bytes."""
    return hashlib.blake2b(row.detach().to("cpu", torch.float32).contiguous().numpy().tobytes(),
                           digest_size=16).digest()


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over a model's parameter and buffer names, shapes, dtypes and bytes; a served
    teacher's own fingerprint (:meth:`kd.served.ServedTeacher.fingerprint`)."""
    if hasattr(model, "fingerprint"):
        return model.fingerprint()
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def teacher_rows(teacher: nn.Module, batch: dict[str, Tensor], vocab: int | None) -> Tensor:
    """The teacher's logits ``(n, V)`` at the batch's positions that count, row-major, from
    the recipes' own model call (:func:`kd.batches.outputs`: aligned, cut to ``vocab``)."""
    out = batches.outputs(teacher, batch, vocab_size=vocab, role="teacher")
    return out.logits[out.mask]


class LogitCache:
    """A teacher's top-k log-probabilities over a datamodule's training split: found in,
    or built into, the cache under ``cache_dir`` (see the module docstring).

    Args:
        cache_dir: root of the cache (entries under ``logits/``); None:
            :func:`kd.cache.default_cache_dir` (``$KD_CACHE_DIR``, else ``~/.cache/kd``).
        top_k: tokens (classes) kept per position; clipped to the vocabulary, and
            ``top_k >= V`` stores the full distribution.
        temperature: the temperature the log-probabilities are stored at (None: 1.0).
        tail: :meth:`read` compares ``k + 1`` bins, the last the mass outside the top k;
            False renormalises both sides over the top k.
        logprob_dtype: ``"float16"`` (2 bytes a value) or ``"float32"``.
        batch_size: examples per teacher batch while the cache is built.
    """

    #: the regime that reads the cache, named in messages
    name = "teacher_logits"

    def __init__(self, cache_dir: str | None = None, top_k: int = 64, temperature: float | None = None,
                 tail: bool = True, logprob_dtype: str = "float16", batch_size: int = 64) -> None:
        self.cache = Cache(cache_dir)
        self.top_k, self.tail, self.logprob_dtype, self.batch_size = top_k, bool(tail), logprob_dtype, batch_size
        self.temperature = None if temperature is None else float(temperature)
        self.path: Path | None = None
        #: the memory-mapped arrays (after :meth:`load`)
        self.ids: np.ndarray | None = None
        self.logprobs: np.ndarray | None = None
        self.offsets: np.ndarray | None = None
        #: a classifier's training rows by their input (:func:`row_key`)
        self.rows: dict[bytes, int] | None = None
        #: cache facts: positions, k, vocabulary, bytes per token, ...
        self.info: dict[str, Any] = {}
        #: whether the last :meth:`load` ran the teacher (built the cache)
        self.built = False

    # -- the training split as the cache sees it

    @staticmethod
    def _split(data: Any) -> tuple[Any, Callable[[list], dict[str, Tensor]], np.ndarray, int | None]:
        """The training split, its collate function, each example's number of positions,
        and the vocabulary the teacher's logits are cut to (None: a classifier's)."""
        data.setup()
        split = data.splits["train"]
        if getattr(data, "kd_kind", None) == "causal_lm":
            # labels are shifted (position i predicts token i+1): with an empty prompt (plain
            # text) the first response token has no position predicting it
            counts = np.array([len(response) - (not prompt) for prompt, response in split.encoded], dtype=np.int64)
            return split, partial(collate_train, pad_token_id=data.pad_token_id), counts, len(data.tokenizer)
        return split, default_collate, np.ones(len(split), dtype=np.int64), None

    def _loader(self, split: Any, collate: Callable) -> DataLoader:
        return DataLoader(split, batch_size=self.batch_size, shuffle=False, collate_fn=collate)

    def _data_fingerprint(self, data: Any, split: Any, collate: Callable) -> str:
        """Hash of the tokenized training split (a classifier's: its inputs, whose rows
        :attr:`rows` indexes on the way)."""
        h = hashlib.sha256()
        if getattr(data, "kd_kind", None) == "causal_lm":
            h.update(json.dumps(split.encoded).encode())
            return h.hexdigest()
        self.rows = {}
        position = 0
        for batch in self._loader(split, collate):
            inputs = batch[batches.INPUTS]
            h.update(f"{tuple(inputs.shape[1:])}:{inputs.dtype}".encode())
            for row in inputs:
                key = row_key(row)
                h.update(key)
                self.rows.setdefault(key, position)  # identical inputs share the first one's row
                position += 1
        return h.hexdigest()

    # -- the key

    def key(self, teacher: nn.Module, data: Any) -> str:
        """The cache entry's name: ``top<k>-`` and a hash of the teacher's weights, the
        tokenized training split, the vocabulary, top_k, the temperature, the log-prob
        dtype and the format version."""
        split, collate, _, vocab = self._split(data)
        return self._key(teacher, data, split, collate, vocab)

    def _key(self, teacher: nn.Module, data: Any, split: Any, collate: Callable, vocab: int | None) -> str:
        k = self.top_k if vocab is None else min(self.top_k, vocab)  # top_k >= V all store the full teacher
        digest = cache_key(LOGIT_CACHE_FORMAT, weights_fingerprint(teacher), getattr(data, "kd_kind", None),
                           self._data_fingerprint(data, split, collate), vocab, k, self._temperature,
                           self.logprob_dtype, length=20)
        return f"top{k}-{digest}"

    @property
    def _temperature(self) -> float:
        return 1.0 if self.temperature is None else self.temperature

    # -- building and opening an entry

    def _build(self, teacher: nn.Module, split: Any, collate: Callable, counts: np.ndarray, vocab: int | None,
               directory: Path) -> dict[str, Any]:
        """One teacher pass over the training split, in order, into ``directory``."""
        from kd.console import progress

        total = int(counts.sum())
        offsets = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        np.save(directory / "offsets.npy", offsets)
        device = next(iter(teacher.parameters()), torch.empty(0)).device
        store = LOGPROB_DTYPES[self.logprob_dtype]
        floor = float(np.finfo(store).min)  # -inf would turn 0 * log 0 into NaN downstream
        ids = logprobs = None
        width = k = 0
        cursor = 0
        log.info("building the teacher logit cache: %d training examples, %d positions, top-%d at T=%g",
                 len(counts), total, self.top_k, self._temperature)
        mode = teacher.training
        teacher.eval()
        try:
            with torch.no_grad(), progress("teacher logit cache", len(counts)) as advance:
                for batch in self._loader(split, collate):
                    batch = {key: v.to(device) if torch.is_tensor(v) else v for key, v in batch.items()}
                    if hasattr(teacher, "score"):  # a served teacher: its top-k, untempered (T = 1 checked)
                        top = teacher.outputs(batch, min(self.top_k, vocab))
                        values, index = top.logits.logprobs[top.mask], top.logits.ids[top.mask]
                        rows = values
                    else:
                        rows = teacher_rows(teacher, batch, vocab)
                    if ids is None:
                        width = vocab if hasattr(teacher, "score") else rows.shape[-1]
                        k = min(self.top_k, width)
                        ids = np.lib.format.open_memmap(directory / "ids.npy", mode="w+",
                                                        dtype=ids_dtype(width), shape=(total, k))
                        logprobs = np.lib.format.open_memmap(directory / "logprobs.npy", mode="w+", dtype=store,
                                                             shape=(total, k))
                    if not hasattr(teacher, "score"):
                        values, index = torch.topk(to_log_probs(rows, self._temperature, dtype=torch.float32), k,
                                                   dim=-1)
                    n = len(rows)
                    if cursor + n > total:
                        raise RuntimeError(f"the teacher pass found more than the {total} response positions the "
                                           "training split holds")
                    ids[cursor : cursor + n] = index.cpu().numpy()
                    logprobs[cursor : cursor + n] = values.clamp(min=floor).cpu().numpy()
                    cursor += n
                    advance(len(next(iter(batch.values()))))
        finally:
            teacher.train(mode)
        if cursor != total:
            raise RuntimeError(f"the teacher pass found {cursor} response positions where the training split holds "
                               f"{total}")
        ids.flush()
        logprobs.flush()
        del ids, logprobs
        size = sum((directory / f).stat().st_size for f in ("ids.npy", "logprobs.npy", "offsets.npy"))
        return {"format": LOGIT_CACHE_FORMAT, "examples": len(counts), "positions": total, "k": k, "vocab": width,
                "temperature": self._temperature, "ids_dtype": np.dtype(ids_dtype(width)).name,
                "logprob_dtype": self.logprob_dtype, "bytes": size, "bytes_per_token": size / total}

    def _open(self, directory: Path, counts: np.ndarray, vocab: int | None) -> None:
        """Memory-map an entry's arrays, checking that they fit the training split
        (raises ValueError when they do not: :class:`kd.cache.Cache` then rebuilds it)."""
        info = json.loads((directory / MARKER).read_text()).get("info", {})
        offsets = np.load(directory / "offsets.npy")
        ids = np.load(directory / "ids.npy", mmap_mode="r")
        logprobs = np.load(directory / "logprobs.npy", mmap_mode="r")
        k, width = info.get("k"), info.get("vocab")
        if info.get("format") != LOGIT_CACHE_FORMAT or not k or not width or (vocab is not None and width != vocab):
            raise ValueError("its facts do not describe this format and vocabulary")
        if offsets.shape != (len(counts) + 1,) or offsets[0] != 0 or not np.array_equal(np.diff(offsets), counts):
            raise ValueError("its offsets do not match the training split")
        if ids.shape != (offsets[-1], k) or logprobs.shape != ids.shape:
            raise ValueError(f"its arrays have shapes {ids.shape} and {logprobs.shape}, not ({offsets[-1]}, {k})")
        if ids.dtype != ids_dtype(width) or logprobs.dtype != LOGPROB_DTYPES[self.logprob_dtype]:
            raise ValueError(f"its arrays are {ids.dtype} and {logprobs.dtype}")
        for block in (ids[:4096], ids[-4096:]):  # large entries are checked by size only (kd.cache)
            if block.size and int(block.max()) >= width:
                raise ValueError("it holds ids outside the vocabulary")
        self.ids, self.logprobs, self.offsets = ids, logprobs, offsets

    def load(self, teacher: nn.Module, data: Any) -> None:
        """Find this teacher's entry for ``data``'s training split, or build it with one
        teacher pass (:attr:`built` says which), and memory-map it."""
        self.built = False
        split, collate, counts, vocab = self._split(data)
        name = self._key(teacher, data, split, collate, vocab)

        def build(directory: Path) -> dict[str, Any]:
            self.built = True
            return self._build(teacher, split, collate, counts, vocab, directory)

        self.path = self.cache.get_or_build("logits", name, build, lambda d: self._open(d, counts, vocab),
                                            what="teacher logit cache")
        self._open(self.path, counts, vocab)
        self.info = self.cache.meta("logits", name)

    @property
    def bytes_per_token(self) -> float:
        """The cache's bytes per cached position (after :meth:`load`)."""
        return float(self.info["bytes_per_token"])

    # -- reading

    def read(self, batch: dict[str, Tensor]) -> TopK:
        """The teacher's cached top-k for ``batch``'s training rows, aligned with the
        recipe's positions (``(B, L-1, k)`` for token batches, ``(B, k)`` for a classifier's)."""
        if self.ids is None or self.offsets is None or self.logprobs is None:
            raise RuntimeError(f"regime={self.name} gives batches only after prepare() built or found its cache")
        _, mask = batches.batch_targets(batch)
        if batches.is_tokens(batch):
            if batches.INDEX not in batch:
                raise ConfigError(f"regime={self.name} looks training rows up by their example index, which these "
                                  "batches lack; use kd.data.lm.LMDataModule (its batches carry 'index')")
            index = np.asarray(batch[batches.INDEX].tolist(), dtype=np.int64)
            counts = mask.sum(-1).cpu().numpy()
        else:
            inputs = batch[batches.INPUTS]
            rows_of = self.rows or {}
            index = np.asarray([rows_of.get(row_key(row), -1) for row in inputs.cpu()], dtype=np.int64)
            counts = np.ones(len(index), dtype=np.int64)
        if (index < 0).any() or (index >= len(self.offsets) - 1).any():
            raise RuntimeError(f"a training row is not in the teacher logit cache {self.path} (rows of another "
                               "split, or classifier inputs cast by precision=16-true/bf16-true)")
        starts, ends = self.offsets[index], self.offsets[index + 1]
        if not np.array_equal(ends - starts, counts):
            raise RuntimeError(f"the teacher logit cache {self.path} holds other response lengths than this batch; "
                               "delete that directory to rebuild it")
        rows = np.concatenate([np.arange(a, b) for a, b in zip(starts, ends)])
        device = mask.device
        k = self.ids.shape[1]
        shape = (*mask.shape, k)
        ids = torch.arange(k, device=device).expand(shape).clone()  # filler outside the mask: uniform over k ids
        logprobs = torch.full(shape, -math.log(k), device=device)
        ids[mask] = torch.from_numpy(self.ids[rows].astype(np.int64)).to(device)
        logprobs[mask] = torch.from_numpy(self.logprobs[rows].astype(np.float32)).to(device)
        return TopK(ids, logprobs, self.tail)


__all__ = ["LogitCache", "LOGIT_CACHE_FORMAT", "LOGPROB_DTYPES", "ids_dtype", "row_key", "weights_fingerprint",
           "teacher_rows"]
