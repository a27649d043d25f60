"""Cross-stage self-distillation (docs/spec.md section 6) and routed teachers: the test
vectors, zero signal from a teacher equal to the student, each example seeing only its own
teacher, teachers frozen and out of the optimizer and checkpoints, and kd runs end to end."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf, open_dict

from kd import ConfigError
from kd.data import IGNORE_INDEX
from kd.data.lm import LMDataModule
from kd.data.sources import TaskSource
from kd.divergences import ForwardKL
from kd.models import tiny_causal_lm
from recipes.cross_stage import CrossStage, clipped_surrogate, token_advantages
from recipes.hinton import Hinton
from tests.conftest import SMALL_TASK

NO_TEACHER = [o for o in SMALL_TASK if not o.startswith("teacher")]


class _FixedPolicy(torch.nn.Module):
    """A "language model" whose next-token distribution is softmax(logits) at every
    position, whatever the input: the RECIPES section 6 vectors as a model kd can call."""

    def __init__(self, probs):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(probs, dtype=torch.float64).log())

    def forward(self, input_ids, attention_mask=None, **kwargs):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1))


def _sampled(action, sample_logprob):
    """One replayed row: a prompt token, then the sampled token ``action``."""
    return {"input_ids": torch.tensor([[0, action]]), "attention_mask": torch.ones(1, 2, dtype=torch.long),
            "labels": torch.tensor([[IGNORE_INDEX, action]]),
            "sample_logprobs": torch.tensor([[sample_logprob]], dtype=torch.float64)}


def test_advantages_and_reverse_kl_test_vectors():
    """RECIPES section 6 through CrossStage.distill_loss: pi_theta = [.5, .5], pi_T = [.9, .1]
    give A = [0.587787, -1.609438] on the two tokens, the dense estimator's loss is
    RKL = 0.510826, and the sampled estimator's expected gradient
    sum_a pi(a) (-A_a) grad log pi(a) is [-0.549306, 0.549306] (= grad RKL)."""
    hand_a = [0.587787, -1.609438]
    student = _FixedPolicy([0.5, 0.5])
    sampled = CrossStage(student=student, teacher=_FixedPolicy([0.9, 0.1]), estimator="sampled")
    dense = CrossStage(student=student, teacher=_FixedPolicy([0.9, 0.1]), estimator="dense")
    expected_grad = torch.zeros(2, dtype=torch.float64)
    for action in (0, 1):
        loss, stats = sampled.distill_loss(_sampled(action, float(torch.tensor(0.5).log())))
        assert stats["teacher/advantage"].item() == pytest.approx(hand_a[action], abs=1e-6)
        assert stats["teacher/reverse_kl"].item() == pytest.approx(-hand_a[action], abs=1e-6)
        assert loss.item() == pytest.approx(-hand_a[action], abs=1e-6)  # rho = 1: -A
        (grad,) = torch.autograd.grad(loss, student.logits)
        expected_grad += 0.5 * grad
        rkl, _ = dense.distill_loss(_sampled(action, 0.0))
        assert rkl.item() == pytest.approx(0.510826, abs=1e-6)  # the same for either sampled token
        (dense_grad,) = torch.autograd.grad(rkl, student.logits)
        torch.testing.assert_close(dense_grad, torch.tensor([-0.549306, 0.549306], dtype=torch.float64),
                                   atol=1e-6, rtol=0)
    torch.testing.assert_close(expected_grad, torch.tensor([-0.549306, 0.549306], dtype=torch.float64),
                               atol=1e-6, rtol=0)
    # the average of -A over the two tokens under pi_theta is the reverse KL too
    assert 0.5 * (-hand_a[0] - hand_a[1]) == pytest.approx(0.510826, abs=1e-6)


def test_the_surrogates_expected_gradient_is_the_reverse_kl_gradient():
    """sum_a pi(a) * grad l(a) with l the clipped surrogate at the sampling policy (rho = 1)
    equals grad KL(pi_theta || pi_T) = [-0.549306, 0.549306] for pi_theta = [.5, .5]."""
    logits = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([0.9, 0.1], dtype=torch.float64).log()
    expected = torch.zeros(2, dtype=torch.float64)
    for action in range(2):
        logp = torch.log_softmax(logits, -1)
        advantage = token_advantages(logp[action], teacher[action])
        loss = clipped_surrogate(logp[action], logp[action].detach(), advantage)
        (grad,) = torch.autograd.grad(loss, logits)
        expected += torch.softmax(logits, -1).detach()[action] * grad
    torch.testing.assert_close(expected, torch.tensor([-0.549306, 0.549306], dtype=torch.float64), atol=1e-6, rtol=0)
    dense = (torch.softmax(logits, -1) * (torch.log_softmax(logits, -1) - teacher)).sum()
    (dense_grad,) = torch.autograd.grad(dense, logits)
    torch.testing.assert_close(expected, dense_grad)


@pytest.fixture(scope="module")
def routed_dm():
    """Task data whose 'upper' and 'reverse' examples belong to two earlier stages'
    teachers and whose 'sort'/'count' examples are the current stage's."""
    dm = LMDataModule(TaskSource(train_size=80, val_size=8, test_size=8), vocab_size=300, batch_size=16,
                      max_length=48, max_new_tokens=5, routes={"upper": "stage_a", "reverse": "stage_b"})
    dm.setup()
    return dm


