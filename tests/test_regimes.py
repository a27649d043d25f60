"""Data regimes (offline, teacher-generated with its cache, on-policy, mixed) and the
sequence-level KD recipe, against docs/spec.md section 3."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from kd import ConfigError
from kd.runs import train as run
from kd.data import IGNORE_INDEX
from kd.data.lm import LMDataModule
from kd.evaluation import cross_entropy
from kd.batches import join_prompts_and_responses
from kd.generation import GenerationConfig, generate
from kd.models import freeze, tiny_causal_lm
from kd.regimes import (
    Mixed,
    OnPolicy,
    TeacherGenerated,
    closest_to_reference,
    sentence_bleu,
)
from recipes.seqkd import SeqKD
from tests.conftest import SMALL_TASK


def fresh_dm(dm):
    """The same data with its own copy of the encoded responses (regimes rewrite them)."""
    clone = LMDataModule(dm.source, vocab_size=300, batch_size=8, max_length=48, max_new_tokens=6)
    clone.tokenizer = dm.tokenizer
    clone.setup()
    return clone


def model(seed, vocab=300):
    torch.manual_seed(seed)
    return tiny_causal_lm(vocab_size=vocab, hidden_size=32, num_layers=1).eval()


# ----------------------------------------------------------------------------- helpers


def test_join_prompts_and_responses_layout():
    prompts = torch.tensor([[0, 5, 6], [7, 8, 9]])
    pmask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    responses = torch.tensor([[3, 4, 0], [2, 0, 0]])
    rmask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = join_prompts_and_responses(prompts, pmask, responses, rmask, pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 3, 4], [7, 8, 9, 2]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 3, 4], [IGNORE_INDEX] * 3 + [2]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]


def test_sentence_bleu_by_hand():
    assert sentence_bleu("a b c d", "a b c d") == 1.0
    assert sentence_bleu("x y", "a b") == 0.0
    # order 3; p1 = 3/3; p2 = (2+1)/(2+1); p3 = (1+1)/(1+1); brevity exp(1 - 4/3)
    assert sentence_bleu("the cat sat", "the cat sat on") == pytest.approx(math.exp(-1 / 3), abs=1e-9)


def test_seq_inter_picks_the_reference_when_it_is_among_the_candidates():
    assert closest_to_reference(["12", "1560", "156"], "1560") == 1
    assert closest_to_reference(["a b c", "a b x", "a b c d"], "a b c d") == 2


# ----------------------------------------------------------------------------- teacher generated


def test_teacher_generated_replaces_responses_with_greedy_teacher_outputs_and_caches_them(dm, tmp_path, monkeypatch):
    teacher = freeze(model(1))
    data = fresh_dm(dm)
    regime = TeacherGenerated(cache_dir=str(tmp_path), sampling={"temperature": 0.0}, batch_size=16)
    regime.prepare(teacher, data)
    # independent: greedy-generate the first prompts directly
    from kd.data.lm import collate_prompts

    items = [data.splits["train"][i] for i in range(4)]
    prompts = collate_prompts(items, data.pad_token_id)
    config = GenerationConfig(max_new_tokens=6, temperature=0.0, eos_token_id=data.tokenizer.eos_token_id,
                              pad_token_id=data.pad_token_id)
    out = generate(teacher, prompts["prompt_ids"], prompts["prompt_mask"], config)
    for i in range(4):
        expected = out.responses[i][out.response_mask[i]].tolist()
        assert data.splits["train"].encoded[i][1] == expected
    manifest = json.loads((regime.path / "entry.json").read_text())
    assert manifest["info"]["count"] == len(data.splits["train"])

    # a second run reuses the cache without generating
    monkeypatch.setattr(TeacherGenerated, "generate_responses", lambda *a: pytest.fail("regenerated"))
    again = fresh_dm(dm)
    TeacherGenerated(cache_dir=str(tmp_path), sampling={"temperature": 0.0}, batch_size=16).prepare(teacher, again)
    assert again.splits["train"].encoded == data.splits["train"].encoded


def test_teacher_generated_cache_is_keyed_and_broken_entries_are_rebuilt(dm, tmp_path):
    teacher = freeze(model(1))
    regime = TeacherGenerated(cache_dir=str(tmp_path), sampling={"temperature": 0.0})
    key = regime.key(teacher, dm)
    assert TeacherGenerated(cache_dir=str(tmp_path), sampling={"temperature": 0.5}).key(teacher, dm) != key
    other = freeze(model(2))
    assert regime.key(other, dm) != key  # another teacher, another entry

    data = fresh_dm(dm)
    regime.prepare(teacher, data)
    good = [r for _, r in data.splits["train"].encoded]
    calls = []
    original = TeacherGenerated.generate_responses

    def counting(self, *args):
        calls.append(1)
        return original(self, *args)

    for breakage in ("truncate", "foreign", "ids"):
        if breakage == "ids":  # a consistent entry holding ids the tokenizer does not have
            bad = [[*r, len(dm.tokenizer) + 5] for r in good]
            torch.save(bad, regime.path / "responses.pt")
            from kd.cache import file_sha256

            meta = json.loads((regime.path / "entry.json").read_text())
            meta["files"]["responses.pt"] = {"size": (regime.path / "responses.pt").stat().st_size,
                                             "sha256": file_sha256(regime.path / "responses.pt")}
            (regime.path / "entry.json").write_text(json.dumps(meta))
        elif breakage == "truncate":
            blob = (regime.path / "responses.pt").read_bytes()
            (regime.path / "responses.pt").write_bytes(blob[: len(blob) // 2])
        else:
            meta = json.loads((regime.path / "entry.json").read_text())
            (regime.path / "entry.json").write_text(json.dumps({**meta, "name": "someone-else"}))
        data = fresh_dm(dm)
        fresh = TeacherGenerated(cache_dir=str(tmp_path), sampling={"temperature": 0.0})
        fresh.generate_responses = counting.__get__(fresh)
        fresh.prepare(teacher, data)
        assert [r for _, r in data.splits["train"].encoded] == good
    assert len(calls) == 3  # each broken entry was rebuilt, never used


# ----------------------------------------------------------------------------- on-policy / mixed


def _student_grads(recipe, batch):
    """Gradient of the recipe's loss on ``batch`` with respect to every student parameter."""
    params = list(recipe.student.parameters())
    return torch.autograd.grad(recipe.compute_loss(batch)["loss"], params)


