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

Nothing in a checkpoint runs: :class:`AtomicCheckpointIO` loads with ``torch.load(...,
weights_only=True)`` on every supported torch (Lightning passes ``weights_only=None``, which
torch before 2.6 reads as ``False``: unpickling, which can run any code), and refuses a
checkpoint holding other Python objects than tensors and plain containers in one sentence.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from kd import ConfigError
from kd.cache import disk_full, partial_path


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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoints, written to a temporary file beside the target
    and renamed over it: a process killed while saving leaves the previous checkpoint whole;
    read with ``weights_only=True`` whatever the caller asks, so that loading one (a resume,
    ``test(ckpt_path=...)``) never unpickles arbitrary objects."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = partial_path(target)
        try:
            super().save_checkpoint(checkpoint, partial, storage_options)
            os.replace(partial, target)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):  # one sentence naming the checkpoint, no partial file
                raise ConfigError(disk_full(target)) from None
            raise
        finally:
            partial.unlink(missing_ok=True)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Callable | None = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = f"a pickled {found.group(1)}" if found else "pickled Python objects"
            raise ConfigError(
                f"checkpoint {path} holds {what}, not only tensors and plain values, so kd refuses to load it "
                f"(checkpoints load with weights_only=True: unpickling can run arbitrary code); resume only from "
                f"checkpoints kd wrote"
            ) from None


__all__ = ["run_seed", "step_seed", "CheckpointOnSigterm", "AtomicCheckpointIO"]
