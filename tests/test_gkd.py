"""GKD (docs/spec.md section 5): the recipe's loss on token batches, on-policy batches and
exactness under gradient accumulation (its student's dropout: tests/test_student_dropout.py)."""

from __future__ import annotations

import copy
import json

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from kd.data import IGNORE_INDEX
from kd.divergences import JSD, ForwardKL
from kd.models import tiny_causal_lm
from kd.regimes import Mixed
from recipes.gkd import GKD


def _models(vocab: int = 300):
    torch.manual_seed(0)
    student = tiny_causal_lm(vocab_size=vocab, hidden_size=32, num_layers=1)
    teacher = tiny_causal_lm(vocab_size=vocab, hidden_size=32, num_layers=1)
    return student, teacher


def test_lmbda_0_beta_0_is_token_mean_forward_kl_on_dataset_targets(task_dm):
    student, teacher = _models()
    recipe = GKD(student=student, teacher=teacher, divergence=JSD(beta=0.0))
    recipe.set_vocabulary(V := len(task_dm.tokenizer))
    batch = next(iter(task_dm.train_dataloader()))
    loss = recipe.compute_loss(batch)["loss"]
    # by hand: KL(p_T || p_S) summed over the vocabulary at every response-token row, mean over rows
    ids, attn = batch["input_ids"], batch["attention_mask"]
    s = student(input_ids=ids, attention_mask=attn).logits[:, :-1, :V]
    t = teacher(input_ids=ids, attention_mask=attn).logits[:, :-1, :V]
    rows = batch["labels"][:, 1:] != IGNORE_INDEX
    p_t, log_p_t, log_p_s = F.softmax(t[rows], -1), F.log_softmax(t[rows], -1), F.log_softmax(s[rows], -1)
    expected = (p_t * (log_p_t - log_p_s)).sum(-1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "seq_mean"])
def test_teacher_equal_to_student_gives_zero_loss(task_dm, beta, reduction):
    student, _ = _models()
    recipe = GKD(student=student, teacher=copy.deepcopy(student), divergence=JSD(beta=beta, reduction=reduction))
    recipe.set_vocabulary(len(task_dm.tokenizer))
    loss = recipe.compute_loss(next(iter(task_dm.train_dataloader())))["loss"]
    assert abs(loss.item()) < 1e-6


def test_seq_mean_averages_each_sequence_first(task_dm):
    student, teacher = _models()
    V = len(task_dm.tokenizer)
    batch = next(iter(task_dm.train_dataloader()))
    seq = GKD(student=student, teacher=teacher, divergence=ForwardKL(reduction="seq_mean"))
    seq.set_vocabulary(V)
    values = ForwardKL(reduction="none")(*_student_teacher(seq, batch))
    rows = batch["labels"][:, 1:] != IGNORE_INDEX
    expected = torch.stack([values[b][rows[b]].mean() for b in range(len(rows))]).mean()
    terms = seq.compute_loss(batch)
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert int(terms["num_items"]) == len(rows)  # items are sequences


def _student_teacher(recipe, batch):
    out = recipe.outputs(recipe.student, batch)
    return out.logits, recipe.teacher_outputs(batch).logits, out.mask