def test_on_policy_batch_is_the_students_own_greedy_output_without_gradient(dm):
    from recipes.supervised import Supervised

    student = model(3)
    batch = next(iter(dm.train_dataloader()))
    regime = OnPolicy(sampling={"temperature": 0.0})
    out = regime.batch(student, batch, dm)
    gen = generate(student, batch["prompt_ids"], batch["prompt_mask"],
                   GenerationConfig(max_new_tokens=6, temperature=0.0, eos_token_id=dm.tokenizer.eos_token_id,
                                    pad_token_id=dm.pad_token_id))
    for row in range(len(out["labels"])):
        labels = out["labels"][row]
        assert labels[labels != IGNORE_INDEX].tolist() == gen.responses[row][gen.response_mask[row]].tolist()
        prompt = batch["prompt_ids"][row][batch["prompt_mask"][row] == 1]
        assert out["input_ids"][row][: len(prompt)].tolist() == prompt.tolist()
    # no autograd graph reaches the sampling: token ids (not a relaxation of them), outside any graph and not
    # inference-mode tensors (those could not be used in a training step's backward) ...
    for key in ("input_ids", "attention_mask", "labels"):
        assert out[key].dtype == torch.long and out[key].grad_fn is None and not out[key].is_inference(), key
    assert all(p.requires_grad for p in student.parameters())  # sampling leaves the student trainable
    # ... and the loss's gradient on the sampled batch is the gradient on the same sequences given as fixed data:
    # a detached copy, and the batch built here by hand from the independent greedy generation
    rows = [(batch["prompt_ids"][r][batch["prompt_mask"][r] == 1].tolist(),
             gen.responses[r][gen.response_mask[r]].tolist()) for r in range(len(gen.responses))]
    width = max(len(p) + len(a) for p, a in rows)
    by_hand = {"input_ids": torch.full((len(rows), width), dm.pad_token_id),
               "attention_mask": torch.zeros(len(rows), width, dtype=torch.long),
               "labels": torch.full((len(rows), width), IGNORE_INDEX)}
    for r, (p, a) in enumerate(rows):
        by_hand["input_ids"][r, : len(p) + len(a)] = torch.tensor(p + a)
        by_hand["attention_mask"][r, : len(p) + len(a)] = 1
        by_hand["labels"][r, len(p) : len(p) + len(a)] = torch.tensor(a)
    for key, value in by_hand.items():
        assert torch.equal(out[key], value), key
    recipe = Supervised(student=student)
    recipe.set_vocabulary(len(dm.tokenizer))
    sampled = _student_grads(recipe, out)
    fixed = {k: out[k].detach().clone() for k in ("input_ids", "attention_mask", "labels")}
    assert any(g.abs().sum() > 0 for g in sampled)
    for grads in (_student_grads(recipe, fixed), _student_grads(recipe, by_hand)):
        assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(sampled, grads))


