"""Resume that changes nothing: a run stopped and resumed with ``ckpt_path=`` ends with the
weights and metrics of the run that was never stopped.

Where it stops:

* **SIGTERM** (a scheduler's pre-emption, ``kill``) or Ctrl-C: Lightning finishes the
  batch in progress, then :class:`CheckpointOnSigterm` (the ``interrupted`` callback of
  ``conf/callbacks/default.yaml``) writes ``checkpoints/interrupted.ckpt``, mid-epoch;
* **SIGKILL** or a crash: the last checkpoint written is ``checkpoints/last.ckpt`` (every
  epoch) or a periodic one (``callbacks.last_checkpoint.every_n_train_steps=N``).

What a checkpoint carries, so that the resumed run continues exactly:

* weights, optimizer and scheduler state, Lightning's loop counters (Lightning);
* the regime's state, e.g. the mixed regime's coin (:class:`kd.recipe.DistillationRecipe`);
* the data position: the epoch and the batches it completed
  (:class:`kd.data.ResumableData`); the training order is a permutation seeded by the run's
  seed and the epoch (:class:`kd.data.TrainOrder`), so the resumed epoch skips what was
  trained and goes on with the same batches;
* nothing random: every training batch reseeds torch's generators from
  :func:`step_seed` (run seed, epoch, batch, rank) before the regime samples and the
  student runs (dropout, on-policy samples), so a batch's randomness does not depend on
  what ran before it in this process.

Nothing half-written is ever read: checkpoints are written to a temporary file and renamed
into place (:class:`AtomicCheckpointIO`); the exported student and cache entries are written
to a temporary directory renamed into place (:func:`kd.cache.atomic_directory`).

How a stopped ``kd`` ends (:func:`install_stop_handlers`, called by ``kd`` and ``kd-eval``):
never with exit code 0. A SIGTERM exits with 143 and Ctrl-C with 130 (:data:`EXIT_CODES`:
128 + the signal's number, what a shell reports for a process a signal ended and what
schedulers read as "terminated", never as success; distinct from 1, a crash, and 2, a
configuration error), after one sentence naming the checkpoint to resume from and the
``ckpt_path=`` command that does it (:func:`stop_message`), wherever the signal arrived:
in the run's fit (Lightning finishes the batch, ``interrupted.ckpt`` is written), in a cached
teacher's or baseline's fit, in a test, between stages. Under ``kd -m`` the sweep stops with
the same code: its later jobs do not run, and are not reported as a success.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from kd.cache import partial_path

log = logging.getLogger("kd")


def run_seed() -> int:
    """The run's seed, as Lightning's ``seed_everything`` left it in ``PL_GLOBAL_SEED``
    (0 when nothing seeded): what the training order and the per-batch seeds derive from."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def step_seed(seed: int, epoch: int, batch: int, rank: int = 0) -> int:
    """A 63-bit seed for one training batch, a function of nothing else."""
    state = np.random.SeedSequence([seed % 2**32, epoch, batch, rank]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


class CheckpointOnSigterm(Callback):
    """Write ``<dirpath>/<filename>.ckpt`` when Lightning stops a fit on SIGTERM (it finishes
    the batch in progress first) or Ctrl-C, so the run resumes mid-epoch from there.

    Unlike Lightning's ``OnExceptionCheckpoint``, its presence never makes a later
    ``fit(ckpt_path=None)`` in the same directory resume on its own: a run resumes only
    when ``ckpt_path=`` says so."""

    def __init__(self, dirpath: str | os.PathLike, filename: str = "interrupted") -> None:
        self.path = Path(dirpath) / f"{filename}.ckpt"

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)) and trainer.state.fn == "fit":
            trainer.save_checkpoint(self.path)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        raise_if_stopped()  # a signal a finished stage let pass (see raise_if_stopped): train nothing more

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        raise_if_stopped()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoints, written to a temporary file beside the target
    and renamed over it: a process killed while saving leaves the previous checkpoint whole."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = partial_path(target)
        try:
            super().save_checkpoint(checkpoint, partial, storage_options)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- stopping on a signal

#: the exit code of a ``kd`` run stopped by each signal: 128 + the signal's number, as a shell
#: reports a process a signal ended (SIGTERM 143, SIGINT 130)
EXIT_CODES = {"SIGTERM": 128 + int(signal.SIGTERM), "SIGINT": 128 + int(signal.SIGINT)}

#: the stop signals this process received, in order (:func:`install_stop_handlers`)
_received: list[str] = []
#: while Ctrl-C is handed to Lightning's SIGTERM handlers, which call ours again
_forwarding = threading.local()
#: when this process started: a checkpoint older than this was not written by this run
_STARTED_NS = time.time_ns()