def _batch(dm):
    from kd.data.lm import collate_train

    split = dm.splits["train"]
    return collate_train([split[i] for i in range(16)], dm.pad_token_id)


def _model(seed, vocab):
    torch.manual_seed(seed)
    model = tiny_causal_lm(vocab_size=vocab, hidden_size=32, num_layers=1)
    with torch.no_grad():  # sharper than an untrained model, so teachers really differ
        model.lm_head.weight.mul_(20)
    return model


def test_batches_carry_each_examples_teacher(routed_dm):
    batch = _batch(routed_dm)
    split = routed_dm.splits["train"]
    expected = [{"upper": 0, "reverse": 1}.get(split.examples[i].skill, -1) for i in range(16)]
    assert batch["teacher_index"].tolist() == expected
    assert {0, 1, -1} <= set(expected)


def test_each_example_sees_only_its_own_teacher(routed_dm):
    """Hinton on routed teachers: the soft term equals the token-weighted combination of the
    soft terms each teacher gives on its own rows alone; no row sees the other teacher."""
    V = len(routed_dm.tokenizer)
    batch = _batch(routed_dm)
    student, a, b = _model(0, V), _model(1, V), _model(2, V)
    routed = Hinton(student=student, teacher={"stage_a": a, "stage_b": b}, divergence=ForwardKL(), lam=1.0,
                    temperature=1.0)
    routed.set_vocabulary(V)
    logits = routed.teacher_outputs(batch).logits
    total, tokens = 0.0, 0
    for k, teacher in enumerate((a, b)):
        rows = (batch["teacher_index"] == k).nonzero().squeeze(-1)
        part = {key: v[rows] for key, v in batch.items()}
        with torch.no_grad():
            own = teacher(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits[:, :-1, :V]
        torch.testing.assert_close(logits[rows], own)
        alone = Hinton(student=student, teacher=teacher, divergence=ForwardKL(), lam=1.0, temperature=1.0)
        alone.set_vocabulary(V)
        n = int((part["labels"][:, 1:] != IGNORE_INDEX).sum())
        total += alone.compute_loss(part)["soft_kd"].item() * n
        tokens += n
    assert routed.compute_loss(batch)["soft_kd"].item() == pytest.approx(total / tokens, rel=1e-5)


def _attached(recipe, dm):
    import lightning as L

    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=1)
    recipe.trainer = trainer
    trainer.datamodule = dm
    return recipe


def test_a_teacher_equal_to_the_student_gives_zero_advantage_and_gradient(routed_dm):
    V = len(routed_dm.tokenizer)
    student = _model(3, V)
    for estimator in ("sampled", "dense"):
        recipe = _attached(CrossStage(student=student, teacher={"stage_a": copy.deepcopy(student),
                                                                "stage_b": copy.deepcopy(student)},
                                      stage_weight=0.0, estimator=estimator), routed_dm)
        recipe.set_vocabulary(V)
        terms = recipe.compute_loss(_batch(routed_dm))
        assert abs(terms["stage_a/advantage"].item()) < 1e-5 and abs(terms["stage_b/advantage"].item()) < 1e-5
        grads = torch.autograd.grad(terms["loss"], [p for p in student.parameters()], allow_unused=True)
        assert all(g is None or g.abs().max() < 1e-5 for g in grads), estimator


