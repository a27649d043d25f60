"""kd.policy.buffer_updates, the loop of recipes with their own optimisation: optimizer and
scheduler steps per buffer, the mean terms it returns, and the non-finite loss guard it
shares with the base class's training step."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import Tensor, nn

from kd import policy
from kd.recipe import DistillationRecipe, Needs

EPOCHS, PARTS = 2, 4


class _Regression(DistillationRecipe):
    """A linear student fitted on each batch as a buffer, by buffer_updates."""

    needs = Needs(teacher=False, own_loop=True)

    def __init__(self, poison_step: int | None = None) -> None:
        torch.manual_seed(0)
        super().__init__(student=nn.Linear(2, 1), optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                         scheduler=lambda opt, total_steps: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5))
        self.poison_step = poison_step
        self.parts: list[int] = []
        self.returned: list[dict[str, float]] = []

    @property
    def optimizer_steps_per_batch(self) -> int:
        return EPOCHS * PARTS

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x, y = batch["x"], batch["y"]

        def loss(rows: Tensor) -> dict[str, Tensor]:
            self.parts.append(len(rows))
            error = (self.student(x[rows]).squeeze(-1) - y[rows]) ** 2
            if self.global_step == self.poison_step:
                error = error * float("nan")
            return {"loss": error.mean(), "rows": torch.tensor(float(len(rows)))}

        means = policy.buffer_updates(self, len(x), loss, epochs=EPOCHS, minibatches=PARTS,
                                      generator=torch.Generator().manual_seed(0))
        self.returned.append(means)
        return torch.tensor(means["loss"])


def _fit(recipe: _Regression, sizes: list[int]) -> L.Trainer:
    batches = [{"x": torch.randn(n, 2), "y": torch.randn(n)} for n in sizes]
    trainer = L.Trainer(max_epochs=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(recipe, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return trainer


def test_each_buffer_takes_epochs_times_parts_scheduler_steps_and_one_update_per_filled_part():
    recipe = _Regression()
    trainer = _fit(recipe, [8, 3])  # 3 rollouts in 4 parts: one part stays empty each epoch
    assert recipe.parts == [2] * (EPOCHS * PARTS) + [1, 1, 1] * EPOCHS
    assert trainer.global_step == EPOCHS * PARTS + EPOCHS * 3  # optimizer steps
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 2 * EPOCHS * PARTS  # the schedule also steps over the empty parts
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** (2 * EPOCHS * PARTS))
    assert trainer.callback_metrics["train/lr"].item() == pytest.approx(0.1 * 0.5 ** (2 * EPOCHS * PARTS))
    assert recipe.returned[0]["rows"] == 2.0 and recipe.returned[1]["rows"] == 1.0  # means over the updates


def test_a_non_finite_loss_stops_with_the_base_class_sentence_naming_the_loops_clipping():
    recipe = _Regression(poison_step=3)
    with pytest.raises(FloatingPointError, match=r"^the training loss is not finite at step 3 \(loss=nan, rows=2\); "
                                                 r"lower optimizer.lr or set recipe.max_grad_norm "
                                                 r"\(checkpoints so far are kept\)$"):
        _fit(recipe, [8])
