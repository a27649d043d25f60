"""The real-model experiments (docs/experiments/), end to end, with a tiny stand-in for SmolLM2 (the
same configs and code path; only the teacher's directory and the sizes are overridden)."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import pytest
import torch

from kd.runs import train as run

pytest.importorskip("chatterbot_corpus")


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A 4-layer Llama and a byte-level BPE with a chat template, saved like a hub model."""
    from kd.data.tokenizer import train_bpe_tokenizer
    from kd.models import save_model, tiny_causal_lm

    root = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    save_model(tiny_causal_lm(vocab_size=300, hidden_size=32, num_layers=4), root)
    train_bpe_tokenizer(["hello there, how are you?", "the cat sat on the mat"] * 20, vocab_size=280).save_pretrained(root)
    text = root.parent / "text.txt"
    text.write_text("\n".join(" ".join(f"word{(d * 7 + i) % 50}" for i in range(120)) for d in range(30)))
    return root, text


def test_experiment_a_prunes_the_teacher_and_reports_perplexity_and_kl(make_cfg, tiny_teacher, caplog):
    from kd.build import build
    from kd.subruns import prepare

    teacher_dir, text = tiny_teacher
    overrides = ["experiment=smol_prune", f"teacher.name_or_path={teacher_dir}", f"data.source.corpus={text}",
                 "data.source.words=16", "data.source.max_windows=24", "student.num_layers=2",
                 "student_init_from_teacher=importance", "regime.top_k=8"]
    # the student starts as the teacher's layers that the measured map names
    prepared = build(make_cfg(*overrides))
    with caplog.at_level(logging.INFO, logger="kd"):
        prepare(prepared)
    kept = re.search(r"layer_map=importance measured on \d+ training batches: keeps teacher layers \[(\d+), (\d+)\]",
                     caplog.text)
    assert kept, caplog.text
    mapping = [int(kept.group(1)), int(kept.group(2))]
    t_state, s_state = prepared.teacher.state_dict(), prepared.student.state_dict()
    for s_layer, t_layer in enumerate(mapping):
        keys = [k for k in s_state if k.startswith(f"model.layers.{s_layer}.")]
        assert keys and all(torch.equal(s_state[k], t_state[k.replace(f"layers.{s_layer}.", f"layers.{t_layer}.")])
                            for k in keys)
    # the whole run: test perplexity and KL to the teacher of every row
    results = run(make_cfg(*overrides))["results"]
    row = results["student, hinton"]
    assert row["test/ppl"] > 1 and row["test/kl_to_teacher"] > 0 and results["teacher"]["test/ppl"] > 1
    for name in ("student, hinton", "teacher"):  # perplexity is exp of the same token cross-entropy
        assert results[name]["test/ppl"] == pytest.approx(math.exp(results[name]["test/loss"]), rel=1e-4)


def test_experiment_b_runs_teacher_sft_student_sft_and_on_policy_gkd_scored_by_rouge_l(make_cfg, tiny_teacher):
    teacher_dir, _ = tiny_teacher
    cfg = make_cfg("experiment=chat_gkd", f"teacher.name_or_path={teacher_dir}", "data.source.categories=[greetings]",
                   "student.num_layers=2", "teacher.fit.max_epochs=1", "student_sft.max_epochs=1",
                   "trainer.limit_train_batches=2", "data.generation_eval_size=6", "data.max_new_tokens=8")
    summary = run(cfg)
    results = summary["results"]
    assert set(results) == {"teacher", "student, SFT (start point)", "student, gkd"}
    for row in results.values():
        assert 0.0 <= row["test/rouge_l"] <= 1.0
    # the SFT start point and the distilled student are one 2-layer model; the teacher has 4 layers
    assert results["student, SFT (start point)"]["params"] == results["student, gkd"]["params"]
    assert results["teacher"]["params"] > results["student, gkd"]["params"]
    # the exported student loads, with the 2 layers it was given
    from kd.models import read_state_dict

    state = read_state_dict(Path(summary["output_dir"]) / "student")
    layers = {k.split(".")[2] for k in state if k.startswith("model.layers.")}
    assert layers == {"0", "1"}


def test_a_pruned_students_sft_starts_from_the_teachers_layers_and_the_run_from_the_sft(make_cfg, tiny_teacher,
                                                                                         tmp_path):
    """student=from_teacher with sft=chat: the SFT begins as the fine-tuned teacher's kept
    layers (lr 0 here, so it stays them), and every distillation row begins as that SFT,
    not as a fresh copy of the teacher's layers that would throw the SFT away."""
    from kd.models import read_state_dict

    cfg = make_cfg("experiment=chat_word_kd", f"teacher.name_or_path={tiny_teacher[0]}", "data.source.categories=[greetings]",
                   "student.num_layers=2", "teacher.fit.max_epochs=1", "student_sft.max_epochs=1",
                   "student_sft.optimizer.lr=0", "optimizer.lr=0", "trainer.limit_train_batches=1",
                   "data.generation_eval_size=2", "data.max_new_tokens=2")
    run(cfg)
    (teacher_dir,) = (tmp_path / "cache" / "teachers").iterdir()
    (sft_dir,) = (tmp_path / "cache" / "sft").iterdir()
    teacher, sft, student = (read_state_dict(d) for d in (teacher_dir, sft_dir, tmp_path / "run" / "student"))
    # (the exported student's vocabulary is cut to the tokenizer's 280 of the model's 300 rows)
    assert sft.keys() == student.keys() and all(torch.equal(sft[k][: len(student[k])], student[k]) for k in sft)
    for s_layer, t_layer in enumerate([0, 3]):  # "even": the first and the last of 4
        keys = [k for k in sft if k.startswith(f"model.layers.{s_layer}.")]
        assert keys and all(torch.equal(sft[k], teacher[k.replace(f"layers.{s_layer}.", f"layers.{t_layer}.")])
                            for k in keys)
    assert torch.equal(sft["model.embed_tokens.weight"], teacher["model.embed_tokens.weight"])
    # the table's control row, more supervised steps from the same SFT, is labelled as that
    from kd.build import build

    control = build(make_cfg("experiment=chat_word_kd", "recipe=supervised", f"teacher.name_or_path={tiny_teacher[0]}",
                             "data.source.categories=[greetings]", "student.num_layers=2"), setup=False)
    assert control.label == "student, SFT + more supervised"