def test_mixed_flips_a_seeded_coin_per_batch(dm):
    batch = next(iter(dm.train_dataloader()))
    student = model(3)
    greedy = {"temperature": 0.0}
    assert all(Mixed(lmbda=0.0).batch(student, batch, dm) is batch for _ in range(5))
    assert all(Mixed(lmbda=1.0, sampling=greedy).batch(student, batch, dm) is not batch for _ in range(3))
    # an on-policy batch is the student's own sample (here greedy: exactly OnPolicy's batch), not a copy
    on_policy = OnPolicy(sampling=greedy).batch(student, batch, dm)
    mixed = Mixed(lmbda=1.0, sampling=greedy).batch(student, batch, dm)
    assert not torch.equal(on_policy["labels"], batch["labels"])
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(mixed[key], on_policy[key]), key

    def schedule(regime, n=40):
        """Which of n batches were replaced by student samples (an off-policy batch is the batch itself)."""
        return [regime.batch(student, batch, dm) is not batch for _ in range(n)]

    half = Mixed(lmbda=0.5, seed=7, sampling=greedy)
    flips = schedule(half)
    assert 10 <= half.on_policy_batches <= 30 and half.batches == 40
    assert sum(flips) == half.on_policy_batches  # the counter counts the batches really replaced
    again = Mixed(lmbda=0.5, seed=7, sampling=greedy)
    assert schedule(again) == flips and again.on_policy_batches == half.on_policy_batches  # reproducible schedule
    assert schedule(Mixed(lmbda=0.5, seed=8, sampling=greedy)) != flips  # the seed is what fixes it
    # the coin's state travels with the regime (checkpoints): a restored one continues the same schedule
    first = Mixed(lmbda=0.5, seed=7, sampling=greedy)
    assert schedule(first, 15) == flips[:15]
    resumed = Mixed(lmbda=0.5, seed=0, sampling=greedy)
    resumed.load_state_dict(first.state_dict())
    assert schedule(resumed, 25) == flips[15:] and resumed.batches == 40
    with pytest.raises(ConfigError, match=r"regime.lmbda must be in \[0, 1\]"):
        Mixed(lmbda=1.5)


def test_generative_regime_with_a_classifier_fails_before_training(make_cfg, tmp_path, monkeypatch):
    import lightning as L

    def trained(*args, **kwargs):  # reaching any training (the digits teacher's, the run's) fails the test
        raise AssertionError("trained")

    monkeypatch.setattr(L.Trainer, "fit", trained)
    cfg = make_cfg("regime=on_policy")  # no fast_dev_run: the teacher has a fit section and would be trained
    assert cfg.teacher.fit and not cfg.trainer.fast_dev_run
    with pytest.raises(ConfigError, match="regime=on_policy generates text and needs a language-model datamodule"):
        run(cfg)
    assert not (tmp_path / "cache").exists()
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.json").exists()


# ----------------------------------------------------------------------------- Seq-KD recipe


