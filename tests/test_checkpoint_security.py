"""Checkpoints are data, never code: kd loads them with ``weights_only=True`` on every
supported torch (Lightning passes ``weights_only=None``, which torch before 2.6 reads as
``False``; ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` gives that default on newer torch), a real
kd checkpoint resumes that way, and one holding a pickled object is refused in one sentence
without running it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kd import ConfigError
from kd.cli import one_sentence_errors
from kd.resume import AtomicCheckpointIO
from kd.runs import train
from tests.conftest import SMALL_TASK

TINY = [*SMALL_TASK, "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=0",
        "trainer.limit_test_batches=1", "scratch_baseline=false"]


class Payload:
    """Unpickling it creates the directory ``path``: code that ran when it should not have."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (str(self.path),)


@pytest.fixture(autouse=True)
def old_torch_default(monkeypatch, tmp_path):
    """torch.load(weights_only=None) unpickles anything, as it does before torch 2.6."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    torch.save(Payload(tmp_path / "simulated"), tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt")
    assert (tmp_path / "simulated").is_dir()  # the simulated default really runs what it unpickles


def test_a_checkpoint_with_a_pickled_object_is_refused_and_never_runs(tmp_path):
    ran = tmp_path / "payload-ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": Payload(ran)}, path)
    with pytest.raises(ConfigError) as refused:
        AtomicCheckpointIO().load_checkpoint(path)
    assert not ran.exists()
    message = str(refused.value)
    assert "\n" not in message and str(path) in message and "holds a pickled posix.mkdir" in message
    assert "weights_only=True" in message

    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3, "loops": {"a": [1, 2.5, None, "x"]}}, plain)
    loaded = AtomicCheckpointIO().load_checkpoint(plain, weights_only=False)  # asked or not: weights only
    assert loaded["epoch"] == 3 and torch.equal(loaded["state_dict"]["w"], torch.ones(2))


def test_a_kd_checkpoint_resumes_with_weights_only_and_a_tampered_one_is_refused(make_cfg, tmp_path, monkeypatch,
                                                                                   capsys):
    train(make_cfg(*TINY, root=tmp_path / "first"))
    last = tmp_path / "first" / "run" / "checkpoints" / "last.ckpt"
    # nothing in it (regime state, data position, callbacks' state, ...) needs unpickling
    assert torch.serialization.get_unsafe_globals_in_checkpoint(last) == []

    real, seen = torch.load, []
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k.get("weights_only")) or real(*a, **k))
    summary = train(make_cfg(*TINY, "trainer.max_epochs=2", f"ckpt_path={last}", root=tmp_path / "resumed"))
    assert summary["results"] and seen and all(w is True for w in seen), seen
    assert real(tmp_path / "resumed" / "run" / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1

    ran = tmp_path / "payload-ran"
    state = real(last, weights_only=True)
    state["loops"]["fit_loop"]["state_dict"]["payload"] = Payload(ran)
    tampered = tmp_path / "tampered.ckpt"
    torch.save(state, tampered)
    with pytest.raises(SystemExit) as exit_info:
        one_sentence_errors("kd", train, make_cfg(*TINY, f"ckpt_path={tampered}", root=tmp_path / "tampered"))
    assert exit_info.value.code == 2 and not ran.exists()
    err = capsys.readouterr().err.strip().splitlines()
    [line] = [ln for ln in err if ln.startswith("kd: error:")]
    assert line.startswith("kd: error: checkpoint ") and "mkdir" in line and "refuses to load it" in line
