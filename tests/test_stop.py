"""A stopped ``kd`` never exits with 0 (kd/resume.py, kd/cli.py): SIGTERM (a scheduler's
pre-emption) and Ctrl-C, sent to real ``kd`` processes while a fit runs (the run's own, a
cached teacher's, the scratch baseline's, a sweep job's), exit with 143 and 130 after one
sentence naming the checkpoint and the ``ckpt_path=`` command that resumes; that command
finishes the run. A resume with other settings, of another architecture or of a file that
is not a checkpoint is refused in one sentence before anything trains."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from kd import ConfigError
from kd.resume import RECORD
from kd.runs import train

ROOT = Path(__file__).resolve().parent.parent

#: the quickstart at toy size: 4 epochs of 3 batches (teacher and baseline: the same trainer limits)
TINY = ["trainer.max_epochs=4", "teacher.fit.max_epochs=2", "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=2", "trainer.limit_test_batches=2", "trainer.enable_progress_bar=false",
        "logger=none"]


class Pace(L.Callback):
    """Slows the fits of one kind of run (``run``: the run itself or a sweep job; ``teachers``,
    ``baselines``: cached sub-runs) from ``step`` optimizer steps on: ``marker`` is touched and
    every batch then takes ``delay`` seconds more, so a test can signal the process while that
    fit runs."""

    def __init__(self, marker: str, where: str = "run", step: int = 2, delay: float = 0.3) -> None:
        self.marker, self.where, self.step, self.delay = Path(marker), where, step, delay

    def on_train_batch_end(self, trainer, *args) -> None:
        kind = Path(trainer.default_root_dir).parent.parent.name
        kind = kind if kind in ("teachers", "baselines", "sft") else "run"
        if kind == self.where and trainer.global_step >= self.step:
            self.marker.touch()
            time.sleep(self.delay)


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "KD_CACHE_DIR": str(tmp / "cache"), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _paced(tmp: Path, where: str) -> list[str]:
    return [f"+callbacks.pace._target_={__name__}.Pace", f"+callbacks.pace.marker={tmp / 'fitting'}",
            f"+callbacks.pace.where={where}"]


def _stop(args: list[str], tmp: Path, signum: int = signal.SIGTERM, timeout: float = 300) -> tuple[int, str]:
    """Start ``kd <args>`` in ``tmp``, send ``signum`` once the paced fit runs, and return
    its exit code and stderr; the process is killed on every other way out."""
    marker = tmp / "fitting"
    marker.unlink(missing_ok=True)
    with open(tmp / "stderr.txt", "w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "kd.cli", *args], cwd=tmp, env=_env(tmp),
                                stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + timeout
            while not marker.exists():
                assert proc.poll() is None, f"kd ended before the fit ran: {(tmp / 'stderr.txt').read_text()[-3000:]}"
                assert time.monotonic() < deadline, "the fit never started"
                time.sleep(0.05)
            proc.send_signal(signum)
            code = proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err.seek(0)
        return code, err.read()


def _kd(command: list[str], tmp: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kd.cli", *command], cwd=tmp, env=_env(tmp), capture_output=True,
                          text=True, timeout=timeout)


def _last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def _resume_command(sentence: str) -> tuple[Path, list[str]]:
    """The checkpoint a stop sentence names and the arguments of the ``kd`` command it gives."""
    checkpoint = Path(sentence.split(" resume it from ", 1)[1].split(" with: ", 1)[0])
    command = shlex.split(sentence.split(" with: ", 1)[1])
    assert command[0] == "kd" and command[-1] == f"ckpt_path={checkpoint}"
    return checkpoint, command[1:]


def test_sigterm_mid_fit_exits_143_naming_the_checkpoint_whose_command_resumes(tmp_path):
    code, stderr = _stop([*TINY, *_paced(tmp_path, "run")], tmp_path)
    assert code == 143, stderr[-3000:]
    assert "Traceback" not in stderr
    sentence = _last_line(stderr)
    assert sentence.startswith("kd: stopped by SIGTERM; resume it from ")
    checkpoint, command = _resume_command(sentence)
    assert checkpoint.name == "interrupted.ckpt" and checkpoint.is_file()
    assert not (checkpoint.parent.parent / "metrics.json").exists()
    done = _kd(command, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = [p for p in (tmp_path / "outputs" / "runs").glob("*/*") if (p / "metrics.json").is_file()]
    assert len(resumed) == 1 and resumed[0] != checkpoint.parent.parent


def test_ctrl_c_mid_fit_exits_130_naming_the_checkpoint_of_the_finished_batch(tmp_path):
    code, stderr = _stop([*TINY, *_paced(tmp_path, "run")], tmp_path, signal.SIGINT)
    assert code == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    sentence = _last_line(stderr)
    assert sentence.startswith("kd: stopped by SIGINT; resume it from ")
    checkpoint, _ = _resume_command(sentence)
    assert checkpoint.name == "interrupted.ckpt" and checkpoint.is_file()
    assert 2 <= torch.load(checkpoint, weights_only=True)["global_step"] < 12  # mid-fit


def test_sigterm_in_a_cached_teachers_fit_exits_143_and_publishes_no_teacher(tmp_path):
    args = [*TINY, "scratch_baseline=false", *_paced(tmp_path, "teachers")]
    code, stderr = _stop(args, tmp_path)
    assert code == 143, stderr[-3000:]
    assert "Traceback" not in stderr
    sentence = _last_line(stderr)
    assert sentence.startswith("kd: stopped by SIGTERM before the run wrote a checkpoint")
    again = shlex.split(sentence.split("start it again with: ", 1)[1])
    assert again == ["kd", *args]
    assert not [p for p in (tmp_path / "cache" / "teachers").iterdir()]  # no teacher entry, not even a partial one
    assert not list((tmp_path / "outputs" / "runs").glob("*/*/checkpoints"))
    done = _kd(again[1:], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]


def test_sigterm_in_the_scratch_baseline_exits_143_and_the_named_checkpoint_finishes_the_run(tmp_path):
    code, stderr = _stop([*TINY, *_paced(tmp_path, "baselines")], tmp_path)
    assert code == 143, stderr[-3000:]
    assert "Traceback" not in stderr
    checkpoint, command = _resume_command(_last_line(stderr))
    assert checkpoint.name == "last.ckpt" and checkpoint.is_file()  # the run's own fit had finished
    assert not (checkpoint.parent.parent / "metrics.json").exists()
    done = _kd(command, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [json.loads((p / "metrics.json").read_text()) for p in (tmp_path / "outputs" / "runs").glob("*/*")
            if (p / "metrics.json").is_file()]
    assert len(runs) == 1 and {"student, from scratch", "student, hinton"} <= set(runs[0]["results"])


def test_sigterm_in_a_sweep_job_stops_the_sweep_with_143(tmp_path):
    code, stderr = _stop(["-m", "seed=0,1", *TINY, "scratch_baseline=false", *_paced(tmp_path, "run")], tmp_path)
    assert code == 143, stderr[-3000:]
    assert "Traceback" not in stderr
    sentence = _last_line(stderr)
    assert sentence.startswith("kd: sweep job 0 (seed=0 ") and "stopped by SIGTERM" in sentence
    assert "its later jobs do not run" in sentence
    checkpoint, command = _resume_command(sentence)
    assert checkpoint.is_file() and "seed=0" in command and "-m" not in command
    sweep = checkpoint.parent.parent.parent
    assert not (sweep / "1").exists() and not list(sweep.glob("*/metrics.json"))


# ----------------------------------------------------------------------------- what a resume may change

BASE = [*TINY, "trainer.max_epochs=1", "scratch_baseline=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished toy run's last.ckpt (1 epoch of 3 batches)."""
    from tests.conftest import compose_cfg

    root = tmp_path_factory.mktemp("trained")
    train(compose_cfg(BASE, root))
    return root / "run" / "checkpoints" / "last.ckpt"


