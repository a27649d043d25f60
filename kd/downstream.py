"""What an encoder keeps for a task: fine-tune it with a classification head, report accuracy.

:class:`TopicClassification` is the embedded downstream check of the masked-LM recipes
(DistilBERT): predict the chatterbot-corpus category (``ai``, ``history``, ``food``, ... 21
in all) of a conversation from its first turn, offline. The encoder (the masked LM's
``base_model``) is fine-tuned as a whole with a linear head on its ``[CLS]`` (first)
position for a few epochs, the same way for every model compared, and scored on held-out
conversations. The model passed in is copied, never changed.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from kd import ConfigError


def topic_examples() -> list[tuple[str, str]]:
    """``(first turn, category)`` of every chatterbot-corpus English conversation."""
    from kd.data.sources import ChatterbotSource

    return [(turns[0], category) for category, turns in ChatterbotSource.conversations() if turns and turns[0]]


class _Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, hidden: int, classes: int) -> None:
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(hidden, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(hidden[:, 0])


class TopicClassification:
    """Fine-tune a copy of a masked LM's encoder on chatterbot topics; ``__call__`` returns
    held-out accuracy in [0, 1].

    Args:
        epochs, lr, batch_size: fine-tuning (AdamW, constant lr).
        test_fraction: held-out share of the conversations (fixed split, ``split_seed``).
        max_length: tokens per input.
        seed: initialisation of the head and batch order (the same for every model).
    """

    def __init__(self, epochs: int = 4, lr: float = 5e-4, batch_size: int = 32, test_fraction: float = 0.2,
                 max_length: int = 32, seed: int = 0, split_seed: int = 0) -> None:
        self.epochs, self.lr, self.batch_size = epochs, lr, batch_size
        self.test_fraction, self.max_length = test_fraction, max_length
        self.seed, self.split_seed = seed, split_seed

    def _data(self, tokenizer: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
        pairs = topic_examples()
        classes = sorted({c for _, c in pairs})
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(self.split_seed)).tolist()
        n_test = int(self.test_fraction * len(pairs))

        def encode(idx: list[int]) -> dict[str, torch.Tensor]:
            enc = tokenizer([pairs[i][0] for i in idx], padding=True, truncation=True, max_length=self.max_length,
                            return_tensors="pt")
            labels = torch.tensor([classes.index(pairs[i][1]) for i in idx])
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}

        return encode(order[n_test:]), encode(order[:n_test]), len(classes)

    def __call__(self, model: nn.Module, tokenizer: Any) -> float:
        encoder = getattr(model, "base_model", None)
        if encoder is None or not hasattr(getattr(model, "config", None), "hidden_size"):
            raise ConfigError("downstream=topics fine-tunes a transformers encoder; use a masked-LM teacher/student")
        train, test, classes = self._data(tokenizer)
        torch.manual_seed(self.seed)
        clf = _Classifier(copy.deepcopy(encoder), model.config.hidden_size, classes)
        clf.requires_grad_(True)  # a frozen teacher's copy is fine-tuned like any other encoder
        device = next(model.parameters()).device
        clf.to(device).train()
        optimizer = torch.optim.AdamW(clf.parameters(), lr=self.lr)
        generator = torch.Generator().manual_seed(self.seed)
        n = len(train["labels"])
        for _ in range(self.epochs):
            for idx in torch.randperm(n, generator=generator).split(self.batch_size):
                batch = {k: v[idx].to(device) for k, v in train.items()}
                loss = nn.functional.cross_entropy(clf(batch["input_ids"], batch["attention_mask"]), batch["labels"])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        clf.eval()
        correct = 0
        with torch.no_grad():
            for idx in torch.arange(len(test["labels"])).split(256):
                batch = {k: v[idx].to(device) for k, v in test.items()}
                correct += int((clf(batch["input_ids"], batch["attention_mask"]).argmax(-1) == batch["labels"]).sum())
        return correct / max(1, len(test["labels"]))
