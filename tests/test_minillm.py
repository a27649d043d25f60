"""MiniLLM (docs/spec.md section 4): the test vectors, the two variants, rollouts without
gradient, and a PPO step through Lightning."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from kd import ConfigError
from kd.data import IGNORE_INDEX
from kd.generation import GenerationConfig, TeacherMix, generate, mix_log_probs
from kd.models import tiny_causal_lm
from kd.regimes import OnPolicy
from recipes.minillm import MiniLLM, advantages, normalized_returns, ppo_clipped_loss


class _FixedPolicy(torch.nn.Module):
    """A "language model" whose next-token logits are the same parameter at every position."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(logits, dtype=torch.float64))

    def forward(self, input_ids, attention_mask=None, **kwargs):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1))


Q_LOGITS = [0.3, -0.2, 0.5]  # q = softmax -> [0.332225, 0.201504, 0.466271]
P = [0.6, 0.3, 0.1]


def _one_token_rollout(token, *, old_logprob, weight=1.0, advantage=0.0):
    """A rollout buffer of one response token ``token`` after a prompt token."""
    return {"input_ids": torch.tensor([[0, token]]), "attention_mask": torch.ones(1, 2, dtype=torch.long),
            "labels": torch.tensor([[IGNORE_INDEX, token]]), "mask": torch.tensor([[True]]),
            "old_logprobs": torch.tensor([[old_logprob]], dtype=torch.float64),
            "weights": torch.tensor([[weight]], dtype=torch.float64),
            "advantages": torch.tensor([[advantage]], dtype=torch.float64),
            "teacher_logprobs": torch.tensor([[P]], dtype=torch.float64).log()}


def _hand_q():
    z = np.array(Q_LOGITS)
    return np.exp(z) / np.exp(z).sum()


