"""scikit-learn's handwritten digits as a LightningDataModule (bundled: no network).

1,797 grey 8x8 images of the digits 0-9 (pixel values 0..16, scaled to [0, 1]). The
split into train / val / test is a fixed permutation drawn from ``split_seed``, so every
run, seed and recipe sees the same examples; the run's own seed only changes the order
of training batches and the model initialisation.

``labeled_fraction`` < 1 keeps the gold label on that (class-stratified) share of the
training images and replaces the others by :data:`kd.data.IGNORE_INDEX`: the classic
transfer-set setting of Hinton et al., where the teacher's soft targets cover every
training input but gold labels only some. Validation and test keep every label.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from kd import ConfigError
from kd.data import IGNORE_INDEX, ResumableData, eval_sampler, train_sampler


class TensorDictDataset(Dataset):
    """Rows of equally long tensors, returned as dicts (default collate stacks them)."""

    def __init__(self, **columns: torch.Tensor) -> None:
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"columns differ in length: { {k: len(v) for k, v in columns.items()} }")
        self.columns = columns
        self.length = lengths.pop()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.columns.items()}


class DigitsDataModule(ResumableData, L.LightningDataModule):
    """Digits classification with a fixed seeded split.

    Args:
        batch_size: examples per training batch (evaluation uses the same size).
        val_size: images held out for validation (model selection).
        test_size: images held out for the final test.
        labeled_fraction: share of training images that keep their gold label, in (0, 1].
        split_seed: seed of the permutation that defines the split (not the run seed).
        num_workers: DataLoader workers (0: load in the main process; the data is tiny).
    """

    num_classes = 10

    #: the models this data is for (kd.models.KINDS; checked by kd.build)
    kd_kind = "classifier"

    def __init__(
        self,
        batch_size: int = 64,
        val_size: int = 270,
        test_size: int = 450,
        labeled_fraction: float = 1.0,
        split_seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 < labeled_fraction <= 1.0:
            raise ConfigError(
                f"data.labeled_fraction must be in (0, 1] (got {labeled_fraction}); 1.0 keeps every label"
            )
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1 (got {batch_size})")
        self.batch_size = batch_size
        self.val_size = val_size
        self.test_size = test_size
        self.labeled_fraction = labeled_fraction
        self.split_seed = split_seed
        self.num_workers = num_workers
        self.splits: dict[str, TensorDictDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        from sklearn.datasets import load_digits

        images, labels = load_digits(return_X_y=True)
        x = torch.tensor(images, dtype=torch.float32) / 16.0
        y = torch.tensor(labels, dtype=torch.long)
        n_train = len(x) - self.val_size - self.test_size
        if n_train < 1 or self.val_size < 1 or self.test_size < 1:
            raise ConfigError(
                f"data.val_size + data.test_size must leave training images out of {len(x)} "
                f"(got {self.val_size} + {self.test_size})"
            )
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.split_seed))
        test, val, train = perm[: self.test_size], perm[self.test_size : self.test_size + self.val_size], perm[
            self.test_size + self.val_size :
        ]
        train_labels = y[train].clone()
        if self.labeled_fraction < 1.0:
            keep = torch.zeros(len(train), dtype=torch.bool)
            for c in range(self.num_classes):
                rows = (train_labels == c).nonzero().flatten()
                keep[rows[: max(1, round(self.labeled_fraction * len(rows)))]] = True
            train_labels[~keep] = IGNORE_INDEX
        self.splits = {
            "train": TensorDictDataset(inputs=x[train], labels=train_labels),
            "val": TensorDictDataset(inputs=x[val], labels=y[val]),
            "test": TensorDictDataset(inputs=x[test], labels=y[test]),
        }

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        ds = self.splits[split]
        sampler = train_sampler(ds, self, self.batch_size) if shuffle else eval_sampler(ds, self)
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
