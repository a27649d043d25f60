"""A new user's paths through kd: groups that follow each other, refusals before anything
trains (one sentence, exit code 2), work kept when training fails, exports that plain
transformers uses as they are, and the bugs found by trying (each test fails without its fix)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor

from kd import ConfigError
from kd.build import build
from kd.cli import composition_error, one_sentence_errors
from kd.evaluation import cross_entropy
from kd.recipe import DistillationRecipe, Needs
from kd.runs import train
from tests.conftest import SMALL_TASK

TINY_DIGITS = ["trainer.max_epochs=1", "teacher.fit.max_epochs=1", "trainer.limit_train_batches=3",
               "trainer.limit_val_batches=2", "trainer.limit_test_batches=2"]


def _refused(cfg, capsys) -> str:
    """Run ``kd`` on ``cfg`` in-process; it must exit 2 with one line on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        one_sentence_errors("kd", train, cfg)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kd: error: "), lines
    return lines[0]


# ----------------------------------------------------------------------------- groups that follow each other


def test_choosing_language_model_data_brings_language_model_models(make_cfg):
    from kd.models import kind_of

    run = build(make_cfg("data=task"), setup=False)  # the most natural first override
    assert kind_of(run.cfg.teacher.model) == "causal_lm" and kind_of(run.cfg.student) == "causal_lm"
    assert run.teacher.config.num_hidden_layers > run.student.config.num_hidden_layers
    text = build(make_cfg("data=text"), setup=False)
    assert kind_of(text.cfg.teacher.model) == "masked_lm" and text.init_scheme == "even"
    supervised = build(make_cfg("data=task", "recipe=supervised"), setup=False)  # the recipe's own choice wins
    assert supervised.teacher is None


def test_data_task_runs_end_to_end(make_cfg):
    summary = train(make_cfg("data=task", "data.source.train_size=200", "data.source.val_size=20",
                             "data.source.test_size=20", "data.generation_eval_size=4", "debug=fast_dev_run"))
    assert set(summary["results"]) == {"teacher", "student, from scratch", "student, hinton"}


@pytest.mark.parametrize("overrides,sentence", [
    (["data=digits", "teacher=task_llama"], "teacher=task_llama is a causal LM but data=digits holds classification "
                                            "data; choose teacher=digits_cnn"),
    (["data=text", "recipe=gkd"], "recipe gkd distils prompt/response (causal LM) models, but data=text holds "
                                  "masked-LM text data; choose data=chatterbot or data=hf or data=jsonl or data=task"),
    (["data=task", "teacher=text_bert", "recipe=minillm"], "teacher=text_bert is a masked LM but data=task holds"),
    (["data=text", "teacher=digits_cnn"], "teacher=digits_cnn is a classifier but data=text holds masked-LM text "
                                          "data; choose teacher=text_bert"),
    (["student=from_teacher"], "student=from_teacher copies a transformers teacher's layers, but teacher=digits_cnn "
                               "is not a transformer; choose student=digits_cnn or student=digits_mlp"),
    (["data=task", "student=digits_mlp"], "student=digits_mlp builds a classifier but data=task holds"),
    (["regime=on_policy"], "regime=on_policy generates text and needs a language-model datamodule"),
    (["divergence.reduction=seq_mean"], "divergence.reduction=seq_mean averages over each sequence's tokens"),
    (["data=jsonl"], "data.source.train must be set for this run: add data.source.train=<value>"),
    (["seed=abc"], "seed must be an integer"),
])
def test_groups_that_cannot_meet_are_refused_before_anything_is_built(overrides, sentence, make_cfg, tmp_path,
                                                                       capsys):
    line = _refused(make_cfg(*overrides), capsys)
    assert sentence in line
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_command_line_composition_errors_are_one_sentence():
    unknown = composition_error("train", ["divergence=nope"])
    assert unknown.startswith("In 'train': Could not find 'divergence/nope'; choose one of: forward_kl, jsd")
    assert "\n" not in unknown and "search path" not in unknown
    absent = composition_error("train", ["recipe=supervised", "divergence.beta=0.9"])
    assert absent.startswith("Could not override 'divergence.beta': the chosen config groups have no such key")
    moved = composition_error("train", ["student.init_from_teacher=block"])
    assert moved == "student.init_from_teacher is now the top-level student_init_from_teacher; set " \
                    "student_init_from_teacher=<value> instead"
    assert composition_error("train", ["-m", "seed=0,1", "divergence=jsd,tvd"]) is None  # sweeps compose
    assert composition_error("train", ["data=task"]) is None


# ----------------------------------------------------------------------------- validation before training


def test_recipe_settings_are_refused_before_the_sft_trains(make_cfg, tmp_path, capsys):
    line = _refused(make_cfg(*SMALL_TASK, "experiment=task_minillm", "recipe.clip_eps=0"), capsys)
    assert "recipe.clip_eps must be > 0" in line
    assert not (tmp_path / "cache" / "sft").exists()


def test_vocabulary_refusals_come_before_the_teacher_trains(make_cfg, tmp_path, capsys):
    line = _refused(make_cfg(*SMALL_TASK, "student.vocab_size=100"), capsys)
    assert "the student has 100 embedding rows but the tokenizer" in line
    assert not (tmp_path / "cache" / "teachers").exists()


def test_minillm_mini_batches_per_buffer_are_refused_when_larger_than_the_batch(make_cfg, capsys):
    line = _refused(make_cfg(*SMALL_TASK, "recipe=minillm", "data.batch_size=4", "recipe.num_minibatches=8"), capsys)
    assert "set recipe.num_minibatches <= data.batch_size" in line


# ----------------------------------------------------------------------------- failures keep the user's work