def test_seqkd_with_alpha_zero_is_token_ce_on_the_targets(dm):
    student = model(4)
    batch = next(iter(dm.train_dataloader()))
    recipe = SeqKD(student=student, teacher=model(5), alpha=0.0)
    recipe.set_vocabulary(len(dm.tokenizer))
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = cross_entropy(logits[:, :-1, : len(dm.tokenizer)], batch["labels"][:, 1:])
    assert recipe.compute_loss(batch)["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_word_kd_with_a_one_hot_teacher_equals_seq_kd(dm):
    """A teacher that puts (numerically) all mass on the target token makes the word-level
    soft term equal to the NLL, so every alpha gives the Seq-KD loss."""
    batch = next(iter(dm.train_dataloader()))
    V = len(dm.tokenizer)

    class OneHot(torch.nn.Module):
        def get_input_embeddings(self):
            return torch.nn.Embedding(V, 1)

        def forward(self, input_ids, attention_mask=None):
            logits = torch.full((*input_ids.shape, V), -1e4)
            nxt = torch.roll(input_ids, -1, dims=1)  # position i predicts token i+1
            logits.scatter_(-1, nxt.unsqueeze(-1), 0.0)
            return SimpleNamespace(logits=logits)

    student = model(6)
    seq = SeqKD(student=student, teacher=OneHot(), alpha=0.0)
    word = SeqKD(student=student, teacher=OneHot(), alpha=0.7)
    for r in (seq, word):
        r.set_vocabulary(V)
    assert word.compute_loss(batch)["loss"].item() == pytest.approx(seq.compute_loss(batch)["loss"].item(), rel=1e-5)


def test_bad_alpha_is_refused():
    with pytest.raises(ConfigError, match=r"recipe.alpha must be in \[0, 1\]"):
        SeqKD(student=model(0), teacher=model(1), alpha=2.0)


@pytest.mark.parametrize("overrides", [["recipe=seqkd"], ["recipe=word_kd"], ["recipe=hinton", "regime=mixed",
                                                                              "regime.lmbda=1.0"]])
def test_lm_recipes_and_regimes_run_inside_lightning(overrides, make_cfg):
    summary = run(make_cfg(*SMALL_TASK, *overrides, "debug=fast_dev_run"))
    assert "teacher" in summary["results"] and len(summary["results"]) == 3


def test_mixed_with_seq_kd_trains_off_policy_batches_on_the_teachers_responses(dm, tmp_path):
    """Mixed(seq_kd=True) with lmbda 0: every batch is off-policy, and its response tokens are
    the teacher's greedy answer to that row's prompt (decoded here by hand, one prompt at a
    time), not the dataset's."""
    data = fresh_dm(dm)
    teacher = model(11)
    regime = Mixed(lmbda=0.0, seq_kd=True, cache_dir=str(tmp_path), sampling={"temperature": 0.0},
                   teacher_generated={"batch_size": 16})
    regime.prepare(teacher, data)
    tok, V = data.tokenizer, len(data.tokenizer)

    @torch.no_grad()
    def greedy(prompt):
        ids = list(prompt)
        for _ in range(data.max_new_tokens):
            nxt = int(teacher(input_ids=torch.tensor([ids])).logits[0, -1, :V].argmax())
            ids.append(nxt)
            if nxt == tok.eos_token_id:
                break
        return ids[len(prompt):]

    prompts, references = data.prompts("train"), data.references("train")
    rows = differ = 0
    for batch in data.train_dataloader():
        out = regime.batch(model(12), batch, data)
        assert out is batch  # lmbda 0: never the student's samples
        for r, i in enumerate(batch["index"].tolist()):
            labels = batch["labels"][r]
            response = labels[labels != IGNORE_INDEX].tolist()
            expected = greedy(prompts[i])[: data.max_length - len(prompts[i])]
            assert response == expected, i
            dataset = tok(references[i], add_special_tokens=False)["input_ids"]
            differ += response[: len(dataset)] != dataset
            rows += 1
    assert rows == len(prompts) and regime.on_policy_batches == 0
    assert differ >= rows // 2  # the teacher's answers are not the dataset's