def test_stage_rows_get_sft_and_replayed_rows_get_their_teachers_signal(routed_dm):
    V = len(routed_dm.tokenizer)
    batch = _batch(routed_dm)
    student = _model(4, V)
    recipe = _attached(CrossStage(student=student, teacher={"stage_a": _model(5, V), "stage_b": _model(6, V)},
                                  lam=0.0), routed_dm)
    recipe.set_vocabulary(V)
    stage = batch["teacher_index"] < 0
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1, :V]
    labels = batch["labels"][:, 1:].clone()
    labels[~stage] = IGNORE_INDEX
    expected = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    assert recipe.compute_loss(batch)["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    # the distillation term reports each teacher's tokens separately
    recipe.lam = 1.0
    terms = recipe.compute_loss(batch)
    assert terms["stage_a/tokens"] > 0 and terms["stage_b/tokens"] > 0 and "distill" in terms


def test_routed_teachers_are_frozen_and_out_of_the_optimizer_and_checkpoints(routed_dm):
    V = len(routed_dm.tokenizer)
    recipe = CrossStage(student=_model(7, V), teacher={"stage_a": _model(8, V), "stage_b": _model(9, V)})
    trainable = {id(p) for p in recipe.trainable_parameters()}
    for _, teacher in recipe.teachers.items():
        assert all(not p.requires_grad and id(p) not in trainable for p in teacher.parameters())
    recipe.train()
    assert all(not t.training for _, t in recipe.teachers.items())
    checkpoint = {"state_dict": recipe.state_dict()}
    recipe.on_save_checkpoint(checkpoint)
    assert not any(k.startswith(("teacher.", "teachers.")) for k in checkpoint["state_dict"])
    assert any(k.startswith("student.") for k in checkpoint["state_dict"])
    with pytest.raises(ConfigError, match="recipe.estimator must be one of"):
        CrossStage(student=_model(0, V), teacher=_model(1, V), estimator="grpo")


def test_kd_runs_cross_stage_with_routed_teachers_end_to_end(make_cfg, tmp_path):
    from kd.runs import train

    teacher = {"model": {"_target_": "kd.models.tiny_causal_lm", "vocab_size": "${data.vocab_size}",
                         "hidden_size": 32, "num_layers": 1, "max_position_embeddings": "${data.max_length}"},
               "fit": {"max_epochs": 1, "seed": 0, "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True,
                                                                 "lr": 1e-3}}}
    teachers = {"stage_a": {**teacher, "fit": {**teacher["fit"], "data": {"train_skills": ["upper"]}}},
                "stage_b": {**teacher, "fit": {**teacher["fit"], "data": {"train_skills": ["reverse"]}}}}

    def with_teachers(cfg):  # what an experiment yaml with a teachers: section composes to
        with open_dict(cfg):
            cfg.teachers = OmegaConf.create(teachers)
        return cfg

    cfg = with_teachers(make_cfg(*NO_TEACHER, "recipe=cross_stage", "teacher=none",
                                 "data.routes={upper: stage_a, reverse: stage_b}", "recipe.sampling.max_new_tokens=4",
                                 "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                                 "data.generation_eval_size=4", "scratch_baseline=false"))
    summary = train(cfg)
    assert set(summary["results"]) == {"teacher stage_a", "teacher stage_b", "student, cross_stage"}
    assert set(summary["teacher"]) == {"stage_a", "stage_b"}
    cached = sorted(p.name.split("-")[0] for p in (tmp_path / "cache" / "teachers").iterdir())
    assert cached == ["stage_a", "stage_b"]  # each teacher trained once on its own stage's data
    with pytest.raises(ConfigError, match="nothing routes examples to them"):
        train(with_teachers(make_cfg(*NO_TEACHER, "recipe=cross_stage", "teacher=none", root=tmp_path / "unrouted")))


# ----------------------------------------------------------------------------- the GRPO stage objective


def test_group_normalised_advantages_by_hand():
    from recipes.cross_stage import group_advantages

    got = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]))
    half = 0.5 / (0.5773503 + 1e-4)  # mean .5, unbiased std sqrt(1/3)
    torch.testing.assert_close(got, torch.tensor([[half, -half, -half, half], [0.0, 0.0, 0.0, 0.0]]))