def _resume(make_cfg, tmp_path, checkpoint, *overrides):
    """Resume ``checkpoint`` with ``overrides`` in a fresh output and cache directory."""
    base = [o for o in BASE if not ("recipe=supervised" in overrides and o.startswith("teacher."))]  # no teacher
    return train(make_cfg(*base, *overrides, f"ckpt_path={checkpoint}", root=tmp_path / "resumed"))


def _refused(make_cfg, tmp_path, checkpoint, *overrides) -> str:
    with pytest.raises(ConfigError) as refused:
        _resume(make_cfg, tmp_path, checkpoint, *overrides)
    assert not (tmp_path / "resumed" / "cache" / "teachers").exists(), "a teacher trained before the refusal"
    assert not (tmp_path / "resumed" / "run" / "checkpoints").exists()
    return str(refused.value)


@pytest.mark.parametrize("override,named", [
    ("recipe.lam=0.9", "recipe.lam=0.9 (trained with 0.5)"),
    ("seed=1", "seed=1 (trained with 0)"),
    ("recipe=supervised", "recipe._target_=recipes.supervised.Supervised (trained with recipes.hinton.Hinton)"),
])
def test_a_resume_with_other_settings_is_refused_naming_them(make_cfg, tmp_path, trained, override, named):
    message = _refused(make_cfg, tmp_path, trained, override)
    assert message.startswith(f"ckpt_path {trained} was trained with other settings than this run's: ")
    assert named in message and "\n" not in message


