"""Privileged-context self-distillation (kd/privileged.py): what each model reads, where the
teacher's logits land, the frozen / EMA / live teacher, checkpoints, and refusals."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch

from kd import ConfigError, batches
from kd.build import build
from kd.cli import one_sentence_errors
from kd.data.lm import LMDataModule, encode_prompt
from kd.data.sources import TaskSource
from kd.data.tasks import RULES
from kd.divergences import ForwardKL
from kd.models import tiny_causal_lm
from kd.privileged import PrivilegedContext, SelfTeacher
from kd.regimes import OnPolicy
from kd.runs import train
from recipes.gkd import GKD

TINY = ["experiment=task_self_distill", "student_sft=null", "data.source.train_size=120", "data.source.val_size=8",
        "data.source.test_size=8", "data.vocab_size=300", "data.min_frequency=20", "data.generation_eval_size=4",
        "data.max_new_tokens=5", "data.batch_size=8", "student.hidden_size=32", "student.num_layers=1",
        "scratch_baseline=false", "trainer.limit_val_batches=0", "trainer.limit_test_batches=1"]


@pytest.fixture(scope="module")
def pdm():
    """The toy task whose batches carry the rule context for the teacher."""
    module = LMDataModule(TaskSource(train_size=48, val_size=8, test_size=8), vocab_size=300, batch_size=6,
                          max_length=64, max_new_tokens=5, privileged=PrivilegedContext("rule"))
    module.setup()
    return module


def _student(vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_causal_lm(vocab_size=vocab, hidden_size=32, num_layers=1)


def _recipe(pdm, mode: str, decay: float = 0.9) -> GKD:
    recipe = GKD(student=_student(len(pdm.tokenizer)), teacher=SelfTeacher(mode, decay), divergence=ForwardKL(),
                 regime=OnPolicy())
    recipe.set_vocabulary(len(pdm.tokenizer))
    return recipe


def _record_inputs(model: torch.nn.Module, seen: list) -> None:
    """The token ids every call of ``model`` embeds (whole model or, fused, its body)."""
    model.get_input_embeddings().register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))


def _responses(batch) -> list[list[int]]:
    """Each row's response tokens (after its prompt), read off the joined batch by hand."""
    out = []
    for ids, pm, am in zip(batch["input_ids"], batch["prompt_mask"], batch["attention_mask"]):
        out.append(ids[int(pm.sum()):int(am.sum())].tolist())
    return out


def test_the_teacher_reads_the_privileged_prompt_and_the_student_does_not(pdm):
    recipe = _recipe(pdm, "frozen")
    tok = pdm.tokenizer
    data = next(iter(pdm.train_dataloader()))
    batch = recipe.regime.batch(recipe.student, data, pdm)  # the student's own samples
    assert batches.PRIVILEGED_PROMPT_IDS in batch  # carried from the data batch into the sampled one
    student_seen, teacher_seen = [], []
    _record_inputs(recipe.student, student_seen)
    _record_inputs(recipe.teacher.copy, teacher_seen)
    recipe.compute_loss(batch)
    student_ids, teacher_ids = student_seen[-1], teacher_seen[-1]  # (a first call may probe the fused head)
    examples = [pdm.splits["train"].examples[i] for i in data["index"].tolist()]
    for r, (ex, response) in enumerate(zip(examples, _responses(batch))):
        plain = encode_prompt(tok, ex.prompt)
        hinted = encode_prompt(tok, f"{RULES[ex.skill]}\n{ex.prompt}")
        n, m = len(plain) + len(response), len(hinted) + len(response)
        assert student_ids[r, :n].tolist() == plain + response
        assert teacher_ids[r, :m].tolist() == hinted + response
        assert RULES[ex.skill] not in tok.decode(student_ids[r]) and RULES[ex.skill] in tok.decode(teacher_ids[r])


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "hidden states and head"])
def test_teacher_logits_are_realigned_to_the_student_response_positions(pdm, fused):
    """Against each row run alone on hand-built ids (privileged prompt + response, no padding)."""
    vocab = len(pdm.tokenizer)
    student = _student(vocab)
    torch.manual_seed(1)
    teacher = tiny_causal_lm(vocab_size=vocab, hidden_size=32, num_layers=1).eval()
    recipe = GKD(student=student, teacher=teacher, divergence=ForwardKL(), regime=OnPolicy())
    recipe.set_vocabulary(vocab)
    data = next(iter(pdm.train_dataloader()))
    batch = recipe.regime.batch(student, data, pdm)
    out = recipe.teacher_outputs(batch, fused=fused)
    assert isinstance(out.logits, batches.HeadLogits) == fused
    logits = out.logits.materialize() if fused else out.logits
    labels, mask = batches.batch_targets(batch)
    assert torch.equal(out.mask, mask) and torch.equal(out.labels, labels)
    for r, response in enumerate(_responses(batch)):
        hinted = batch[batches.PRIVILEGED_PROMPT_IDS][r][batch[batches.PRIVILEGED_PROMPT_MASK][r].bool()]
        ids = torch.cat([hinted, torch.tensor(response)])[None]
        with torch.no_grad():
            alone = teacher(input_ids=ids).logits[0, :, :vocab]
        want = alone[len(hinted) - 1: len(hinted) - 1 + len(response)]  # the logits predicting each response token
        got = logits[r][mask[r]]
        assert got.shape == want.shape and len(response) > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert labels[r][mask[r]].tolist() == response