class _NaNInEpoch2(DistillationRecipe):
    """Cross-entropy, until the second epoch, whose first step returns NaN."""

    needs = Needs(teacher=False)

    def compute_loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        out = self.outputs(self.student, batch)
        ce = cross_entropy(out.logits, out.labels)
        return {"loss": ce * float("nan") if self.current_epoch == 1 else ce}


def test_a_nan_loss_from_the_command_line_keeps_checkpoints_metrics_and_the_student(make_cfg, tmp_path, capsys):
    cfg = make_cfg("recipe=supervised", "trainer.max_epochs=3", "trainer.limit_train_batches=3",
                   "trainer.limit_val_batches=2")
    cfg.recipe._target_ = f"{__name__}._NaNInEpoch2"
    line = _refused(cfg, capsys)
    assert "the training loss is not finite at step 3" in line and "exported to" in line
    run_dir = tmp_path / "run"
    epoch1 = run_dir / "checkpoints" / "epoch000.ckpt"
    assert epoch1.is_file() and torch.load(epoch1, weights_only=False)["epoch"] == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "not finite" in metrics["error"] and metrics["student_from"].endswith("epoch000.ckpt")
    from kd.models import read_state_dict

    exported = read_state_dict(run_dir / "student")
    saved = torch.load(epoch1, weights_only=False)["state_dict"]
    assert all(torch.equal(v, saved[f"student.{k}"]) for k, v in exported.items())


# ----------------------------------------------------------------------------- exports


def test_the_exported_student_is_self_contained_for_plain_transformers(make_cfg, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train(make_cfg(*SMALL_TASK, "data.vocab_size=400", "debug=fast_dev_run"))
    student_dir = tmp_path / "run" / "student"
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    tok = AutoTokenizer.from_pretrained(student_dir)
    assert len(tok) < 400  # the trained BPE is smaller than the model's configured vocabulary
    assert model.config.vocab_size == len(tok) and model.get_output_embeddings().weight.shape[0] == len(tok)
    for config in (model.config, model.generation_config):
        assert config.eos_token_id == tok.eos_token_id and config.pad_token_id == tok.pad_token_id
    ids = tok("sort: b a", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=60, do_sample=False)
    assert (out[0, ids.shape[1]:] < len(tok)).all()


# ----------------------------------------------------------------------------- bugs


def test_minillm_runs_as_many_updates_as_the_schedule_assumes(make_cfg):
    """6 rollouts in 4 mini-batches: torch.chunk gave 3 parts, so 3 updates per PPO epoch."""
    cfg = make_cfg(*SMALL_TASK, "recipe=minillm", "data.batch_size=6", "recipe.ppo_epochs=2",
                   "recipe.num_minibatches=4", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
                   "data.generation_eval_size=2", "scratch_baseline=false")
    train(cfg)
    ckpt = torch.load(next(Path(cfg.paths.output_dir).rglob("last.ckpt")), weights_only=False)
    assert ckpt["global_step"] == 2 * 4


def test_teacher_generated_responses_are_cut_to_max_length(tmp_path):
    from kd.data.lm import LMDataModule
    from kd.data.sources import TaskSource
    from kd.models import freeze, tiny_causal_lm
    from kd.regimes import TeacherGenerated

    dm = LMDataModule(TaskSource(train_size=24, val_size=4, test_size=4), vocab_size=300, batch_size=8,
                      max_length=24, max_new_tokens=40)
    dm.setup()
    teacher = freeze(tiny_causal_lm(vocab_size=len(dm.tokenizer), hidden_size=32, num_layers=1))
    regime = TeacherGenerated(cache_dir=str(tmp_path), sampling={"temperature": 1.0}, seed=1)
    regime.prepare(teacher, dm)
    lengths = [len(p) + len(r) for p, r in dm.splits["train"].encoded]
    generated = torch.load(regime.path / "responses.pt")
    assert max(len(p) + len(g) for (p, _), g in zip(dm.splits["train"].encoded, generated)) > 24  # some ran long
    assert max(lengths) == 24  # and were cut to fit


def test_mixed_seq_kd_builds_its_teacher_part_with_the_users_settings(make_cfg):
    run = build(make_cfg(*SMALL_TASK, "recipe=gkd", "regime.seq_kd=true", "regime.teacher_generated.num_candidates=3",
                         "regime.teacher_generated.select=closest_to_reference", "regime.teacher_generated.seed=5",
                         "regime.teacher_generated.batch_size=7", "regime.sampling.temperature=0.7"), setup=False)
    part = run.recipe.regime.teacher_data
    assert (part.num_candidates, part.select, part.seed, part.batch_size) == (3, "closest_to_reference", 5, 7)
    assert part.sampling.temperature == 0.7


def test_the_seq_inter_cache_key_covers_the_references(tmp_path):
    from types import SimpleNamespace

    from kd.models import tiny_causal_lm
    from kd.regimes import TeacherGenerated

    class Data(SimpleNamespace):
        def prompts(self, split="train"):
            return [[1, 2], [3]]

        def references(self, split="train"):
            return list(self.refs)

    tok = SimpleNamespace(get_vocab=lambda: {"a": 0, "b": 1})
    one, other = Data(tokenizer=tok, max_new_tokens=4, refs=["x", "y"]), Data(tokenizer=tok, max_new_tokens=4,
                                                                                refs=["x", "z"])
    teacher = tiny_causal_lm(vocab_size=8, hidden_size=16, num_layers=1)
    inter = TeacherGenerated(cache_dir=str(tmp_path), num_candidates=2, select="closest_to_reference")
    first = TeacherGenerated(cache_dir=str(tmp_path), num_candidates=2, select="first")
    assert inter.key(teacher, one) != inter.key(teacher, other)  # the selection reads the references
    assert first.key(teacher, one) == first.key(teacher, other)  # plain Seq-KD does not