def test_a_checkpoint_of_another_architecture_is_refused(make_cfg, tmp_path, trained):
    state = torch.load(trained, weights_only=True)
    del state[RECORD]  # no settings to compare (an older kd, another program): the weights still must fit
    foreign = tmp_path / "foreign.ckpt"
    torch.save(state, foreign)
    message = _refused(make_cfg, tmp_path, foreign, "student.hidden=[48]")
    assert message.startswith(f"ckpt_path {foreign} holds the weights of another architecture than this run's student")
    assert "student.net.1.weight has shape [32, 64] there, [48, 64] here" in message and "\n" not in message


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_file_that_is_not_a_whole_checkpoint_is_refused(make_cfg, tmp_path, trained, damage):
    data = trained.read_bytes()
    broken = tmp_path / f"{damage}.ckpt"
    broken.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(4096))
    message = _refused(make_cfg, tmp_path, broken)
    assert message.startswith(f"ckpt_path {broken} cannot be read as a checkpoint (it is truncated or not a checkpoint")
    assert "\n" not in message


def test_a_longer_resume_is_allowed_and_trains_on(make_cfg, tmp_path, trained):
    summary = _resume(make_cfg, tmp_path, trained, "trainer.max_epochs=2", "trainer.limit_val_batches=1",
                      "logger=csv")
    state = torch.load(tmp_path / "resumed" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["epoch"] == 1 and state["global_step"] == 6
    assert state[RECORD]["settings"] == torch.load(trained, weights_only=True)[RECORD]["settings"]
    assert summary["results"]["student, hinton"]["test/acc"] >= 0


def test_a_refusal_is_one_sentence_and_exit_code_2_on_the_command_line(tmp_path, trained):
    done = _kd([*BASE, "recipe.lam=0.9", f"ckpt_path={trained}"], tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert _last_line(done.stderr).startswith(f"kd: error: ckpt_path {trained} was trained with other settings")
    assert not (tmp_path / "cache").exists()


def test_sigterm_to_a_joblib_sweep_stops_the_jobs_in_its_worker_processes(tmp_path):
    """The joblib launcher runs jobs in loky worker processes, which a SIGTERM to ``kd``
    never reached: the sweep exited while its jobs trained on. It is forwarded now; each
    running job writes its checkpoint and sentence, and no worker outlives ``kd``."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    from kd.resume import _alive, sweep_workers

    marker = tmp_path / "fitting"
    args = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "threads=1", "seed=0,1", *TINY,
            "trainer.max_epochs=40", "scratch_baseline=false", *_paced(tmp_path, "run")]
    with open(tmp_path / "stderr.txt", "w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "kd.cli", *args], cwd=tmp_path, env=_env(tmp_path),
                                stdout=subprocess.DEVNULL, stderr=err)
        workers: list[int] = []
        try:
            deadline = time.monotonic() + 300
            while not marker.exists():
                assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
                assert time.monotonic() < deadline, "the fit never started"
                time.sleep(0.05)
            workers = [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/stat")
                       if p.read_text().rsplit(")", 1)[1].split()[1] == str(proc.pid)]
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            until = time.monotonic() + 10  # SIGKILLed workers: gone, or zombies waiting for a reaper
            while [pid for pid in workers if _alive(pid)] and time.monotonic() < until:
                time.sleep(0.1)
            alive = [pid for pid in workers if _alive(pid)]
            for pid in alive:
                os.kill(pid, signal.SIGKILL)
        err.seek(0)
        stderr = err.read()
    assert sweep_workers() == []  # (this process has none)
    assert code == 143, stderr[-3000:]
    assert "Traceback" not in stderr
    assert _last_line(stderr).startswith("kd: stopped by SIGTERM; its 2 worker process(es) stopped their jobs")
    jobs = [line for line in stderr.splitlines() if line.startswith("kd: sweep job ")]
    assert jobs and all("stopped by SIGTERM" in line for line in jobs), stderr[-3000:]
    assert list((tmp_path / "outputs" / "sweeps").rglob("interrupted.ckpt"))
    assert not alive, "a worker process outlived kd"