def _fit(recipe: GKD, pdm, steps: int, callbacks=()) -> None:
    L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, callbacks=list(callbacks)).fit(recipe, datamodule=pdm)


class _StudentAfterStep(L.Callback):
    """The student's weights after every optimizer step."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self.weights.append({k: v.detach().clone() for k, v in module.student.named_parameters()})


def test_ema_teacher_follows_the_hand_computed_recurrence(pdm):
    recipe = _recipe(pdm, "ema", decay=0.8)
    start = {k: v.detach().clone() for k, v in recipe.student.named_parameters()}
    seen = _StudentAfterStep()
    _fit(recipe, pdm, 3, [seen])
    assert len(seen.weights) == 3
    for name, p in recipe.teacher.copy.named_parameters():
        want = start[name]
        for weights in seen.weights:  # theta_T <- 0.8 theta_T + 0.2 theta_S after each step
            want = 0.8 * want + 0.2 * weights[name]
        torch.testing.assert_close(p, want, rtol=1e-5, atol=1e-6)
        assert not p.requires_grad
    assert any(not torch.equal(seen.weights[-1][k], start[k]) for k in start)  # the student moved
    teacher = {id(q) for q in recipe.teacher.copy.parameters()}
    assert not any(id(p) in teacher for p in recipe.trainable_parameters())  # never in the optimizer


def test_frozen_teacher_never_changes(pdm):
    recipe = _recipe(pdm, "frozen")
    start = {k: v.detach().clone() for k, v in recipe.student.named_parameters()}
    _fit(recipe, pdm, 3)
    for name, p in recipe.teacher.copy.named_parameters():
        assert torch.equal(p, start[name]), name
    assert any(not torch.equal(p, start[k]) for k, p in recipe.student.named_parameters())


def test_live_teacher_is_the_current_student_without_gradient(pdm):
    recipe = _recipe(pdm, "live")
    assert list(recipe.teacher.parameters()) == []  # it owns no weights: it reads the student's
    batch = recipe.regime.batch(recipe.student, next(iter(pdm.train_dataloader())), pdm)
    with torch.no_grad():
        for p in recipe.student.parameters():  # any change of the student's weights is the teacher's
            p.add_(0.01 * torch.randn_like(p))
    view, shift = batches.privileged_view(batch)
    out = recipe.teacher_outputs(batch)
    by_hand = recipe.student(input_ids=view["input_ids"], attention_mask=view["attention_mask"]).logits
    by_hand = batches.realign(batches.Outputs(by_hand[:, :-1, :len(pdm.tokenizer)], *batches.batch_targets(view)),
                              shift, batch)
    assert by_hand.logits.requires_grad and not out.logits.requires_grad  # no gradient through the teacher
    mask = out.mask
    torch.testing.assert_close(out.logits[mask], by_hand.logits.detach()[mask])
    loss = recipe.compute_loss(batch)["loss"]
    loss.backward()
    assert all(p.grad is not None for p in recipe.student.parameters() if p.requires_grad)


def test_checkpoints_keep_the_ema_teacher_and_a_resumed_run_continues_it(make_cfg, tmp_path):
    overrides = [*TINY, "teacher.mode=ema", "teacher.ema_decay=0.5", "trainer.limit_train_batches=2"]
    first = train(make_cfg(*overrides, root=tmp_path / "first"))
    assert first["results"]
    last = tmp_path / "first" / "run" / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)["state_dict"]
    copy_keys = [k for k in state if k.startswith("teachers.models.teacher.copy.")]
    assert copy_keys and bool(state["teachers.models.teacher.started"])
    student = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
    teacher = {k[len("teachers.models.teacher.copy."):]: v for k, v in state.items() if k in copy_keys}
    assert any(not torch.equal(teacher[k], student[k]) for k in student)  # an EMA, not the student

    # resumed for a second epoch: the teacher starts from the checkpoint's copy, not from the student
    run = build(make_cfg(*overrides, "trainer.max_epochs=2", f"ckpt_path={last}", root=tmp_path / "resumed"))
    seen: dict[str, torch.Tensor] = {}

    class Peek(L.Callback):
        def on_train_start(self, trainer, module) -> None:
            seen.update({k: v.clone() for k, v in module.teacher.copy.state_dict().items()})

    run.trainer.callbacks.append(Peek())
    run.trainer.fit(run.recipe, datamodule=run.datamodule, ckpt_path=str(last))
    assert seen.keys() == teacher.keys()
    assert all(torch.equal(seen[k], teacher[k]) for k in teacher)


def test_a_frozen_teacher_survives_a_checkpoint_round_trip(pdm):
    recipe = _recipe(pdm, "frozen")
    recipe.teachers.start_from_student()
    checkpoint = {"state_dict": copy.deepcopy(recipe.state_dict())}
    recipe.on_save_checkpoint(checkpoint)
    assert any(k.startswith("teachers.models.teacher.copy.") for k in checkpoint["state_dict"])
    other = _recipe(pdm, "frozen")
    with torch.no_grad():
        for p in other.student.parameters():
            p.add_(1.0)  # a different student: start() must not copy it over the restored teacher
    other.on_load_checkpoint(checkpoint)
    other.load_state_dict(checkpoint["state_dict"])
    other.teachers.start_from_student()
    for (name, p), q in zip(other.teacher.copy.named_parameters(), recipe.teacher.copy.parameters()):
        assert torch.equal(p, q), name


def test_live_teacher_checkpoints_hold_no_teacher_weights(pdm):
    recipe = _recipe(pdm, "live")
    checkpoint = {"state_dict": dict(recipe.state_dict())}
    recipe.on_save_checkpoint(checkpoint)
    assert not [k for k in checkpoint["state_dict"] if k.startswith("teachers.")]


@pytest.mark.parametrize("overrides, sentence", [
    (["teacher.mode=average"], "teacher.mode must be one of frozen, ema, live (got 'average')"),
    (["teacher.mode=ema", "teacher.ema_decay=1.0"], "teacher.ema_decay must be in [0, 1) (got 1.0)"),
    (["teacher.context=hint"], "teacher.context must be one of rule, reference or null (got 'hint')"),
    (["regime=teacher_generated"], "regime=teacher_generated runs the teacher on the plain prompts before training"),
    (["teacher.rules={upper: write it in caps}"], "teacher.context=rule has no rule for skill 'reverse'"),
], ids=["mode", "ema decay", "context", "regime", "rule"])
def test_bad_settings_are_refused_in_one_sentence(make_cfg, overrides, sentence):
    cfg = make_cfg(*TINY, *overrides)
    with pytest.raises(ConfigError) as err:
        build(cfg)
    assert str(err.value).startswith(sentence) and str(err.value).count(". ") == 0


def test_a_context_on_classifier_data_is_refused(make_cfg):
    cfg = make_cfg("recipe=hinton", "teacher=self", "teacher.mode=frozen")
    with pytest.raises(ConfigError, match=r"^teacher.context=rule prepends a privileged context"):
        build(cfg, setup=False)


def test_the_cli_exits_with_code_2_and_one_sentence(make_cfg, capsys):
    cfg = make_cfg(*TINY, "teacher.mode=average")
    with pytest.raises(SystemExit) as done:
        one_sentence_errors("kd", train, cfg)
    assert done.value.code == 2
    [line] = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("kd: error:")]
    assert line == "kd: error: teacher.mode must be one of frozen, ema, live (got 'average')"


def test_an_unbound_self_teacher_says_how_to_use_it():
    with pytest.raises(ConfigError, match="binds it to its student"):
        SelfTeacher("live").network


def test_privileged_rows_survive_the_replay_buffer(pdm):
    from kd.regimes import ReplayBuffer

    batch = next(iter(pdm.train_dataloader()))
    buffer = ReplayBuffer(16)
    buffer.add(batch)
    replayed = buffer.sample(len(batch["index"]), torch.Generator().manual_seed(0), pdm.pad_token_id)
    rows = {tuple(p[m.bool()].tolist()): tuple(q[n.bool()].tolist()) for p, m, q, n in zip(
        batch["prompt_ids"], batch["prompt_mask"], batch[batches.PRIVILEGED_PROMPT_IDS],
        batch[batches.PRIVILEGED_PROMPT_MASK])}
    for p, m, q, n in zip(replayed["prompt_ids"], replayed["prompt_mask"], replayed[batches.PRIVILEGED_PROMPT_IDS],
                          replayed[batches.PRIVILEGED_PROMPT_MASK]):
        assert rows[tuple(p[m.bool()].tolist())] == tuple(q[n.bool()].tolist())


def test_privileged_train_shows_a_share_of_training_prompts_their_context():
    module = LMDataModule(TaskSource(train_size=40, val_size=8, test_size=8), vocab_size=300, max_length=64,
                          privileged_train={"context": "reference", "share": 0.5})
    module.setup()
    tok = module.tokenizer
    train = module.splits["train"]
    shown = [p == encode_prompt(tok, f"answer {ex.response}\n{ex.prompt}") for ex, (p, _) in
             zip(train.examples, train.encoded)]
    plain = [p == encode_prompt(tok, ex.prompt) for ex, (p, _) in zip(train.examples, train.encoded)]
    assert sum(shown) == 20 and all(a != b for a, b in zip(shown, plain))  # half each, nothing else
    for split in ("val", "test"):  # held-out prompts stay plain
        held = module.splits[split]
        assert all(p == encode_prompt(tok, ex.prompt) for ex, (p, _) in zip(held.examples, held.encoded))
    with pytest.raises(ConfigError, match=r"^data.privileged_train.share must be in \(0, 1\]"):
        LMDataModule(TaskSource(), privileged_train={"context": "rule", "share": 0})
    with pytest.raises(ConfigError, match=r"^data.privileged_train takes context, share, rules and template"):
        LMDataModule(TaskSource(), privileged_train={"share": 0.5})