def test_a_fit_section_may_train_on_every_batch_whatever_the_runs_limit(make_cfg, tiny_teacher, monkeypatch):
    """experiment=chat_* limit their distillation to 16 batches; the teacher's fine-tune and
    the student's SFT say limit_train_batches: null and so train on every batch, while a fit
    section without the key keeps the run's limit."""
    import kd.subruns as subruns

    seen = {}

    class Stop(Exception):
        pass

    def capture(cache, kind, name, sub, what=None):
        seen[kind] = sub.trainer.limit_train_batches
        raise Stop

    monkeypatch.setattr(subruns, "cached_run", capture)
    cfg = make_cfg("experiment=chat_gkd", f"teacher.name_or_path={tiny_teacher[0]}")
    assert cfg.trainer.limit_train_batches == 16
    for kind, fit in (("teachers", cfg.teacher.fit), ("sft", cfg.student_sft)):
        with pytest.raises(Stop):
            subruns._fitted(subruns.Cache(cfg.paths.cache_dir), kind, "x", cfg, cfg.teacher.model, fit)
        assert seen[kind] is None
    task = make_cfg("experiment=task_gkd", "trainer.limit_train_batches=3")
    with pytest.raises(Stop):
        subruns._fitted(subruns.Cache(task.paths.cache_dir), "sft", "x", task, task.student, task.student_sft)
    assert seen["sft"] == 3
    # a run that trains on no batch evaluates its start point: the teacher and SFT it
    # starts from still train in full (an untrained teacher would be cached otherwise)
    start = make_cfg("experiment=task_gkd", "trainer.limit_train_batches=0")
    for kind, fit in (("teachers", start.teacher.fit), ("sft", start.student_sft)):
        with pytest.raises(Stop):
            subruns._fitted(subruns.Cache(start.paths.cache_dir), kind, "x", start, start.student, fit)
        assert seen[kind] is None


def test_a_runs_validation_cadence_does_not_reach_its_teacher_and_sft(make_cfg, monkeypatch):
    """trainer.val_check_interval=0.1 (for regime=adaptive) is the distilled run's: the
    teacher's fit and the SFT validate once per epoch and keep the keys of a run without it;
    a scratch baseline, trained like the run, keeps the run's cadence."""
    import kd.subruns as subruns

    seen = {}

    def capture(cache, kind, name, sub, what=None):
        seen[kind] = (sub.trainer.val_check_interval, sub.trainer.check_val_every_n_epoch, name)
        return cache.root

    monkeypatch.setattr(subruns, "cached_run", capture)
    plain = make_cfg("experiment=task_gkd")
    cadenced = make_cfg("experiment=task_gkd", "trainer.val_check_interval=0.1", "trainer.check_val_every_n_epoch=2")
    names = {}
    for label, cfg in (("plain", plain), ("cadenced", cadenced)):
        cache = subruns.Cache(cfg.paths.cache_dir)
        for kind, fit, model in (("teachers", cfg.teacher.fit, cfg.teacher.model), ("sft", cfg.student_sft, cfg.student)):
            subruns._fitted(cache, kind, "x", cfg, model, fit)
            assert seen[kind][:2] == (None, 1)
            names[label, kind] = seen[kind][2]
        subruns.cached_supervised(cache, "baselines", "b", cfg)
        names[label, "baselines"] = seen["baselines"][2]
    assert names["plain", "teachers"] == names["cadenced", "teachers"]
    assert names["plain", "sft"] == names["cadenced", "sft"]
    assert seen["baselines"][:2] == (0.1, 2) and names["plain", "baselines"] != names["cadenced", "baselines"]


def test_an_sft_section_with_its_own_seed_is_one_sft_for_every_run_seed(make_cfg, tiny_teacher, monkeypatch):
    """sft=chat fixes seed 0: the runs of seeds 0 and 1 start from the same cached SFT (one
    cache entry, trained with seed 0); sft=task has no seed, so each run seed has its own."""
    import kd.subruns as subruns

    names = {}

    def capture(cache, kind, name, sub, what=None):
        if kind == "sft":  # (a pruned student's SFT first asks for the fine-tuned teacher)
            names[(sub.seed, name)] = kind
        return cache.root

    monkeypatch.setattr(subruns, "cached_run", capture)
    for seed in (0, 1):
        cfg = make_cfg("experiment=chat_gkd", f"teacher.name_or_path={tiny_teacher[0]}", f"seed={seed}")
        subruns.student_sft(cfg, subruns.Cache(cfg.paths.cache_dir))
    assert len(names) == 1 and next(iter(names))[0] == 0
    names.clear()
    for seed in (0, 1):
        task = make_cfg("experiment=task_gkd", f"seed={seed}")
        subruns.student_sft(task, subruns.Cache(task.paths.cache_dir))
    assert sorted(seed for seed, _ in names) == [0, 1] and len({name for _, name in names}) == 2
