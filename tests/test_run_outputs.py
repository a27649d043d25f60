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

    monkeypatch.setattr(kd.runs.os, "replace", spy)
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