def test_exact_match_rewards_compare_decoded_text(routed_dm):
    from recipes.cross_stage import exact_match_rewards

    tok = routed_dm.tokenizer
    reference = tok("abc", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    same_text_other_ids = tok(" abc ", add_special_tokens=False)["input_ids"]
    wrong = tok("abd", add_special_tokens=False)["input_ids"]
    rewards = exact_match_rewards(tok, [reference, same_text_other_ids, wrong], [reference] * 3)
    assert rewards.tolist() == [1.0, 1.0, 0.0]


def test_grpo_gradient_is_minus_the_advantage_weighted_log_likelihood(routed_dm, monkeypatch):
    """At the sampling policy (temperature 1, one update) the clipped surrogate's gradient is
    -sum_t A_seq * grad log pi(y_t) / tokens; the rewards are fixed so advantages differ."""
    V = len(routed_dm.tokenizer)
    student = _model(10, V)
    recipe = _attached(CrossStage(student=student, teacher=_model(11, V), lam=0.0, stage_objective="grpo",
                                  group_size=2, sampling={"max_new_tokens": 4}), routed_dm)
    recipe.set_vocabulary(V)
    monkeypatch.setattr(recipe, "rewards", lambda samples, refs: torch.tensor([1.0, 0.0] * (len(samples) // 2)))
    batch = _batch(routed_dm)
    rows = torch.arange(4)
    sampled = recipe.grpo_rollout(batch, rows)
    assert sampled["advantages"].tolist() == pytest.approx([0.70706, -0.70706] * 4, abs=1e-4)
    loss = recipe.grpo_loss(sampled)
    (grad,) = torch.autograd.grad(loss, [student.lm_head.weight])
    logits = student(input_ids=sampled["input_ids"], attention_mask=sampled["attention_mask"]).logits[:, :-1, :V]
    labels = sampled["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    by_hand = -(sampled["advantages"].unsqueeze(-1) * logp)[mask].sum() / mask.sum()
    (expected,) = torch.autograd.grad(by_hand, [student.lm_head.weight])
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


def test_grpo_with_equal_rewards_has_no_gradient(routed_dm):
    V = len(routed_dm.tokenizer)
    student = _model(12, V)
    recipe = _attached(CrossStage(student=student, teacher={"stage_a": _model(13, V), "stage_b": _model(14, V)},
                                  lam=0.0, stage_objective="grpo", group_size=3, sampling={"max_new_tokens": 3}),
                       routed_dm)
    recipe.set_vocabulary(V)
    terms = recipe.compute_loss(_batch(routed_dm))
    assert terms["stage_reward"].item() == 0.0  # an untrained student answers nothing right: one reward
    grads = torch.autograd.grad(terms["loss"], [p for p in student.parameters()], allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in grads)
    with pytest.raises(ConfigError, match="group_size must be >= 2"):
        CrossStage(student=student, teacher=_model(1, V), stage_objective="grpo", group_size=1)


def test_self_distillation_trains_on_the_best_rewarded_sample_of_each_prompt(routed_dm, monkeypatch):
    """GLM-4.5's iterative self-distillation: of each prompt's samples keep the first with the
    highest reward when any is rewarded, and train cross-entropy on those samples only."""
    V = len(routed_dm.tokenizer)
    student = _model(15, V)
    recipe = _attached(CrossStage(student=student, teacher=_model(16, V), lam=0.0, stage_objective="self_distill",
                                  group_size=2, sampling={"max_new_tokens": 4}), routed_dm)
    recipe.set_vocabulary(V)
    # prompt 0: second sample rewarded; prompt 1: none; prompt 2: both (the first is kept)
    monkeypatch.setattr(recipe, "rewards", lambda samples, refs: torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0, 1.0]))
    sampled = recipe.grpo_rollout(_batch(routed_dm), torch.arange(3))
    loss, kept = recipe.self_distill_loss(sampled)
    assert kept.item() == pytest.approx(2 / 3)
    rows = torch.tensor([1, 4])
    logits = student(input_ids=sampled["input_ids"][rows], attention_mask=sampled["attention_mask"][rows]).logits
    labels = sampled["labels"][rows][:, 1:]
    expected = F.cross_entropy(logits[:, :-1, :V].reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    # float32, a loss near 0: lse - z_y (fused) and log_softmax (dense) round differently, ~1e-7 absolute
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    monkeypatch.setattr(recipe, "rewards", lambda samples, refs: torch.zeros(len(samples)))
    nothing, kept = recipe.self_distill_loss(recipe.grpo_rollout(_batch(routed_dm), torch.arange(3)))
    assert nothing.item() == 0.0 and kept.item() == 0.0


def test_routed_teachers_on_another_tokenizer_are_refused_before_training(make_cfg, tmp_path):
    from kd.build import build

    teacher = {"model": {"_target_": "kd.models.tiny_causal_lm", "vocab_size": 300, "hidden_size": 32,
                         "num_layers": 1},
               "fit": {"max_epochs": 1, "seed": 0, "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True}}}
    other = {**teacher, "fit": {**teacher["fit"], "data": {"vocab_size": 280, "train_skills": ["reverse"]}}}
    cfg = make_cfg(*NO_TEACHER, "recipe=cross_stage", "teacher=none", "data.routes={upper: same, reverse: other}")
    with open_dict(cfg):
        cfg.teachers = OmegaConf.create({"same": {**teacher, "fit": {**teacher["fit"], "data": {"train_skills": ["upper"]}}},
                                         "other": other})
    with pytest.raises(ConfigError, match="the data's and teacher other's tokenizers differ"):
        build(cfg)
    assert not (tmp_path / "cache" / "teachers").exists()


def test_a_batch_without_routed_rows_gets_zero_teacher_logits_of_the_right_shape(routed_dm):
    V = len(routed_dm.tokenizer)
    batch = _batch(routed_dm)
    stage_rows = (batch["teacher_index"] < 0).nonzero().squeeze(-1)
    part = {k: v[stage_rows] for k, v in batch.items()}
    student = _model(17, V)
    recipe = Hinton(student=student, teacher={"stage_a": _model(18, V), "stage_b": _model(19, V)},
                    divergence=ForwardKL(), lam=1.0, temperature=1.0)
    recipe.set_vocabulary(V)
    teacher = recipe.teacher_outputs(part)
    assert teacher.logits.shape == recipe.outputs(student, part).logits.shape and not teacher.mask.any()


def test_routed_teachers_with_a_teacher_generated_regime_are_refused_at_build(make_cfg):
    from kd.build import build

    cfg = make_cfg(*NO_TEACHER, "recipe=hinton", "teacher=none", "regime=teacher_generated",
                   "data.routes={upper: a}")
    with open_dict(cfg):
        cfg.teachers = OmegaConf.create({"a": {"model": {"_target_": "kd.models.tiny_causal_lm", "vocab_size": 300,
                                                         "hidden_size": 32, "num_layers": 1}}})
    with pytest.raises(ConfigError, match="generates data with one teacher, not with routed teachers"):
        build(cfg, setup=False)


# ----------------------------------------------------------------------------- a reward the RL stage earns


def test_similarity_rewards_by_hand(routed_dm):
    from recipes.cross_stage import edit_distance, similarity_rewards

    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "abc") == 3 and edit_distance("ab", "ab") == 0
    tok = routed_dm.tokenizer

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    reference = ids("abcd") + [tok.eos_token_id]
    rewards = similarity_rewards(tok, [ids("abxd"), ids(" abcd "), ids("ab"), ids("zzzz"), []], [reference] * 5)
    # 1 - 1/4, equal text, 1 - 2/4, nothing shared, empty against 4 characters
    assert rewards.tolist() == pytest.approx([0.75, 1.0, 0.5, 0.0, 0.0])


def test_grpo_with_the_dense_reward_earns_more_at_the_end_than_at_the_start(routed_dm):
    """An untrained student never answers exactly (every exact-match reward 0, no signal);
    with the similarity reward the same GRPO stage's reward rises: the mean of its last 10
    batches is well above that of its first 10 (seeded, so the run is the same every time)."""
    import itertools

    from kd.data.lm import collate_train

    V = len(routed_dm.tokenizer)
    torch.manual_seed(0)
    student = tiny_causal_lm(vocab_size=V, hidden_size=32, num_layers=1)
    recipe = _attached(CrossStage(student=student, lam=0.0, stage_objective="grpo", reward="similarity",
                                  reward_window=10, group_size=4, sampling={"max_new_tokens": 5}), routed_dm)
    recipe.set_vocabulary(V)
    split = routed_dm.splits["train"]
    first = collate_train([split[i] for i in range(16)], routed_dm.pad_token_id)
    recipe.reward = "exact"
    assert recipe.compute_loss(first)["stage_reward"].item() == 0.0  # in eval mode: not recorded
    recipe.reward = "similarity"
    recipe.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    rows = itertools.cycle(range(len(split)))
    for step in range(80):
        batch = collate_train([split[next(rows)] for _ in range(8)], routed_dm.pad_token_id)
        terms = recipe.compute_loss(batch)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
    rewards = recipe.stage_rewards()
    assert rewards["stage_reward"] > 2 * rewards["stage_reward_start"] > 0
    assert rewards["stage_reward"] == pytest.approx(sum(list(recipe._last_rewards)) / 10)
    with pytest.raises(ConfigError, match="recipe.reward must be one of"):
        CrossStage(student=student, reward="bleu")


# ----------------------------------------------------------------------------- the replay-with-SFT control


def test_the_replay_sft_control_trains_the_replayed_rows_on_the_dataset_answers_without_a_teacher(routed_dm,
                                                                                                  monkeypatch):
    V = len(routed_dm.tokenizer)
    batch = _batch(routed_dm)
    student = _model(20, V)
    teachers = {"stage_a": _model(21, V), "stage_b": _model(22, V)}
    recipe = _attached(CrossStage(student=student, teacher=teachers, replay="sft", stage_weight=0.0), routed_dm)
    recipe.set_vocabulary(V)
    for teacher in teachers.values():  # the control never runs a teacher ...
        monkeypatch.setattr(teacher, "forward", lambda *a, **k: pytest.fail("the control ran a teacher"))
    monkeypatch.setattr(recipe.rollouts, "generate", lambda *a, **k: pytest.fail("the control sampled"))  # ... nor samples

    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1, :V]
    logp = torch.log_softmax(logits.double(), -1)
    labels = batch["labels"][:, 1:]

    def by_hand(rows):  # mean -log p(answer token) over the answer tokens of rows
        total, n = 0.0, 0
        for r in rows:
            for t in range(labels.shape[1]):
                if labels[r, t] != IGNORE_INDEX:
                    total -= logp[r, t, labels[r, t]].item()
                    n += 1
        return total / n

    replayed = (batch["teacher_index"] >= 0).nonzero().squeeze(-1).tolist()
    stage = (batch["teacher_index"] < 0).nonzero().squeeze(-1).tolist()
    terms = recipe.compute_loss(batch)
    assert terms["replay_ce"].item() == pytest.approx(by_hand(replayed), rel=1e-5)
    assert terms["loss"].item() == pytest.approx(by_hand(replayed), rel=1e-5)
    assert not any(k.endswith("/advantage") or k == "distill" for k in terms)
    recipe.stage_weight, recipe.lam = 1.0, 0.5  # the stage's SFT rows plus lam times the replayed rows' CE
    terms = recipe.compute_loss(batch)
    assert terms["loss"].item() == pytest.approx(by_hand(stage) + 0.5 * by_hand(replayed), rel=1e-5)
    with pytest.raises(ConfigError, match="recipe.replay must be one of"):
        CrossStage(student=student, teacher=teachers, replay="teacher")


# ----------------------------------------------------------------------------- each routed teacher's KL in validation


def test_validation_reports_each_routed_teachers_kl_on_its_own_rows(routed_dm):
    """val/teacher_kl/<teacher>: KL(p_T || p_S) averaged over the answer tokens of the rows
    routed to that teacher, accumulated over batches, against a plain computation."""
    V = len(routed_dm.tokenizer)
    batch = _batch(routed_dm)
    student, a, b = _model(23, V), _model(24, V), _model(25, V)
    recipe = CrossStage(student=student, teacher={"stage_a": a, "stage_b": b})
    recipe.set_vocabulary(V)
    recipe.eval()
    halves = [{k: v[:7] for k, v in batch.items()}, {k: v[7:] for k, v in batch.items()}]  # two val batches
    for half in halves:
        recipe._eval_step("val", half)
    got = recipe.metrics["val"].compute()
    labels = batch["labels"][:, 1:]
    with torch.no_grad():
        log_q = torch.log_softmax(student(input_ids=batch["input_ids"]).logits[:, :-1, :V].double(), -1)
        for k, (name, teacher) in enumerate((("stage_a", a), ("stage_b", b))):
            log_p = torch.log_softmax(teacher(input_ids=batch["input_ids"]).logits[:, :-1, :V].double(), -1)
            values = [(log_p[r, t].exp() * (log_p[r, t] - log_q[r, t])).sum().item()
                      for r in range(len(labels)) if batch["teacher_index"][r] == k
                      for t in range(labels.shape[1]) if labels[r, t] != IGNORE_INDEX]
            assert got[f"teacher_kl/{name}"].item() == pytest.approx(sum(values) / len(values), rel=1e-4)
    assert got["teacher_kl/stage_a"].item() != pytest.approx(got["teacher_kl/stage_b"].item(), rel=1e-3)
    assert "kl_to_teacher" not in got  # no single teacher: no KL over every row
    recipe.metrics["val"].reset()
    only_stage_rows = {k: v[batch["teacher_index"] < 0] for k, v in batch.items()}
    recipe._eval_step("val", only_stage_rows)
    assert not any(k.startswith("teacher_kl/") for k in recipe.metrics["val"].compute())
