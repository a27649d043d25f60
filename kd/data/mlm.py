"""Masked-language-model batches the way DistilBERT's training code builds them.

Algorithm (Sanh et al. 2019, HF ``research_projects/distillation``, ``prepare_batch_mlm``):

1. every token id ``v`` gets a sampling weight ``max(count(v), 1) ** -smoothing``
   (``smoothing`` 0.7: rare tokens are masked more often than their frequency says),
   special tokens (pad, CLS, SEP, MASK, ...) weight 0, so they are never chosen;
2. per batch, ``n_tgt = ceil(mlm_probability * sum(lengths))`` positions are drawn
   **without replacement** over the flattened batch (padding excluded), proportionally to
   the weights of the tokens standing there;
3. each chosen position becomes ``[MASK]`` with probability 0.8, stays as it is with 0.1
   and becomes a uniformly random token with 0.1; the labels hold the original ids there
   and ``-100`` everywhere else.

The draw is made again for every batch (a collator, not a preprocessing step). Held-out
splits are masked with a fixed seed so every evaluation scores the same positions.

Deviation: the code rounds ``n_tgt`` to a multiple of 8 under fp16; we do not.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
from torch import Tensor

from kd import ConfigError
from kd.batches import right_pad
from kd.data import IGNORE_INDEX, ResumableData, eval_sampler, train_sampler


def token_weights(counts: Tensor, special_ids: Iterable[int], smoothing: float = 0.7) -> Tensor:
    """``(V,)`` sampling weights ``max(count, 1) ** -smoothing``, 0 for ``special_ids``."""
    weights = counts.double().clamp(min=1) ** -smoothing
    special = [int(i) for i in special_ids if i is not None]
    if special:
        weights[torch.tensor(special, dtype=torch.long)] = 0.0
    return weights


def num_targets(attention_mask: Tensor, mlm_probability: float = 0.15) -> int:
    """``ceil(mlm_probability * number of real tokens)``; lengths ``[10, 7]`` give 3."""
    return math.ceil(mlm_probability * int(attention_mask.sum()))


def mask_tokens(
    input_ids: Tensor,
    attention_mask: Tensor,
    weights: Tensor,
    mask_token_id: int,
    vocab_size: int,
    mlm_probability: float = 0.15,
    split: tuple[float, float, float] = (0.8, 0.1, 0.1),
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Mask a batch as described in the module docstring.

    Args:
        input_ids: ``(B, L)`` token ids; attention_mask: ``(B, L)`` 1 on real tokens.
        weights: ``(V,)`` from :func:`token_weights`.
        mask_token_id: the tokenizer's ``[MASK]`` id; vocab_size: range of random tokens.
        split: probabilities of ``[MASK]`` / keep / random token at a chosen position.

    Returns:
        ``(masked_input_ids, labels)``, both ``(B, L)``; labels are ``-100`` where no
        prediction is asked.
    """
    flat_ids = input_ids.reshape(-1)
    probs = weights.to(input_ids.device)[flat_ids].float() * attention_mask.reshape(-1).float()
    available = int((probs > 0).sum())
    n = min(num_targets(attention_mask, mlm_probability), available)
    chosen = torch.zeros_like(flat_ids, dtype=torch.bool)
    if n > 0:
        chosen[torch.multinomial(probs, n, replacement=False, generator=generator)] = True
    chosen = chosen.view_as(input_ids)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    action = torch.multinomial(torch.tensor(split, dtype=torch.float), input_ids.numel(), replacement=True,
                               generator=generator).view_as(input_ids).to(input_ids.device)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator).to(input_ids.device)
    masked = torch.where(chosen & (action == 0), torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(chosen & (action == 2), random_ids, masked)
    return masked, labels


class MLMCollator:
    """Pads token lists to a batch and masks it (:func:`mask_tokens`) on every call.

    Args:
        weights: ``(V,)`` token sampling weights; mask_token_id, pad_token_id: ids.
        vocab_size: range of random replacement tokens.
        mlm_probability: share of real tokens to predict (0.15).
        seed: None draws fresh masks each batch (training); an int makes each call's mask a
            function of the batch's example indices (held-out splits: the same positions
            every evaluation).
    """

    def __init__(self, weights: Tensor, mask_token_id: int, pad_token_id: int, vocab_size: int,
                 mlm_probability: float = 0.15, seed: int | None = None) -> None:
        self.weights, self.mask_token_id, self.pad_token_id = weights, mask_token_id, pad_token_id
        self.vocab_size, self.mlm_probability, self.seed = vocab_size, mlm_probability, seed

    def __call__(self, items: list[dict]) -> dict[str, Tensor]:
        ids, attention = right_pad([it["input_ids"] for it in items], self.pad_token_id)
        generator = None
        if self.seed is not None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + sum(int(it["index"]) for it in items))
        masked, labels = mask_tokens(ids, attention, self.weights, self.mask_token_id, self.vocab_size,
                                     self.mlm_probability, generator=generator)
        return {"input_ids": masked, "attention_mask": attention, "labels": labels, "original_ids": ids}


