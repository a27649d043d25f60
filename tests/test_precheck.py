"""Values that cannot work are refused through the real entry point (``kd``) before any
teacher, SFT or baseline trains: exit code 2, one ``kd: error:`` line, no traceback, no cache
entry and no checkpoint. Problems found only while reading data or writing outputs are one
sentence too (non-UTF-8 files, chat messages as strings, an offline hub name, a full disk)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

TINY = ["logger=none", "trainer.enable_progress_bar=false", "trainer.max_epochs=1", "teacher.fit.max_epochs=1",
        "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]


def run_kd(tmp_path: Path, monkeypatch, capsys, *overrides: str) -> tuple[int, str]:
    """``kd <overrides>`` in this process (kd.cli.main with sys.argv set), writing into
    ``tmp_path``; returns the exit code and stderr."""
    from kd.cli import main

    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", ["kd", f"hydra.run.dir={tmp_path / 'run'}", *TINY, *overrides])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


def refused(tmp_path: Path, monkeypatch, capsys, *overrides: str, kept: tuple = ()) -> str:
    code, err = run_kd(tmp_path, monkeypatch, capsys, *overrides)
    lines = [line for line in err.strip().splitlines() if line.startswith("kd: error: ")]
    assert code == 2, err[-2000:]
    assert "Traceback" not in err and len(lines) == 1, err[-2000:]
    cache = tmp_path / "cache"
    built = [p for p in cache.rglob("*") if p.is_dir() and p.parent.parent == cache and p not in kept] \
        if cache.exists() else []
    assert not built, built  # no teacher, SFT or baseline was trained
    assert not list((tmp_path / "run").rglob("*.ckpt"))
    return lines[0]


@pytest.fixture
def files(tmp_path: Path) -> Path:
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "notes.txt").write_text("not weights\n")
    (folder / "empty").mkdir()
    (folder / "latin1.jsonl").write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "x"}\n')
    (folder / "strings.jsonl").write_text(json.dumps({"messages": ["hi", "hello"]}) + "\n")
    return folder


@pytest.mark.parametrize("overrides,sentence", [
    (["optimizer.lr=-1"], "optimizer.lr must be a number >= 0 (got -1)"),
    (["optimizer.lr=abc"], "optimizer.lr must be a number >= 0 (got 'abc')"),
    (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay must be a number >= 0"),
    (["+optimizer.betas=[0.9,1.5]"], "optimizer.betas must be two numbers in [0, 1)"),
    (["teacher.fit.optimizer.lr=-3"], "teacher.fit.optimizer.lr must be a number >= 0"),
    (["threads=-2"], "threads must be a positive integer or null (got -2)"),
    (["recipe.lam=high"], "recipe.lam must be a number (got 'high'); e.g. recipe.lam=0.5"),
    (["trainer.max_epochs=-5"], "trainer.max_epochs must be a whole number >= 0, or -1 for no limit (got -5)"),
    (["trainer.precision=bogus"], "trainer.precision=bogus is not a precision Lightning knows"),
    (["data=task", "data.eval_batch_size=0"], "data.eval_batch_size must be a whole number >= 1 (got 0)"),
])
def test_values_are_refused_before_anything_trains(overrides, sentence, tmp_path, monkeypatch, capsys):
    assert sentence in refused(tmp_path, monkeypatch, capsys, *overrides)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there")
def test_a_gpu_accelerator_without_a_gpu_is_refused(tmp_path, monkeypatch, capsys):
    line = refused(tmp_path, monkeypatch, capsys, "trainer.accelerator=gpu")
    assert "trainer.accelerator=gpu but this machine has no such device" in line


@pytest.mark.parametrize("what", ["notes.txt", "empty"])
def test_student_init_that_is_not_weights_is_refused_before_the_teacher_trains(what, files, tmp_path, monkeypatch,
                                                                               capsys):
    line = refused(tmp_path, monkeypatch, capsys, f"student_init={files / what}")
    assert line.startswith("kd: error: student_init: ") and str(files / what) in line


@pytest.mark.parametrize("what", ["notes.txt", "empty"])
def test_student_name_or_path_that_is_a_file_or_an_empty_directory(what, files, tmp_path, monkeypatch, capsys):
    line = refused(tmp_path, monkeypatch, capsys, "data=task", "student=hf", f"student.name_or_path={files / what}")
    assert f"student.name_or_path '{files / what}' is " + ("a file" if what == "notes.txt" else "an empty directory") \
        in line


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_cache_and_output_directories_are_refused(tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        line = refused(tmp_path, monkeypatch, capsys, f"paths.cache_dir={locked / 'cache'}")
        assert f"the cache directory {locked / 'cache'} is not writable and cannot be created ({locked} is" in line
        line = refused(tmp_path, monkeypatch, capsys, f"paths.output_dir={locked / 'out'}")
        assert f"the output directory {locked / 'out'} cannot be written" in line
    finally:
        locked.chmod(0o700)


def test_cache_and_output_directories_under_a_file_are_refused(files, tmp_path, monkeypatch, capsys):
    blocked = files / "notes.txt"
    line = refused(tmp_path, monkeypatch, capsys, f"paths.cache_dir={blocked / 'cache'}")
    assert f"the cache directory {blocked / 'cache'} is not writable and cannot be created ({blocked} is not a " \
           "writable directory)" in line
    assert "paths.cache_dir=<a writable directory>" in line
    line = refused(tmp_path, monkeypatch, capsys, f"paths.output_dir={blocked / 'out'}")
    assert f"the output directory {blocked / 'out'} cannot be written" in line


@pytest.mark.parametrize("multirun", [False, True])
def test_a_run_or_sweep_directory_that_cannot_be_created_is_one_sentence(multirun, files, tmp_path, monkeypatch, capsys):
    """Hydra makes the run's directory before kd runs; under a file it used to end in
    Hydra's error block (exit 1). The sweep's directory likewise."""
    blocked = files / "notes.txt"
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    args = ["-m", "seed=0,1"] if multirun else []
    line = refused(tmp_path, monkeypatch, capsys, *args, f"{key}={blocked / 'out'}")
    assert f"directory {blocked / 'out'} cannot be created ({blocked} is not a writable directory)" in line
    assert f"set {key}=<a writable directory>" in line
    assert blocked.read_text() == "not weights\n"


def test_a_read_only_cache_names_the_missing_entry_and_serves_a_complete_one(tmp_path, monkeypatch, capsys):
    """A shared cache that the run cannot write: refused when it lacks the teacher (named),
    used as it is when it holds every entry the run needs."""
    from kd import checks, subruns

    def unwritable(rule):  # root writes anywhere: the checks' test of a directory says what this one wants
        for module in (checks, subruns):
            monkeypatch.setattr(module, "writable", rule)

    cache = tmp_path / "cache"
    cache.mkdir()
    unwritable(lambda path: path if path == cache else None)
    line = refused(tmp_path, monkeypatch, capsys, "scratch_baseline=false")
    assert f"the cache directory {cache} is not writable and lacks the teacher {cache / 'teachers'}/digits_cnn-" in line
    unwritable(lambda path: None)
    code, err = run_kd(tmp_path, monkeypatch, capsys, "scratch_baseline=false")  # a writable run fills the cache
    assert code == 0, err[-2000:]
    unwritable(lambda path: path if path == cache else None)
    (tmp_path / "run").rename(tmp_path / "first")
    code, err = run_kd(tmp_path, monkeypatch, capsys, "scratch_baseline=false")
    assert code == 0, err[-2000:]
    shutil.rmtree(tmp_path / "run")
    teachers = tuple((cache / "teachers").iterdir())
    line = refused(tmp_path, monkeypatch, capsys, "scratch_baseline=true", kept=teachers)  # the baseline is missing
    assert f"lacks the baseline {cache / 'baselines'}/digits_mlp-seed0-" in line


@pytest.mark.parametrize("name,sentence", [
    ("latin1.jsonl", "is not UTF-8 text (byte 48 cannot be decoded); re-save it as UTF-8"),
    ("strings.jsonl", "'messages' must be a list of"),
])
def test_data_files_that_cannot_be_read_are_one_sentence(name, sentence, files, tmp_path, monkeypatch, capsys):
    line = refused(tmp_path, monkeypatch, capsys, "data=jsonl", f"data.source.train={files / name}")
    assert sentence in line and name in line


def test_an_offline_hub_name_is_one_sentence(tmp_path, monkeypatch, capsys):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = refused(tmp_path, monkeypatch, capsys, "data=hf", "data.source.path=nobody-kd/no-such-dataset")
    assert "data.source.path 'nobody-kd/no-such-dataset' is not a local directory" in line
    assert "needs the network" in line


def test_a_full_disk_names_the_path_and_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    import kd.runs

    def full(student, directory, tokenizer=None):
        (Path(directory) / "model.safetensors").write_bytes(b"half")  # a partial file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(kd.runs, "save_student", full)
    code, err = run_kd(tmp_path, monkeypatch, capsys, "scratch_baseline=false")
    lines = [line for line in err.strip().splitlines() if line.startswith("kd: error: ")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err[-2000:]
    run = tmp_path / "run"
    assert f"no space left on the device while writing {run / 'student'}" in lines[0]
    assert not (run / "student").exists() and not list(run.glob(".student.tmp-*"))


def test_a_full_disk_while_writing_metrics_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    from kd.cache import atomic_write_text

    import os

    target = tmp_path / "metrics.json"

    def full(fd):  # the bytes went to the page cache, the disk then refused them
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    from kd import ConfigError

    with pytest.raises(ConfigError, match=f"no space left on the device while writing {target}"):
        atomic_write_text(target, "{}" * 10)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_checkpointing_names_the_checkpoint_and_leaves_no_partial_file(tmp_path, monkeypatch):
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from kd import ConfigError
    from kd.resume import AtomicCheckpointIO

    def full(self, checkpoint, path, storage_options=None):
        Path(path).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", full)
    target = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match=f"no space left on the device while writing {target}"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, target)
    assert list((tmp_path / "checkpoints").iterdir()) == []
