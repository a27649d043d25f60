"""The recipe skeleton (teacher handling, optimizer, checkpoints, NaN guard) and the
Hinton / supervised recipes, checked against docs/spec.md section 1."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd import ConfigError
from kd.runs import train as run
from kd.data import IGNORE_INDEX
from kd.divergences import JSD, ForwardKL
from kd.models import MLPClassifier
from kd.recipe import DistillationRecipe, Needs
from recipes.hinton import Hinton
from recipes.supervised import Supervised


class Fixed(nn.Module):
    """Returns the same logits (a trainable parameter) for every example."""

    def __init__(self, logits):
        super().__init__()
        self.z = nn.Parameter(torch.tensor(logits, dtype=torch.float64))

    def forward(self, inputs):
        return self.z.expand(len(inputs), -1)


def batch(labels):
    labels = torch.tensor(labels)
    return {"inputs": torch.zeros(len(labels), 1), "labels": labels}


# ----------------------------------------------------------------------------- Hinton vectors


def test_hinton_loss_matches_section_1_vector():
    recipe = Hinton(divergence=ForwardKL(), student=Fixed([1.0, 2.0, 3.0]), teacher=Fixed([3.0, 2.0, 1.0]), lam=0.5, temperature=2.0)
    terms = recipe.compute_loss(batch([2]))
    assert terms["soft_kd"].item() == pytest.approx(1.280627, abs=1e-6)  # T^2 * KL
    assert terms["hard_ce"].item() == pytest.approx(0.407606, abs=1e-6)
    assert terms["loss"].item() == pytest.approx(0.844116, abs=1e-6)


def test_hinton_soft_gradient_matches_section_1_vector():
    student = Fixed([1.0, 2.0, 3.0])
    recipe = Hinton(divergence=ForwardKL(), student=student, teacher=Fixed([3.0, 2.0, 1.0]), lam=1.0, temperature=2.0)
    recipe.compute_loss(batch([2]))["loss"].backward()
    torch.testing.assert_close(student.z.grad, torch.tensor([-0.640313, 0.0, 0.640313], dtype=torch.float64),
                               atol=1e-6, rtol=0)


def test_hinton_is_zero_for_identical_models_and_lam_one():
    recipe = Hinton(divergence=ForwardKL(), student=Fixed([0.3, -1.0, 2.0]), teacher=Fixed([0.3, -1.0, 2.0]), lam=1.0, temperature=3.0)
    assert recipe.compute_loss(batch([0, 1]))["loss"].item() == pytest.approx(0.0, abs=1e-12)


def test_unlabelled_examples_feed_only_the_soft_term():
    recipe = Hinton(divergence=ForwardKL(), student=Fixed([1.0, 2.0, 3.0]), teacher=Fixed([3.0, 2.0, 1.0]), lam=0.5, temperature=2.0)
    terms = recipe.compute_loss(batch([2, IGNORE_INDEX, IGNORE_INDEX]))
    assert terms["hard_ce"].item() == pytest.approx(0.407606, abs=1e-6)  # mean over the one labelled row
    assert terms["soft_kd"].item() == pytest.approx(1.280627, abs=1e-6)  # mean over all three rows
    none = recipe.compute_loss(batch([IGNORE_INDEX]))
    assert none["hard_ce"].item() == 0.0 and torch.isfinite(none["loss"])


def test_any_divergence_replaces_the_kl():
    kw = dict(student=Fixed([1.0, 2.0, 3.0]), teacher=Fixed([3.0, 2.0, 1.0]), lam=1.0, temperature=2.0)
    fkl = Hinton(divergence=ForwardKL(), **kw).compute_loss(batch([0]))["loss"]
    assert Hinton(divergence=JSD(beta=0.0), **kw).compute_loss(batch([0]))["loss"].item() == pytest.approx(fkl.item())
    assert Hinton(divergence=JSD(beta=0.5), **kw).compute_loss(batch([0]))["loss"].item() != pytest.approx(fkl.item())


@pytest.mark.parametrize("kwargs,needle", [
    ({"lam": 1.5}, "recipe.lam must be in [0, 1] (got 1.5)"),
    ({"lam": -0.1}, "recipe.lam must be in [0, 1]"),
    ({"temperature": 0.0}, "recipe.temperature must be > 0 (got 0.0)"),
    ({"temperature": -2.0}, "recipe.temperature must be > 0"),
])
def test_bad_hinton_settings_fail_at_construction(kwargs, needle):
    with pytest.raises(ConfigError) as err:
        Hinton(divergence=ForwardKL(), student=Fixed([0.0, 0.0]), teacher=Fixed([0.0, 0.0]), **kwargs)
    assert needle in str(err.value)


def test_supervised_is_cross_entropy_on_gold_labels():
    recipe = Supervised(student=Fixed([1.0, 2.0, 3.0]))
    assert recipe.compute_loss(batch([2, IGNORE_INDEX]))["loss"].item() == pytest.approx(0.407606, abs=1e-6)


# ----------------------------------------------------------------------------- the skeleton


def test_a_recipe_that_needs_a_teacher_refuses_none():
    with pytest.raises(ConfigError, match="needs a teacher; choose one with teacher="):
        Hinton(divergence=ForwardKL(), student=Fixed([0.0, 0.0]), teacher=None)


def test_teacher_is_frozen_in_eval_mode_and_outside_the_optimizer():
    teacher = MLPClassifier(hidden=[8], dropout=0.5)
    recipe = Hinton(divergence=ForwardKL(), student=MLPClassifier(hidden=[4], dropout=0.5), teacher=teacher)
    recipe.train()
    assert recipe.student.training and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    optimizer = recipe.configure_optimizers()
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in recipe.student.parameters()}
    x = torch.randn(5, 64)
    torch.testing.assert_close(recipe.teacher_outputs({"inputs": x, "labels": torch.zeros(5)}).logits, teacher(x))
    recipe.compute_loss({"inputs": x, "labels": torch.zeros(5, dtype=torch.long)})["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_checkpoints_hold_the_student_not_the_teacher(tmp_path):
    teacher = MLPClassifier(hidden=[8])
    recipe = Hinton(divergence=ForwardKL(), student=MLPClassifier(hidden=[4]), teacher=teacher)
    trainer = L.Trainer(max_epochs=0, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(recipe)
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    state = torch.load(tmp_path / "x.ckpt", weights_only=False)["state_dict"]
    assert state and all(k.startswith("student.") for k in state)
    # loading into a fresh recipe keeps its teacher and restores the student (strict load)
    fresh = Hinton(divergence=ForwardKL(), student=MLPClassifier(hidden=[4]), teacher=MLPClassifier(hidden=[8]))
    before = {k: v.clone() for k, v in fresh.teacher.state_dict().items()}
    ckpt = torch.load(tmp_path / "x.ckpt", weights_only=False)
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"], strict=True)
    for k, v in fresh.student.state_dict().items():
        torch.testing.assert_close(v, recipe.student.state_dict()[k])
    for k, v in fresh.teacher.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_nan_loss_stops_training_with_a_clear_message(make_cfg):
    recipe = Hinton(divergence=ForwardKL(), student=Fixed([float("nan"), 0.0]), teacher=Fixed([0.0, 0.0]))
    with pytest.raises(FloatingPointError, match="not finite at step 0.*lower optimizer.lr"):
        recipe.training_step(batch([0]), 0)


class _NanInEpoch2(DistillationRecipe):
    """Cross-entropy on digits-like rows; the loss turns NaN at the first step of epoch 2."""

    needs = Needs(teacher=False)

    def compute_loss(self, batch):
        out = self.outputs(self.student, batch)
        loss = F.cross_entropy(out.logits, out.labels)
        if self.current_epoch == 1:
            loss = loss * float("nan")
        return {"loss": loss, "ce": loss}


class _Rows(L.LightningDataModule):
    def __init__(self, n=8, batch_size=4):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.rows = [{"inputs": x, "labels": y} for x, y in zip(torch.randn(n, 6, generator=g),
                                                                torch.randint(0, 3, (n,), generator=g))]
        self.batch_size = batch_size

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.rows, batch_size=self.batch_size, shuffle=False)


def test_nan_loss_in_a_later_epoch_stops_a_real_trainer_and_keeps_the_earlier_checkpoint(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(0)
    recipe = _NanInEpoch2(student=nn.Linear(6, 3))
    start = {k: v.clone() for k, v in recipe.student.state_dict().items()}
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    trainer = L.Trainer(max_epochs=3, callbacks=[checkpoints], logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    with pytest.raises(FloatingPointError, match=r"not finite at step 2 \(loss=nan, ce=nan\).*lower optimizer.lr"):
        trainer.fit(recipe, datamodule=_Rows())  # 2 steps per epoch: the first step of epoch 2 is step 2
    assert trainer.current_epoch == 1 and trainer.global_step == 2  # no optimizer step on the NaN loss
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.is_file() and (tmp_path / "checkpoints" / "epoch=0-step=2.ckpt").is_file()
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["epoch"] == 0 and ckpt["global_step"] == 2
    state = {k[len("student."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("student.")}
    assert state.keys() == start.keys() and all(torch.isfinite(v).all() for v in state.values())
    assert not all(torch.equal(state[k], start[k]) for k in start)  # epoch 1 trained
    # the student stopped where the checkpoint was written: the NaN never reached its weights
    for k, v in recipe.student.state_dict().items():
        assert torch.isfinite(v).all() and torch.equal(v, state[k])
    fresh = _NanInEpoch2(student=nn.Linear(6, 3))
    fresh.load_state_dict(ckpt["state_dict"])  # the kept checkpoint loads
    x = torch.randn(5, 6)
    torch.testing.assert_close(fresh.student(x), recipe.student(x))


def test_warmup_cosine_schedule():
    from kd.recipe import warmup_cosine

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, total_steps=10, warmup_ratio=0.2, min_lr_ratio=0.1)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)  # 2 warm-up steps
    assert lrs[2] == pytest.approx(1.0)  # cosine starts at the peak
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)  # reaches min at total_steps
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))


# ----------------------------------------------------------------------------- runs


@pytest.mark.parametrize("recipe", ["supervised", "hinton"])
def test_fast_dev_run_of_each_recipe(recipe, make_cfg, tmp_path):
    summary = run(make_cfg(f"recipe={recipe}", "debug=fast_dev_run"))
    out = tmp_path / "run"
    assert json.loads((out / "metrics.json").read_text())["results"] == summary["results"]
    assert (out / "student" / "model.safetensors").is_file()
    expected = {"student, from scratch"} if recipe == "supervised" else {
        "teacher", "student, from scratch", f"student, {recipe}"}
    assert set(summary["results"]) == expected


@pytest.fixture
def no_training(monkeypatch):
    """Reaching any training (the teacher's, a baseline's, the run's own) fails the test."""

    def trained(*args, **kwargs):
        raise AssertionError("trained")

    monkeypatch.setattr(L.Trainer, "fit", trained)


def _nothing_trained(root):
    """No teacher in the cache, no checkpoints, no metrics: the run stopped before any work."""
    assert not (root / "cache" / "teachers").exists(), "the teacher was trained before the error"
    assert not (root / "run" / "checkpoints").exists()
    assert not (root / "run" / "metrics.json").exists()


# No debug=fast_dev_run in these: the digits teacher has a fit section, so a run that got past the
# check would train and cache it (and write checkpoints); no_training makes reaching that fail at once.


def test_missing_teacher_checkpoint_fails_before_training(make_cfg, tmp_path, no_training):
    cfg = make_cfg(f"teacher.checkpoint={tmp_path}/nope.safetensors")
    with pytest.raises(ConfigError) as err:
        run(cfg)
    assert "nope.safetensors' does not exist" in str(err.value) and "set it to null" in str(err.value)
    _nothing_trained(tmp_path)


@pytest.mark.parametrize("override,needle", [
    ("recipe.lam=1.5", "recipe.lam must be in [0, 1]"),
    ("recipe.temperature=0", "recipe.temperature must be > 0"),
    ("data.labeled_fraction=0", "data.labeled_fraction must be in (0, 1]"),
    ("divergence.reduction=avg", "unknown reduction 'avg'"),
])
def test_bad_overrides_fail_before_any_training(override, needle, make_cfg, tmp_path, no_training):
    cfg = make_cfg(override)
    assert cfg.teacher.fit and not cfg.teacher.checkpoint and not cfg.trainer.fast_dev_run  # a real run would train
    with pytest.raises(Exception) as err:
        run(cfg)
    assert needle in str(err.value)
    assert not (tmp_path / "cache").exists(), "the teacher was trained before the error"
    _nothing_trained(tmp_path)


def test_bad_divergence_setting_fails_at_setup(make_cfg, tmp_path, no_training):
    with pytest.raises(Exception, match=r"JSD beta must be in \[0, 1\] \(got 1.5\)"):
        run(make_cfg("divergence=jsd", "divergence.beta=1.5"))
    _nothing_trained(tmp_path)


def test_resume_from_last_checkpoint_continues_training(make_cfg, tmp_path):
    tiny = ["trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
            "teacher.fit.max_epochs=1", "scratch_baseline=false"]
    run(make_cfg("trainer.max_epochs=1", *tiny, root=tmp_path / "a"))
    last = tmp_path / "a" / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["epoch"] == 0
    run(make_cfg("trainer.max_epochs=2", f"ckpt_path={last}", *tiny, root=tmp_path / "b"))
    resumed = torch.load(tmp_path / "b" / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["epoch"] == 1 and resumed["global_step"] == 4  # 2 steps before + 2 after resuming
    with pytest.raises(ConfigError, match="ckpt_path '.*nope.ckpt' does not exist"):
        run(make_cfg(f"ckpt_path={tmp_path}/nope.ckpt", *tiny, root=tmp_path / "c"))
