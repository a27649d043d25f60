"""Resume that changes nothing (kd/resume.py): a run stopped by SIGTERM mid-epoch, or
killed (it then resumes from the last epoch's checkpoint), and resumed with ckpt_path ends
with the weights and test metrics of the run that was never stopped; and nothing a dying
run writes is half-written."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from safetensors.torch import load_file

from kd.cache import atomic_directory
from kd.resume import AtomicCheckpointIO, step_seed
from kd.runs import train
from tests.conftest import SMALL_TASK

#: 2 epochs of 5 batches; a stop after global step 7 is mid-way through the second epoch
COMMON = [*SMALL_TASK, "trainer.max_epochs=2", "trainer.limit_train_batches=5", "trainer.limit_val_batches=0",
          "trainer.limit_test_batches=1", "scratch_baseline=false", "logger=csv", "trainer.log_every_n_steps=1"]
STOP_AFTER = 7


class SigtermAfter(L.Callback):
    """Sends this process SIGTERM when ``step`` optimizer steps are done (a pre-emption)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "student" / "model.safetensors")


RECIPES = {
    # offline word-level KD with dropout in the student: randomness in every step
    "offline_word_kd": ["recipe=word_kd", "+student.dropout=0.1"],
    # GKD with a mixed regime: a coin per batch, on-policy batches sampled at T = 1
    "mixed_on_policy_gkd": ["recipe=gkd", "regime.lmbda=0.5", "regime.sampling.max_new_tokens=4"],
    # speculative KD: the student's samples at T = 1 with the teacher's replacements
    "speculative_gkd": ["recipe=gkd", "regime=speculative", "regime.top_k=3", "regime.sampling.max_new_tokens=4"],
    # DistiLLM's adaptive regime: a draw per batch, fresh student batches, replays from a buffer (one batch)
    "adaptive_gkd": ["recipe=gkd", "regime=adaptive", "regime.init_prob=0.7", "regime.capacity=16",
                     "regime.replay_ratio=constant", "regime.sampling.max_new_tokens=4"],
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_a_run_stopped_and_resumed_ends_as_the_uninterrupted_run(make_cfg, tmp_path, name):
    overrides = [*COMMON, *RECIPES[name]]
    whole = train(make_cfg(*overrides, root=tmp_path / "whole"))
    stopped = tmp_path / "stopped" / "run"
    with pytest.raises(SystemExit):  # Lightning's SIGTERM path: finish the batch, checkpoint, exit
        train(make_cfg(*overrides, "+callbacks.stop._target_=tests.test_resume.SigtermAfter",
                       f"+callbacks.stop.step={STOP_AFTER}", root=tmp_path / "stopped"))
    interrupted = stopped / "checkpoints" / "interrupted.ckpt"
    state = torch.load(interrupted, weights_only=False)
    assert state["global_step"] == STOP_AFTER and state["epoch"] == 1  # mid-way through the second epoch
    assert not (stopped / "student").exists() and not (stopped / "metrics.json").exists()

    # SIGTERM: resume mid-epoch; a kill anywhere in epoch 2: resume from epoch 1's last.ckpt
    for source, root in ((interrupted, "resumed_mid_epoch"), (stopped / "checkpoints" / "last.ckpt", "resumed_epoch")):
        resumed = train(make_cfg(*overrides, f"ckpt_path={source}", root=tmp_path / root))
        done = torch.load(tmp_path / root / "run" / "checkpoints" / "last.ckpt", weights_only=False)
        assert done["global_step"] == 10
        a, b = _weights(tmp_path / "whole" / "run"), _weights(tmp_path / root / "run")
        assert all(torch.equal(a[k], b[k]) for k in a), f"{root}: weights differ"
        label = next(k for k in whole["results"] if k.startswith("student"))
        assert resumed["results"][label] == whole["results"][label]  # every test metric, exactly
        if name == "mixed_on_policy_gkd":
            flips = [torch.load(tmp_path / r / "run" / "checkpoints" / "last.ckpt", weights_only=False)["kd_regime"]
                     for r in ("whole", root)]
            assert flips[0]["on_policy_batches"] == flips[1]["on_policy_batches"] > 0
            assert 0 < flips[0]["on_policy_batches"] < 10  # both kinds of batch were trained on
        if name in ("speculative_gkd", "adaptive_gkd"):
            states = [torch.load(tmp_path / r / "run" / "checkpoints" / "last.ckpt", weights_only=False)["kd_regime"]
                      for r in ("whole", root)]
            assert states[0].keys() == states[1].keys()
            for key in states[0]:  # the same counts, probability, buffer rows and generator state
                same = torch.equal if key == "rng" else (lambda a, b: a == b)
                assert same(states[0][key], states[1][key]), key
            if name == "speculative_gkd":
                assert 0 < states[0]["replaced_tokens"] < states[0]["response_tokens"]  # both kinds of token
            else:
                assert min(states[0]["counts"].values()) > 0  # fresh, replayed and dataset batches all trained on


def test_step_seeds_depend_on_every_part_and_nothing_else():
    base = step_seed(0, 1, 2, 0)
    assert base == step_seed(0, 1, 2, 0)
    assert len({base, step_seed(1, 1, 2, 0), step_seed(0, 2, 2, 0), step_seed(0, 1, 3, 0), step_seed(0, 1, 2, 1)}) == 5
    assert 0 <= base < 2**63


def test_a_checkpoint_write_that_dies_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def dies(self, checkpoint, path, storage_options=None):
        Path(path).write_bytes(b"half")
        raise KeyboardInterrupt  # the process is stopped mid-write

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", dies)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no partial file left behind


def test_an_export_that_dies_leaves_no_student_directory(tmp_path):
    target = tmp_path / "student"
    with pytest.raises(RuntimeError), atomic_directory(target) as partial:
        (partial / "config.json").write_text("{}")
        raise RuntimeError("killed while writing the weights")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(target) as partial:
        (partial / "config.json").write_text("{}")
    assert [p.name for p in target.iterdir()] == ["config.json"]
