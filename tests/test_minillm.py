"""MiniLLM (docs/spec.md section 4): the test vectors, the two variants, rollouts without
gradient, and a PPO step through Lightning."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch

from kd import ConfigError
from kd.divergences import reverse_kl
from kd.generation import GenerationConfig, TeacherMix, generate, mix_log_probs
from kd.models import tiny_causal_lm
from kd.regimes import OnPolicy
from recipes.minillm import MiniLLM, advantages, normalized_returns, ppo_clipped_loss


def test_single_step_term_is_the_exact_reverse_kl_with_its_gradient():
    logits = torch.tensor([[0.3, -0.2, 0.5]], dtype=torch.float64, requires_grad=True)
    p = torch.tensor([[0.6, 0.3, 0.1]], dtype=torch.float64)
    kl = reverse_kl(logits, p.log())
    assert kl.item() == pytest.approx(0.372959, abs=1e-6)
    kl.backward()
    torch.testing.assert_close(logits.grad, torch.tensor([[-0.318848, -0.151965, 0.470813]], dtype=torch.float64),
                               atol=1e-6, rtol=0)


def test_teacher_mixed_sampling_weight():
    q = torch.tensor([0.5, 0.5]).log()
    p = torch.tensor([0.1, 0.9]).log()
    mixed = mix_log_probs(q, p, 0.2).exp()
    assert mixed[0].item() == pytest.approx(0.42, abs=1e-6)
    assert (q[0].exp() / mixed[0]).item() == pytest.approx(1.190476, abs=1e-6)


def test_length_normalized_returns():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False]])
    torch.testing.assert_close(normalized_returns(rewards, mask, 1.0)[0, :3], torch.tensor([2.0, 2.5, 3.0], dtype=torch.float64))
    torch.testing.assert_close(normalized_returns(rewards, mask, 0.95)[0, :3],
                               torch.tensor([1.869167, 2.425, 3.0], dtype=torch.float64), atol=1e-6, rtol=0)
    # paper: A_t = R_{t+1} (future rewards only), 0 at the last token; code: includes r_t, whitened
    torch.testing.assert_close(advantages(rewards, mask, 1.0, include_current=False, whiten=False)[0],
                               torch.tensor([2.5, 3.0, 0.0, 0.0], dtype=torch.float64))
    code = advantages(rewards, mask, 0.95, include_current=True, whiten=True)[0]
    assert code[:3].mean().item() == pytest.approx(0.0, abs=1e-9) and code[:3].std().item() == pytest.approx(1.0)
    assert code[3].item() == 0.0  # padding is neither whitened nor counted


def test_a_prompt_before_the_response_does_not_leak_into_returns():
    rewards = torch.tensor([[9.0, 9.0, 1.0, 2.0, 3.0, 7.0]])
    mask = torch.tensor([[False, False, True, True, True, False]])
    torch.testing.assert_close(normalized_returns(rewards, mask)[0], torch.tensor([0, 0, 2.0, 2.5, 3.0, 0]))


@pytest.mark.parametrize("advantage,loss,grad", [(1.0, -1.2, 0.0), (-1.0, 1.5, 1.0)])
def test_ppo_clipping(advantage, loss, grad):
    ratio_w = torch.tensor(1.5, requires_grad=True)
    value = ppo_clipped_loss(ratio_w, torch.tensor(advantage), eps=0.2)
    value.backward()
    assert value.item() == pytest.approx(loss)
    assert ratio_w.grad.item() == pytest.approx(grad)


def _models(vocab: int = 300):
    torch.manual_seed(0)
    return (tiny_causal_lm(vocab_size=vocab, hidden_size=32, num_layers=1),
            tiny_causal_lm(vocab_size=vocab, hidden_size=32, num_layers=1))


def test_alpha_0_gives_unit_importance_weights(task_dm):
    student, teacher = _models()
    batch = next(iter(task_dm.train_dataloader()))
    tok = task_dm.tokenizer
    config = GenerationConfig(max_new_tokens=6, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                              vocab_size=len(tok))
    out = generate(student, batch["prompt_ids"], batch["prompt_mask"], config, mix=TeacherMix(teacher, 0.0))
    assert torch.equal(out.importance_weights, torch.ones_like(out.importance_weights))
    out = generate(student, batch["prompt_ids"], batch["prompt_mask"], config, mix=TeacherMix(teacher, 0.2))
    assert not torch.allclose(out.importance_weights, torch.ones_like(out.importance_weights))


def _attached(recipe, dm):
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=1)
    recipe.trainer = trainer
    trainer.datamodule = dm
    recipe.set_vocabulary(len(dm.tokenizer))
    return recipe


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_teacher_equal_to_student_gives_zero_rewards_and_advantages(task_dm, variant):
    student, _ = _models()
    recipe = _attached(MiniLLM(student=student, teacher=copy.deepcopy(student), variant=variant), task_dm)
    buffer = recipe.rollout(next(iter(task_dm.train_dataloader())))
    assert buffer["mask"].any()
    assert buffer["rewards"].abs().max().item() < 1e-5
    assert buffer["advantages"].abs().max().item() < 1e-5
    terms = recipe.minibatch_loss(buffer, None)
    assert abs(terms["single_step"].item()) < 1e-5 and abs(terms["ppo"].item()) < 1e-5


def test_rollouts_carry_no_gradient_and_the_first_ratio_is_one(task_dm):
    student, teacher = _models()
    recipe = _attached(MiniLLM(student=student, teacher=teacher), task_dm)
    recipe.train()
    buffer = recipe.rollout(next(iter(task_dm.train_dataloader())))
    assert not any(v.requires_grad for v in buffer.values())
    terms = recipe.minibatch_loss(buffer, None)
    assert terms["clip_fraction"].item() == 0.0  # rho = 1 before any update: nothing is clipped
    # the rewards are log p - log q of the sampled tokens, scored by both models afresh
    mask = buffer["mask"]
    assert buffer["rewards"][mask].abs().sum() > 0 and (buffer["weights"][mask] > 0).all()
    terms["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_paper_weights_the_single_step_term_and_code_does_not(task_dm):
    student, teacher = _models()
    paper = _attached(MiniLLM(student=student, teacher=teacher, variant="paper"), task_dm)
    buffer = paper.rollout(next(iter(task_dm.train_dataloader())))
    code = _attached(MiniLLM(student=student, teacher=teacher, variant="code"), task_dm)
    mask = buffer["mask"]
    log_q = torch.log_softmax(student(input_ids=buffer["input_ids"], attention_mask=buffer["attention_mask"]).logits[
        :, :-1, : len(task_dm.tokenizer)], -1)
    kl = (log_q.exp() * (log_q - buffer["teacher_logprobs"])).sum(-1)
    assert paper.minibatch_loss(buffer, None)["single_step"].item() == pytest.approx(
        (kl * buffer["weights"])[mask].mean().item(), rel=1e-5)
    assert code.minibatch_loss(buffer, None)["single_step"].item() == pytest.approx(kl[mask].mean().item(), rel=1e-5)


def test_bad_settings_are_refused():
    student, teacher = _models()
    with pytest.raises(ConfigError, match="variant must be one of"):
        MiniLLM(student=student, teacher=teacher, variant="blog")
    with pytest.raises(ConfigError, match="use regime=offline"):
        MiniLLM(student=student, teacher=teacher, regime=OnPolicy())


def test_a_training_batch_runs_ppo_epochs_times_minibatches_updates(make_cfg):
    from kd.runs import train as run
    from tests.conftest import SMALL_TASK

    cfg = make_cfg(*SMALL_TASK, "recipe=minillm", "recipe.ppo_epochs=2", "recipe.num_minibatches=2",
                   "trainer.max_epochs=1", "trainer.limit_train_batches=2", "data.generation_eval_size=4",
                   "scratch_baseline=false")
    summary = run(cfg)
    row = summary["results"]["student, minillm"]
    assert 0.0 <= row["test/exact_match"] <= 1.0
    ckpt = torch.load(next(Path(cfg.paths.output_dir).rglob("last.ckpt")), weights_only=False)
    assert ckpt["global_step"] == 2 * 2 * 2  # batches x epochs x mini-batches
