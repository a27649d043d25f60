"""``Needs.student_dropout``: the mode a student with dropout is in during the training steps
of a real ``fit`` (Lightning 2.6 never calls ``train()`` then, so a ``train()`` override
decides nothing), before and after a validation in the middle of training."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from kd.divergences import JSD, ForwardKL
from kd.models import tiny_causal_lm
from kd.regimes import Mixed
from recipes.cross_stage import CrossStage
from recipes.gkd import GKD
from recipes.hinton import Hinton
from recipes.minillm import MiniLLM


def _models():
    torch.manual_seed(0)
    student = tiny_causal_lm(vocab_size=300, hidden_size=32, num_layers=1, dropout=0.5)
    teacher = tiny_causal_lm(vocab_size=300, hidden_size=32, num_layers=1)
    return student, teacher


RECIPES = {  # name: (constructor, the method that computes a training loss, dropout on in training)
    "gkd": (lambda s, t: GKD(student=s, teacher=t, divergence=JSD(beta=0.5), regime=Mixed(lmbda=0.5)),
            "compute_loss", False),
    "gkd, recipe.student_dropout=true": (
        lambda s, t: GKD(student=s, teacher=t, divergence=JSD(beta=0.5), student_dropout=True), "compute_loss", True),
    "minillm": (lambda s, t: MiniLLM(student=s, teacher=t, ppo_epochs=1, num_minibatches=2), "minibatch_loss", False),
    "cross_stage": (lambda s, t: CrossStage(student=s, teacher=t), "compute_loss", False),
    "hinton": (lambda s, t: Hinton(student=s, teacher=t, divergence=ForwardKL()), "compute_loss", True),
}


def _modes_seen_in_training(recipe, method: str, dm) -> list[tuple[bool, bool]]:
    """Fit 2 steps with a validation after each; at every loss computation, the student's
    ``training`` flag and whether two forwards of the step's sequences give the same logits."""
    seen = []
    loss = getattr(recipe, method)

    def watched(batch, *args):
        with torch.no_grad():
            a, b = (recipe.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    for _ in range(2))
        seen.append((recipe.student.training, torch.equal(a, b)))
        return loss(batch, *args)

    setattr(recipe, method, watched)
    trainer = L.Trainer(max_steps=2, val_check_interval=1, limit_val_batches=1, num_sanity_val_steps=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(recipe, datamodule=dm)
    assert seen
    return seen


@pytest.mark.parametrize("name", list(RECIPES))
def test_the_student_trains_in_the_mode_its_recipe_needs(task_dm, name):
    make, method, dropout_on = RECIPES[name]
    recipe = make(*_models())
    # off: eval mode, the step's forwards agree (GKD, MiniLLM and cross_stage sample without dropout)
    # on: train mode, dropout makes two forwards of one batch differ
    assert set(_modes_seen_in_training(recipe, method, task_dm)) == {(dropout_on, not dropout_on)}


def test_a_student_loaded_in_eval_mode_still_trains_with_its_dropout(task_dm):
    """transformers' ``from_pretrained`` returns a model in eval mode; a recipe that keeps
    dropout (the default) turns it on for training."""
    student, teacher = _models()
    student.eval()
    recipe = Hinton(student=student, teacher=teacher, divergence=ForwardKL())
    assert set(_modes_seen_in_training(recipe, "compute_loss", task_dm)) == {(True, False)}


def test_train_puts_the_student_in_its_training_mode_and_the_override_stays_on_the_instance():
    student, teacher = _models()
    recipe = GKD(student=student, teacher=teacher, divergence=JSD(beta=0.5))
    recipe.train()
    assert not recipe.student.training and not recipe.teacher.training
    on = GKD(student=student, teacher=teacher, divergence=JSD(beta=0.5), student_dropout=True)
    on.train()
    assert on.student.training and on.needs.student_dropout
    assert not GKD.needs.student_dropout and not recipe.needs.student_dropout  # the class default is untouched