# ----------------------------------------------------------------------------- the datamodule


class _Chunks(torch.utils.data.Dataset):
    def __init__(self, chunks: list[list[int]]) -> None:
        self.chunks = chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.chunks[i], "index": i}


def chunk_documents(tokenizer: Any, docs: list[str], max_length: int) -> list[list[int]]:
    """Each document's tokens cut into windows of ``max_length - 2``, each wrapped as
    ``[CLS] window [SEP]`` (documents never share a window)."""
    width = max_length - 2
    chunks = []
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), width):
            chunks.append([tokenizer.cls_token_id, *ids[start : start + width], tokenizer.sep_token_id])
    return chunks


class MLMDataModule(ResumableData, L.LightningDataModule):
    """Masked-LM batches of text (``input_ids``, ``attention_mask``, ``labels``,
    ``original_ids``), masked by :class:`MLMCollator`: redrawn per training batch, fixed on
    the held-out splits.

    Args:
        source: a :class:`kd.data.sources.TextSource` (or anything with ``load() -> {split: [documents]}``).
        tokenizer: hub name or directory of a tokenizer with a ``[MASK]`` token; None
            trains a WordPiece tokenizer of ``vocab_size`` on the training documents.
        max_length: tokens per window, ``[CLS]`` and ``[SEP]`` included.
        mlm_probability, smoothing: DistilBERT's masking (0.15, 0.7).
        eval_seed: the seed of the held-out masks.
    """

    #: the models this data is for (kd.models.KINDS; checked by kd.build)
    kd_kind = "masked_lm"

    def __init__(self, source: Any, tokenizer: str | None = None, vocab_size: int = 2000, min_frequency: int = 2,
                 max_length: int = 64, batch_size: int = 32, eval_batch_size: int = 64, mlm_probability: float = 0.15,
                 smoothing: float = 0.7, eval_seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        self.source, self.tokenizer_name = source, tokenizer
        self.vocab_size, self.min_frequency, self.max_length = vocab_size, min_frequency, max_length
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.mlm_probability, self.smoothing, self.eval_seed = mlm_probability, smoothing, eval_seed
        self.tokenizer: Any = None
        self.splits: dict[str, _Chunks] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        docs = self.source.load()
        if self.tokenizer_name:
            from kd.models import load_tokenizer

            self.tokenizer = load_tokenizer(self.tokenizer_name)
        else:
            from kd.data.tokenizer import train_wordpiece_tokenizer

            self.tokenizer = train_wordpiece_tokenizer(docs["train"], self.vocab_size, min_frequency=self.min_frequency)
        if self.tokenizer.mask_token_id is None:
            raise ConfigError(f"tokenizer '{self.tokenizer_name}' has no mask token; masked-LM data needs one "
                              "(a BERT/RoBERTa tokenizer, or data.tokenizer=null to train one)")
        self.splits = {k: _Chunks(chunk_documents(self.tokenizer, v, self.max_length)) for k, v in docs.items()}
        counts = torch.zeros(len(self.tokenizer), dtype=torch.float64)
        for chunk in self.splits["train"].chunks:
            counts += torch.bincount(torch.tensor(chunk), minlength=len(counts)).double()
        self.weights = token_weights(counts, self.tokenizer.all_special_ids, self.smoothing)

    def _collator(self, seed: int | None) -> MLMCollator:
        return MLMCollator(self.weights, self.tokenizer.mask_token_id, self.tokenizer.pad_token_id,
                           len(self.tokenizer), self.mlm_probability, seed=seed)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        ds = self.splits["train"]
        return torch.utils.data.DataLoader(ds, batch_size=self.batch_size, sampler=train_sampler(ds, self, self.batch_size),
                                           collate_fn=self._collator(None), num_workers=self.num_workers)

    def _eval(self, split: str) -> torch.utils.data.DataLoader:
        ds = self.splits[split]
        return torch.utils.data.DataLoader(ds, batch_size=self.eval_batch_size, sampler=eval_sampler(ds, self),
                                           collate_fn=self._collator(self.eval_seed), num_workers=self.num_workers)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self._eval("val")

    def test_dataloader(self) -> torch.utils.data.DataLoader:
        return self._eval("test")
