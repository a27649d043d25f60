"""Built-in models, freezing and weights on disk (safetensors, state dicts, kd .ckpt)."""

from __future__ import annotations

import pytest
import torch

from kd import ConfigError
from kd.models import DigitsCNN, MLPClassifier, count_parameters, freeze, load_weights, save_model


def test_shapes_and_parameter_counts():
    x = torch.randn(3, 64)
    assert MLPClassifier(hidden=[32])(x).shape == (3, 10)
    assert DigitsCNN()(x).shape == (3, 10)
    assert DigitsCNN()(x.view(3, 1, 8, 8)).shape == (3, 10)
    assert count_parameters(MLPClassifier(hidden=[32])) == 64 * 32 + 32 + 32 * 10 + 10
    assert count_parameters(None) == 0


def test_freeze():
    m = freeze(MLPClassifier(hidden=[8], dropout=0.5).train())
    assert not m.training and count_parameters(m, trainable_only=True) == 0


def test_save_and_load_round_trip(tmp_path):
    a, b = MLPClassifier(hidden=[8]), MLPClassifier(hidden=[8])
    save_model(a, tmp_path / "student")
    assert (tmp_path / "student" / "model.safetensors").is_file()
    load_weights(b, tmp_path / "student")
    x = torch.randn(4, 64)
    torch.testing.assert_close(a(x), b(x))


def test_load_from_plain_state_dict_and_lightning_checkpoint(tmp_path):
    a = MLPClassifier(hidden=[8])
    torch.save(a.state_dict(), tmp_path / "w.pt")
    torch.save({"state_dict": {f"student.{k}": v for k, v in a.state_dict().items()}
                | {"teacher.x": torch.zeros(1)}}, tmp_path / "run.ckpt")
    x = torch.randn(2, 64)
    for path in ("w.pt", "run.ckpt"):
        b = load_weights(MLPClassifier(hidden=[8]), tmp_path / path)
        torch.testing.assert_close(a(x), b(x))


def test_missing_or_mismatched_weights_fail_with_one_sentence(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; pass the path of a trained model"):
        load_weights(MLPClassifier(), tmp_path / "missing.pt")
    save_model(MLPClassifier(hidden=[8]), tmp_path / "small")
    with pytest.raises(ConfigError, match="do not fit the configured model"):
        load_weights(MLPClassifier(hidden=[16]), tmp_path / "small")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no weights found in directory"):
        load_weights(MLPClassifier(), tmp_path / "empty")
