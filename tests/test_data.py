"""The bundled digits datamodule: fixed split, stratified labelled subset, clear errors."""

from __future__ import annotations

import pytest
import torch

from kd import ConfigError
from kd.data import IGNORE_INDEX
from kd.data.digits import DigitsDataModule


def _rows(ds):
    return {tuple(x.tolist()) for x in ds.columns["inputs"]}


def test_split_sizes_disjoint_and_fixed_by_split_seed():
    a, b = DigitsDataModule(), DigitsDataModule()
    a.setup(), b.setup()
    sizes = {k: len(v) for k, v in a.splits.items()}
    assert sizes == {"train": 1797 - 270 - 450, "val": 270, "test": 450}
    assert not (_rows(a.splits["train"]) & _rows(a.splits["test"]))
    for split in ("train", "val", "test"):
        torch.testing.assert_close(a.splits[split].columns["inputs"], b.splits[split].columns["inputs"])
    c = DigitsDataModule(split_seed=1)
    c.setup()
    assert not torch.equal(a.splits["test"].columns["labels"], c.splits["test"].columns["labels"])


def test_inputs_scaled_and_batches_are_dicts():
    dm = DigitsDataModule(batch_size=16)
    batch = next(iter(dm.train_dataloader()))
    assert batch["inputs"].shape == (16, 64) and batch["inputs"].dtype == torch.float32
    assert 0.0 <= batch["inputs"].min() and batch["inputs"].max() <= 1.0
    assert batch["labels"].dtype == torch.long


def test_labeled_fraction_keeps_a_stratified_share_and_full_eval_labels():
    dm = DigitsDataModule(labeled_fraction=0.2)
    dm.setup()
    labels = dm.splits["train"].columns["labels"]
    kept = labels[labels != IGNORE_INDEX]
    assert abs(len(kept) - 0.2 * len(labels)) <= 10
    counts = torch.bincount(kept, minlength=10)
    assert counts.min() >= 18 and counts.max() <= 24  # every class keeps ~20% of ~108 images
    full = DigitsDataModule()
    full.setup()
    # the same images, only labels removed
    torch.testing.assert_close(full.splits["train"].columns["inputs"], dm.splits["train"].columns["inputs"])
    same = labels != IGNORE_INDEX
    assert torch.equal(labels[same], full.splits["train"].columns["labels"][same])
    for split in ("val", "test"):
        assert (dm.splits[split].columns["labels"] != IGNORE_INDEX).all()


@pytest.mark.parametrize("kwargs,needle", [
    ({"labeled_fraction": 0.0}, "labeled_fraction must be in (0, 1]"),
    ({"labeled_fraction": 1.5}, "labeled_fraction must be in (0, 1]"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
])
def test_bad_settings_fail_at_construction(kwargs, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        DigitsDataModule(**kwargs)


def test_split_leaving_no_training_data_fails_clearly():
    with pytest.raises(ConfigError, match="must leave training images"):
        DigitsDataModule(val_size=1000, test_size=1000).setup()