def test_on_policy_batches_are_student_samples_without_gradient_through_sampling(task_dm):
    student, teacher = _models()
    recipe = GKD(student=student, teacher=teacher, divergence=JSD(beta=0.5), regime=Mixed(lmbda=1.0))
    recipe.set_vocabulary(V := len(task_dm.tokenizer))
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=1)
    recipe.trainer = trainer
    trainer.datamodule = task_dm  # what fit() would attach
    batch = next(iter(task_dm.train_dataloader()))
    torch.manual_seed(1)
    sampled = recipe.regime.batch(recipe.student, batch, task_dm)
    # token ids outside any autograd graph (integer tensors cannot require grad; a relaxation or an
    # inference-mode tensor would show here)
    for key in ("input_ids", "attention_mask", "labels"):
        t = sampled[key]
        assert t.dtype == torch.long and t.grad_fn is None and not t.is_inference(), key
    labels = sampled["labels"]
    assert (labels[labels != IGNORE_INDEX] < V).all()
    gold = [batch["labels"][b][batch["labels"][b] != IGNORE_INDEX].tolist() for b in range(len(labels))]
    got = [labels[b][labels[b] != IGNORE_INDEX].tolist() for b in range(len(labels))]
    assert got != gold  # an untrained student does not reproduce the dataset's answers
    # the loss's gradient is the same as on those sequences given as fixed data: no gradient flows through
    # the sampling, and sampling left the student as it was
    params = list(student.parameters())
    assert all(p.requires_grad for p in params)
    loss = recipe.compute_loss(sampled)["loss"]
    grads = torch.autograd.grad(loss, params)
    grad = next(g for p, g in zip(params, grads) if p is student.lm_head.weight)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    fixed = {k: v.detach().clone() for k, v in sampled.items()}
    fixed_loss = recipe.compute_loss(fixed)["loss"]
    assert fixed_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    fixed_grads = torch.autograd.grad(fixed_loss, params)
    assert all(torch.allclose(a, b) for a, b in zip(grads, fixed_grads))
    # ... and that gradient is not the one on the dataset's own responses (the loss used the samples)
    dataset_grads = torch.autograd.grad(recipe.compute_loss(batch)["loss"], params)
    assert not all(torch.allclose(a, b) for a, b in zip(grads, dataset_grads))


class _Batches(L.LightningDataModule):
    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.batches, batch_size=None)


@pytest.mark.parametrize("reduction", ["mean", "seq_mean"])
def test_two_half_batches_accumulated_equal_the_full_batch(task_dm, reduction):
    """One SGD step on a full batch == 2 accumulated half batches holding different numbers
    of response tokens (Lightning alone would average the two half-batch means)."""
    full = next(iter(task_dm.train_dataloader()))
    order = full["labels"].ne(IGNORE_INDEX).sum(-1).argsort()
    full = {k: v[order] for k, v in full.items()}  # short answers first: the halves differ in tokens
    halves = [{k: v[:2] for k, v in full.items()}, {k: v[2:] for k, v in full.items()}]
    counts = [int(h["labels"].ne(IGNORE_INDEX).sum()) for h in halves]
    assert counts[0] != counts[1]

    def step(batches, accumulate):
        student, teacher = _models()
        recipe = GKD(student=student, teacher=teacher, divergence=JSD(beta=0.5, reduction=reduction),
                     optimizer=lambda params: torch.optim.SGD(params, lr=1.0))
        recipe.set_vocabulary(len(task_dm.tokenizer))
        trainer = L.Trainer(max_steps=1, accumulate_grad_batches=accumulate, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(recipe, datamodule=_Batches(batches))
        return torch.cat([p.detach().flatten() for p in student.parameters()])

    start = torch.cat([p.detach().flatten() for p in _models()[0].parameters()])
    one, two = step([full], 1), step(halves, 2)
    assert not torch.allclose(one, start)
    torch.testing.assert_close(two, one, rtol=1e-4, atol=1e-6)


def test_student_sft_starts_the_student_from_the_cached_fine_tune(make_cfg, tmp_path):
    from kd.runs import train as run
    from kd.models import read_state_dict
    from tests.conftest import SMALL_TASK

    cfg = make_cfg(*SMALL_TASK, "recipe=gkd", "regime.lmbda=0", "sft=task", "student_sft.max_epochs=1",
                   "optimizer.lr=0", "optimizer.weight_decay=0", "trainer.max_epochs=1",
                   "trainer.limit_train_batches=2", "data.generation_eval_size=4")
    summary = run(cfg)
    (sft_dir,) = (tmp_path / "cache" / "sft").iterdir()
    sft, trained = read_state_dict(sft_dir), read_state_dict(tmp_path / "run" / "student")
    assert sft.keys() == trained.keys()
    assert all(torch.equal(sft[k], trained[k]) for k in sft)  # lr 0: the student is exactly the SFT
    meta = json.loads((sft_dir / "entry.json").read_text())["info"]
    # the start point is labelled as what it is, an SFT, never "from scratch"
    assert "student, from scratch" not in summary["results"]
    assert summary["results"]["student, SFT (start point)"]["test/exact_match"] == meta["metrics"]["test/exact_match"]
    # and its validation metrics, to choose a student (its size, its SFT) without the test split
    assert 0 <= meta["validation"]["val/exact_match"] <= 1 and meta["validation"]["val/loss"] > 0