def test_single_step_term_is_the_exact_reverse_kl_with_its_gradient():
    """MiniLLM.minibatch_loss's single-step term on RECIPES section 4's vectors:
    q = softmax([0.3, -0.2, 0.5]), p = [0.6, 0.3, 0.1] -> KL(q||p) = 0.372959 with gradient
    [-0.318848, -0.151965, 0.470813] wrt the logits, whichever token was sampled; the
    paper weights it by w_t, the official code does not."""
    hand_grad = torch.tensor([-0.318848, -0.151965, 0.470813], dtype=torch.float64)
    for variant, weight, factor in (("paper", 1.0, 1.0), ("paper", 2.0, 2.0), ("code", 2.0, 1.0)):
        student = _FixedPolicy(Q_LOGITS)
        recipe = MiniLLM(student=student, teacher=_FixedPolicy([0.0, 0.0, 0.0]), variant=variant)
        for token in (0, 2):
            old = float(np.log(_hand_q()[token]))
            terms = recipe.minibatch_loss(_one_token_rollout(token, old_logprob=old, weight=weight), None)
            assert terms["single_step"].item() == pytest.approx(factor * 0.372959, abs=1e-6), (variant, weight)
            assert terms["reverse_kl"].item() == pytest.approx(0.372959, abs=1e-6)
            (grad,) = torch.autograd.grad(terms["single_step"], student.logits)
            torch.testing.assert_close(grad, factor * hand_grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("how", ["weight", "ratio"])
@pytest.mark.parametrize("advantage,loss", [(1.0, -1.2), (-1.0, 1.5)])
def test_the_ppo_term_at_nonzero_advantages(how, advantage, loss):
    """RECIPES section 4: ratio x w = 1.5, eps 0.2: A = +1 gives token loss -1.2 and no
    gradient (clipped branch), A = -1 gives +1.5 with gradient -A * 1.5 * (e_y - q) wrt the
    logits. The 1.5 comes from the importance weight (ratio 1) or from the ratio (w = 1)."""
    token = 1
    q = _hand_q()
    student = _FixedPolicy(Q_LOGITS)
    recipe = MiniLLM(student=student, teacher=_FixedPolicy([0.0, 0.0, 0.0]))
    old = float(np.log(q[token])) - (0.0 if how == "weight" else float(np.log(1.5)))
    weight = 1.5 if how == "weight" else 1.0
    terms = recipe.minibatch_loss(_one_token_rollout(token, old_logprob=old, weight=weight, advantage=advantage),
                                  None)
    assert terms["ppo"].item() == pytest.approx(loss, abs=1e-9)
    assert terms["clip_fraction"].item() == 1.0
    (grad,) = torch.autograd.grad(terms["ppo"], student.logits)
    expected = np.zeros(3) if advantage > 0 else -advantage * 1.5 * (np.eye(3)[token] - q)
    np.testing.assert_allclose(grad.numpy(), expected, atol=1e-9)
    # the total is ppo + the single-step term, weighted by w in the paper (no data: no LM term)
    assert terms["loss"].item() == pytest.approx(loss + weight * 0.372959, abs=1e-6)


@pytest.mark.parametrize("variant,share", [("paper", 0.0), ("code", 0.5)])
def test_the_lm_term_mixes_nll_and_forward_kd_by_lm_kd_share(variant, share):
    """The LM term on the data's responses: NLL (paper) or 0.5 NLL + 0.5 KL(p || q) (code,
    lm_kd_share 0.5), by hand for q = softmax([0.3, -0.2, 0.5]) and p = [0.6, 0.3, 0.1] on
    two labelled tokens (ids 0 and 2); the loss adds it times pt_weight."""
    q, p = _hand_q(), np.array(P)
    nll = -(np.log(q[0]) + np.log(q[2])) / 2
    forward = (p * np.log(p / q)).sum()
    hand = (1 - share) * nll + share * forward
    assert MiniLLM(student=_FixedPolicy(Q_LOGITS), teacher=_FixedPolicy(P), variant=variant).settings[
        "lm_kd_share"] == share
    for cached in (True, False):
        # the teacher's logits come from the data (cached once per buffer) or from the teacher
        recipe = MiniLLM(student=_FixedPolicy(Q_LOGITS), teacher=_FixedPolicy(np.log(P).tolist()), variant=variant,
                         pt_weight=0.25)
        data = {"input_ids": torch.tensor([[5, 0, 2]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
                "labels": torch.tensor([[IGNORE_INDEX, 0, 2]])}
        if cached:
            data["teacher_logits"] = torch.tensor([[P, P]], dtype=torch.float64).log()
        rollout = _one_token_rollout(0, old_logprob=float(np.log(q[0])))
        terms = recipe.minibatch_loss(rollout, data)
        assert terms["lm"].item() == pytest.approx(hand, abs=1e-9), (variant, cached)
        assert terms["loss"].item() == pytest.approx(
            terms["ppo"].item() + terms["single_step"].item() + 0.25 * hand, abs=1e-9)


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


def _hand_rewards_and_advantages(log_p, log_q, labels, mask, variant):
    """MiniLLM's rewards and advantages in float64 numpy, written from RECIPES section 4:
    paper r = log p - log q, A_t = sum_{t'>t} r_t' / (T - t - 1) (0 at the last token);
    code r = clip((log p - log q) / 0.5, +-100), A_t = sum_{t'>=t} 0.95^(t'-t) r_t' / (T - t),
    whitened over the batch's response tokens ((A - mean) / (unbiased std + 1e-8))."""
    B, L = labels.shape
    lp = np.take_along_axis(log_p, labels[..., None].clip(min=0), -1)[..., 0]
    lq = np.take_along_axis(log_q, labels[..., None].clip(min=0), -1)[..., 0]
    if variant == "code":
        rewards = np.clip((lp - lq) / 0.5, -100, 100)
    else:
        rewards = lp - lq
    rewards = np.where(mask, rewards, 0.0)
    adv = np.zeros((B, L))
    for b in range(B):
        positions = [t for t in range(L) if mask[b, t]]
        for i, t in enumerate(positions):
            later = positions[i:] if variant == "code" else positions[i + 1:]
            gamma = 0.95 if variant == "code" else 1.0
            adv[b, t] = sum(gamma ** (u - later[0]) * rewards[b, u] for u in later) / len(later) if later else 0.0
    if variant == "code":
        valid = adv[mask]
        adv = np.where(mask, (adv - valid.mean()) / (valid.std(ddof=1) + 1e-8), 0.0)
    return rewards, adv


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_rewards_and_advantages_of_a_rollout_by_hand(task_dm, variant):
    """A teacher that differs from the student (and is sharp, so some code-variant rewards
    pass the +-100 clip): the rollout's rewards and advantages equal the hand values from
    both models' log-probabilities of the sampled tokens."""
    student, teacher = _models()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(300)
    recipe = _attached(MiniLLM(student=student, teacher=teacher, variant=variant), task_dm)
    buffer = recipe.rollout(next(iter(task_dm.train_dataloader())))
    V = len(task_dm.tokenizer)
    with torch.no_grad():
        logits = {name: model(input_ids=buffer["input_ids"], attention_mask=buffer["attention_mask"]).logits[
            :, :-1, :V].double().numpy() for name, model in (("q", student), ("p", teacher))}

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    labels, mask = buffer["input_ids"][:, 1:].numpy(), buffer["mask"].numpy()
    assert (mask.sum(-1) >= 2).sum() >= 2  # several answers of several tokens
    rewards, adv = _hand_rewards_and_advantages(log_softmax(logits["p"]), log_softmax(logits["q"]), labels, mask,
                                                variant)
    if variant == "code":
        raw = np.abs(rewards[mask])
        assert (raw == 100).any() and (raw < 100).any()  # the clip is exercised, and not everywhere
        assert abs(adv[mask].mean()) < 1e-9 and adv[mask].std(ddof=1) == pytest.approx(1.0)
    np.testing.assert_allclose(buffer["rewards"].double().numpy(), rewards, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(buffer["advantages"].double().numpy(), adv, rtol=1e-4, atol=1e-4)


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
    log_q, log_p = (torch.log_softmax(model(input_ids=buffer["input_ids"], attention_mask=buffer["attention_mask"])
                                      .logits[:, :-1, : len(task_dm.tokenizer)], -1) for model in (student, teacher))
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)
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