class Stopped(BaseException):
    """A stop signal that arrived while no Lightning fit was there to finish its batch first
    (composing, building, preparing, exporting, between stages). A ``BaseException``, like
    ``KeyboardInterrupt``, so that no ``except Exception`` on the way swallows it."""

    def __init__(self, name: str) -> None:
        super().__init__(f"stopped by {name}")
        self.name = name


def received() -> str | None:
    """The first stop signal this process received (``"SIGTERM"``, ``"SIGINT"``), or None."""
    return _received[0] if _received else None


def raise_if_stopped() -> None:
    """Raise :class:`Stopped` when a stop signal arrived: Lightning lets one pass when it
    comes in the last batch of a test or after a fit's last epoch, and the run then goes on
    to its next stage, where this is called (:class:`CheckpointOnSigterm`)."""
    if _received:
        raise Stopped(_received[0])


def _lightning_handler() -> Any:
    """Lightning's SIGTERM handler while a trainer runs a stage (it finishes the batch in
    progress, then raises ``SIGTERMException``), else None."""
    from lightning.pytorch.trainer.connectors.signal_connector import _HandlersCompose

    handler = signal.getsignal(signal.SIGTERM)
    return handler if isinstance(handler, _HandlersCompose) else None


def _on_signal(signum: int, frame: Any) -> None:
    if getattr(_forwarding, "active", False):  # Lightning's handlers calling this one back for a Ctrl-C
        return
    name = signal.Signals(signum).name
    first = not _received
    _received.append(name)
    if not first:  # already stopping: a second SIGTERM changes nothing, a second Ctrl-C stops now
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        return
    lightning = _lightning_handler()
    if lightning is None:
        raise Stopped(name)
    if signum != signal.SIGTERM:  # Ctrl-C in a fit: Lightning's graceful stop, as for SIGTERM
        _forwarding.active = True
        try:
            lightning(signal.SIGTERM, frame)
        finally:
            _forwarding.active = False
    # SIGTERM in a fit: Lightning's handler, which called this one, stops it after the batch


def install_stop_handlers() -> None:
    """Handle SIGTERM and SIGINT for the rest of this process (``kd`` calls this first):
    in a Lightning stage, the stage stops gracefully after its batch (Lightning's own
    SIGTERM handling, which calls this one too); anywhere else :class:`Stopped` is raised.
    The console script turns either into :func:`stop_message` and :data:`EXIT_CODES`."""
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, _on_signal)


def resume_checkpoint(cfg: DictConfig) -> Path | None:
    """The checkpoint that resumes ``cfg``'s run after it stopped: the newest this process
    wrote into the run's output directory (``interrupted.ckpt`` after a stopped fit, else the
    last epoch's), else the checkpoint the run itself resumed from, else None."""
    out = Path(str(cfg.paths.output_dir))
    written = [p for p in (out.rglob("*.ckpt") if out.is_dir() else []) if not p.name.startswith(".")
               and p.is_file() and p.stat().st_mtime_ns >= _STARTED_NS]
    if written:
        newest = max(written, key=lambda p: (p.stat().st_mtime_ns, p.name == "interrupted.ckpt", p.name == "last.ckpt"))
        return newest.resolve()
    resumed = cfg.get("ckpt_path")
    return Path(str(resumed)).resolve() if resumed and Path(str(resumed)).is_file() else None


def resume_command(overrides: list[str], checkpoint: Path) -> str:
    """``kd <overrides> ckpt_path=<checkpoint>``, quoted for a POSIX shell."""
    kept = [o for o in overrides if not o.lstrip("+~").startswith("ckpt_path=")]
    return " ".join(["kd", *map(shlex.quote, kept), shlex.quote(f"ckpt_path={checkpoint}")])


def stop_message(name: str, cfg: DictConfig, overrides: list[str], job: str | None = None) -> str:
    """The one sentence ``kd`` prints when ``name`` (a signal) stopped the run of ``cfg``
    (started with ``overrides``; ``job``: its sweep job)."""
    what = f"sweep job {job} was stopped by {name}, so the sweep stops and its later jobs do not run" if job else (
        f"stopped by {name}")
    checkpoint = None if cfg.get("pipeline") else resume_checkpoint(cfg)  # a pipeline's stages do not resume
    if checkpoint is None:
        again = " ".join(["kd", *map(shlex.quote, overrides)])
        return (f"{what} before the run wrote a checkpoint (cached teachers and baselines that finished are kept); "
                f"start it again with: {again}")
    return f"{what}; resume it from {checkpoint} with: {resume_command(overrides, checkpoint)}"


__all__ = ["run_seed", "step_seed", "CheckpointOnSigterm", "AtomicCheckpointIO", "EXIT_CODES", "Stopped",
           "received", "raise_if_stopped", "install_stop_handlers", "resume_checkpoint", "stop_message"]
