"""A run's output directory: metrics.json written whole, a finished run never silently
mixed with a new one, and what a non-finite loss leaves behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from kd import ConfigError
from kd.runs import train
from tests.test_quickstart import TINY, _kd

QUICK = [*TINY, "scratch_baseline=false"]


def test_metrics_json_is_renamed_into_place_whole(make_cfg, tmp_path, monkeypatch):
    import kd.runs

    seen = []
    real_replace = os.replace

    def spy(src, dst, **kwargs):
        if Path(dst).name == "metrics.json":
            seen.append((Path(dst).name, json.loads(Path(src).read_text())))  # complete before it is in place
            assert not Path(dst).exists()
        real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", spy)
    summary = train(make_cfg(*QUICK))
    assert [name for name, _ in seen] == ["metrics.json"] and seen[0][1] == summary
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")) == []


def _files(d: Path) -> dict[str, int]:
    return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()}


def test_a_run_dir_holding_a_finished_run_is_refused_unless_overwrite(tmp_path):
    run_dir = tmp_path / "mine"
    quiet = ["trainer.enable_progress_bar=false", "logger=none", *QUICK]
    assert _kd(f"hydra.run.dir={run_dir}", *quiet, cwd=tmp_path).returncode == 0
    before = _files(run_dir)
    teachers = sorted((tmp_path / "cache" / "teachers").iterdir())

    # another teacher would have to train first: the refusal comes before it
    again = _kd(f"hydra.run.dir={run_dir}", "teacher.fit.max_epochs=2", *quiet, cwd=tmp_path)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert again.stderr.strip().splitlines()[-1] == (
        f"kd: error: the output directory {run_dir} already holds a finished run (its metrics.json); choose another "
        "hydra.run.dir, or pass overwrite=true to replace that run's checkpoints, student and metrics.json")
    assert sorted((tmp_path / "cache" / "teachers").iterdir()) == teachers
    after = _files(run_dir)
    assert {k: v for k, v in after.items() if not k.startswith(".hydra") and not k.endswith(".log")} == {
        k: v for k, v in before.items() if not k.startswith(".hydra") and not k.endswith(".log")}

    # asked for: the old run's checkpoints go, the new run's take their place
    stale = run_dir / "checkpoints" / "epoch007.ckpt"
    stale.write_bytes(b"an older run's checkpoint")
    done = _kd(f"hydra.run.dir={run_dir}", "overwrite=true", "seed=1", *quiet, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not stale.exists()
    assert json.loads((run_dir / "metrics.json").read_text())["seed"] == 1


def test_resuming_a_finished_run_from_its_own_checkpoint_is_not_refused(make_cfg, tmp_path):
    train(make_cfg(*QUICK, "overwrite=false"))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    summary = train(make_cfg(*QUICK, "overwrite=false", "trainer.max_epochs=2", f"ckpt_path={last}"))
    assert summary["results"]["student, hinton"]["test/acc"] >= 0
    with pytest.raises(ConfigError, match="already holds a finished run"):
        train(make_cfg(*QUICK, "overwrite=false"))


# ----------------------------------------------------------------------------- a non-finite loss


def _explode_after_the_first_step(optimizer, total_steps):
    """The configured lr for step 0, then 1e30 times it: the weights blow up, the loss follows."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 if step < 1 else 1e30)


def _diverging(make_cfg, *overrides):
    cfg = make_cfg("recipe=supervised", "trainer.max_epochs=4", "trainer.limit_train_batches=1",
                   "trainer.limit_val_batches=2", *overrides)
    with pytest.raises(ConfigError) as stopped:
        train(cfg)
    return str(stopped.value), Path(cfg.paths.output_dir)


def _student(state):
    return {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}


def test_a_diverging_run_exports_the_last_finite_checkpoint_and_advice_fitting_its_precision(make_cfg):
    from kd.models import read_state_dict

    cfg_scheduler = {"_target_": f"{__name__}._explode_after_the_first_step", "_partial_": True}
    sentence, run_dir = _diverging(make_cfg, f"+scheduler={json.dumps(cfg_scheduler)}".replace('"', ""))
    assert sentence.startswith("the training loss is not finite at step 2")
    assert "lower optimizer.lr or set trainer.gradient_clip_val" in sentence
    assert "precision=" not in sentence  # the run is in 32-true already
    epoch0 = run_dir / "checkpoints" / "epoch000.ckpt"
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["epoch"] == 1 and max(v.abs().max() for v in _student(last["state_dict"]).values()) > 1e20
    assert sentence.endswith(f"the student of epoch000.ckpt is exported to {run_dir / 'student'}")
    exported = read_state_dict(run_dir / "student")
    saved = _student(torch.load(epoch0, weights_only=False)["state_dict"])
    assert exported.keys() == saved.keys()
    assert all(torch.isfinite(v).all() and torch.equal(v, saved[k]) for k, v in exported.items())
    assert json.loads((run_dir / "metrics.json").read_text())["student_from"] == str(epoch0)


def test_a_run_diverging_before_any_finite_checkpoint_exports_no_huge_weights(make_cfg):
    sentence, run_dir = _diverging(make_cfg, "optimizer.lr=1e30")  # step 0's update already makes them 1e30
    assert sentence.startswith("the training loss is not finite at step 1")
    assert sentence.endswith("no checkpoint with finite weights and validation loss was written before, so no "
                             "student is exported")
    assert not (run_dir / "student").exists()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "not finite" in metrics["error"] and metrics["student_from"] is None


@pytest.mark.parametrize("precision,advised,not_advised", [
    ("32-true", None, "precision="),
    ("16-mixed", "precision=bf16-mixed", None),
    ("bf16-mixed", "rarely helps", "or train in precision=32-true"),
    ("bf16-true", "precision=bf16-mixed", "32-true"),
])
def test_the_advice_after_a_non_finite_loss_fits_the_precision(precision, advised, not_advised):
    from kd.recipe import non_finite_advice

    advice = non_finite_advice(precision)
    assert advice.startswith("lower optimizer.lr")
    assert advised is None or advised in advice
    assert not_advised is None or not_advised not in advice
