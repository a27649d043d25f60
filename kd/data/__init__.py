"""Datasets and LightningDataModules.

Batch conventions (what a recipe receives):

* classification: ``{"inputs": float (B, ...), "labels": long (B,)}``; a label of
  :data:`IGNORE_INDEX` marks an example without a gold label (it still feeds the
  teacher's soft targets, as in Hinton's transfer set).

Every key a batch may hold, and :func:`kd.batches.batch_targets` (labels and mask aligned
with logits), live in :mod:`kd.batches`.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data.distributed import DistributedSampler

from kd.resume import run_seed

IGNORE_INDEX = -100


def process_group(datamodule: Any) -> tuple[int, int]:
    """``(rank, world_size)`` of the trainer ``datamodule`` is attached to (``(0, 1)`` when
    it is attached to none or trains in one process)."""
    trainer = getattr(datamodule, "trainer", None)
    if trainer is None:
        return 0, 1
    return int(trainer.global_rank), int(trainer.world_size)


def train_sampler(dataset: Any, datamodule: Any, batch_size: int) -> TrainOrder:
    """The training order (:class:`TrainOrder`) of ``datamodule``'s ``dataset``."""
    rank, world = process_group(datamodule)
    return TrainOrder(dataset, datamodule, batch_size, num_replicas=world, rank=rank,
                      seed=run_seed())


class TrainOrder(DistributedSampler):
    """A seeded permutation per epoch, the same in one process and under DDP, where rank
    r takes positions r, r + W, r + 2W, ... of it: a global batch of W x B examples
    holds the examples of one process's batch of W * B, so a run on W processes equals
    the single-process run with W times the batch size.

    The seed is the run's (``PL_GLOBAL_SEED``, set by Lightning's ``seed_everything``)
    and the epoch's (Lightning calls ``set_epoch``), never the global random state,
    which other work between the seeding and the first batch consumes differently on
    each rank or after a resume. A run resumed from a checkpoint written mid-epoch
    skips the batches that epoch already trained on (:class:`ResumableData`), as the
    uninterrupted run would have gone on.
    """

    def __init__(self, dataset: Any, datamodule: Any, batch_size: int, **kwargs: Any) -> None:
        super().__init__(dataset, shuffle=True, **kwargs)
        self.datamodule, self.batch_size = datamodule, batch_size

    def __iter__(self) -> Any:
        indices = list(super().__iter__())
        resume = getattr(self.datamodule, "resume_at", None)
        if resume is not None and resume.get("epoch") == self.epoch:
            self.datamodule.resume_at = None  # once: the next epochs start at their beginning
            indices = indices[int(resume.get("batches", 0)) * self.batch_size:]
        return iter(indices)


class ResumableData:
    """What a LightningDataModule adds to checkpoints so that a run resumed mid-epoch
    continues its epoch where it stopped: the epoch and the batches it completed
    (Lightning's own loop counters; Lightning stores ``state_dict()`` in every checkpoint
    and hands it back to ``load_state_dict`` when a run resumes)."""

    #: the position a resumed run continues from (None: the beginning of each epoch)
    resume_at: dict[str, int] | None = None

    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.state.fn != "fit":
            return {}
        return {"epoch": int(trainer.current_epoch),
                "batches": int(trainer.fit_loop.epoch_loop.batch_progress.current.completed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.resume_at = dict(state) if state else None


def eval_sampler(dataset: Any, datamodule: Any) -> Any:
    """Held-out order: sequential in one process; under DDP rank r takes examples r, r + W,
    ... without the padding repeats of a ``DistributedSampler``, so every example is scored
    exactly once when the ranks' metrics are merged (no collective runs per step, so
    ranks may hold different numbers of batches)."""
    rank, world = process_group(datamodule)
    return None if world == 1 else range(rank, len(dataset), world)

