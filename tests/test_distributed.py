"""Data parallel training that changes nothing: 2 CPU processes (gloo, ``trainer=ddp``)
with a per-process batch of 4 end where one process with a batch of 8 ends, for an offline
and an on-policy recipe. The token counts of the two halves differ, so averaging the ranks'
own means (what DDP alone does) would not match; plain SGD makes the weights follow the
gradients' direction and size exactly (Adam would hide a wrong scale)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import SMALL_TASK

# a few SGD steps, no validation; the test split's first batch only
STEPS = ["trainer.enable_progress_bar=false", "logger=none", "scratch_baseline=false", "trainer.max_steps=3",
         "trainer.limit_val_batches=0", "trainer.limit_test_batches=1", "threads=1", "optimizer._target_=torch.optim.SGD",
         "optimizer.lr=1.0", "~optimizer.weight_decay"]
#: float rounding of sums taken in another order, over 3 steps
TOLERANCE = 1e-5


def _kd(root: Path, name: str, *args: str) -> Path:
    out = root / name
    env = {**os.environ, "KD_CACHE_DIR": str(root / "cache"), "PYTHONUNBUFFERED": "1"}
    # python -m kd.cli: Lightning relaunches that same command in the second process
    cmd = [sys.executable, "-m", "kd.cli", *SMALL_TASK, *STEPS, *args, f"hydra.run.dir={out}"]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _max_difference(a: Path, b: Path) -> float:
    one, two = load_file(a / "student" / "model.safetensors"), load_file(b / "student" / "model.safetensors")
    assert one.keys() == two.keys()
    return max(float((one[k] - two[k]).abs().max()) for k in one)


@pytest.mark.parametrize("recipe,per_process", [
    # offline: (1 - alpha) NLL + alpha * CE to the teacher on the dataset's answers; each
    # process accumulates 2 micro-batches of 2, so the global window is 2 x 2 x 2 = 8
    (["recipe=word_kd"], ["data.batch_size=2", "trainer.accumulate_grad_batches=2"]),
    # on-policy with greedy samples (each rank samples its own prompts)
    (["recipe=gkd", "regime.lmbda=1", "regime.sampling.temperature=0"], ["data.batch_size=4"]),
], ids=["offline_word_kd_accumulating", "on_policy_gkd"])
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, recipe, per_process):
    single = _kd(tmp_path, "single", *recipe, "data.batch_size=8")
    ddp = _kd(tmp_path, "ddp", *recipe, *per_process, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
    assert (ddp / "train_ddp_process_1.log").is_file()  # a second process did train
    assert _max_difference(single, ddp) < TOLERANCE
    # rank 0 alone writes the outputs; the test metrics merge both ranks' shares of the split
    metrics = json.loads((ddp / "metrics.json").read_text())
    assert "test/loss" in metrics["results"][f"student, {recipe[0].split('=')[1]}"]
    reference = json.loads((single / "metrics.json").read_text())["results"]
    for row, values in reference.items():
        for key, value in values.items():
            if key.startswith("test/"):
                assert metrics["results"][row][key] == pytest.approx(value, rel=1e-4, abs=1e-4), (row, key)


class _Recorder:
    """A regime that records when it prepares, and a strategy whose barrier records when
    it is passed: the order a rank's on_fit_start takes."""

    name = "offline"

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def prepare(self, teacher, data) -> None:
        self.log.append("prepare")

    def barrier(self, name=None) -> None:
        self.log.append("barrier")


@pytest.mark.parametrize("local_rank,order", [(0, ["prepare", "barrier"]), (1, ["barrier", "prepare"])])
def test_the_first_rank_builds_regime_caches_while_the_others_wait(local_rank, order):
    from types import SimpleNamespace

    from torch import nn

    from recipes.supervised import Supervised

    log: list[str] = []
    recorder = _Recorder(log)
    recipe = Supervised(student=nn.Linear(2, 2), regime=recorder)
    recipe._trainer = SimpleNamespace(world_size=2, local_rank=local_rank, strategy=recorder, datamodule=None)
    recipe.on_fit_start()
    assert log == order


def test_a_sweep_job_on_several_processes_is_refused_in_one_sentence(tmp_path):
    env = {**os.environ, "KD_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "kd.cli", "-m", "trainer=ddp", "trainer.accelerator=cpu", "seed=0,1",
                           "logger=none"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2  # each job reported in one sentence, the sweep's exit code says it failed
    said = done.stdout + done.stderr
    assert said.count("cannot be a job of kd -m with this launcher") >= 2 and "Traceback" not in said
