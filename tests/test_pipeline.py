"""kd pipeline=...: stages in turn, each from the previous stage's weights, earlier stages as
routed frozen teachers of later ones, every stage cached, the skill-by-stage table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import open_dict

from kd import ConfigError
from kd.runs import train

TINY = ["pipeline=task_stages", "data.source.train_size=160", "data.source.val_size=8", "data.source.test_size=16",
        "data.vocab_size=300", "data.min_frequency=20", "data.generation_eval_size=16", "data.max_new_tokens=5",
        "data.batch_size=16", "student.hidden_size=32", "pipeline.stages.0.epochs=1",
        "pipeline.stages.1.objective=sft", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "pipeline.recipe.sampling.max_new_tokens=4"]


def test_a_pipeline_runs_its_stages_caches_them_and_prints_the_table(make_cfg, tmp_path, capsys, monkeypatch):
    summary = train(make_cfg(*TINY))
    table = summary["table"]
    assert list(table) == ["with cross-stage distillation", "without (stages in sequence)"]
    for stages in table.values():
        assert list(stages) == ["strings", "sorting"]
        for scores in stages.values():
            assert set(scores) == {"upper", "reverse", "sort", "count"}
            assert all(0.0 <= v <= 1.0 for v in scores.values())
    printed = capsys.readouterr().out
    assert "after stage" in printed and "sorting" in printed
    assert json.loads((tmp_path / "run" / "pipeline.json").read_text())["table"] == table
    entries = sorted(p.name.split("-")[0] for p in (tmp_path / "cache" / "stages").iterdir())
    assert entries == ["sorting", "sorting", "strings"]  # stage 1 is the same with and without distillation
    with_kd, without = table.values()
    assert with_kd["strings"] == without["strings"]  # ... so its scores are too

    # a second run reuses every stage: nothing is trained
    from kd.build import Run

    monkeypatch.setattr(Run, "fit", lambda self: pytest.fail("a cached stage was trained again"))
    again = train(make_cfg(*TINY, root=tmp_path))
    assert again["table"] == table


def test_later_stages_start_from_the_last_one_and_are_taught_by_the_earlier_ones(make_cfg, tmp_path):
    from kd.pipeline import _stage_config

    cfg = make_cfg(*TINY)
    first, second = cfg.pipeline.stages
    entry = tmp_path / "stage1"
    entry.mkdir()
    sub = _stage_config(cfg, second, [(first, entry)], entry, 1.0, tmp_path / "out")
    assert sub.student_init == str(entry)
    assert sub.teachers.strings.checkpoint == str(entry) and sub.teacher is None
    assert dict(sub.data.routes) == {"upper": "strings", "reverse": "strings"}
    assert list(sub.data.train_skills) == ["sort", "count", "upper", "reverse"]
    assert sub.recipe.lam == 1.0 and sub.recipe.stage_objective == "sft"
    plain = _stage_config(cfg, second, [(first, entry)], entry, 0.0, tmp_path / "out")
    assert plain.teachers is None and list(plain.data.train_skills) == ["sort", "count"] and plain.recipe.lam == 0.0


def test_bad_pipelines_are_refused(make_cfg):
    cfg = make_cfg(*TINY)
    with open_dict(cfg):
        cfg.pipeline.stages[1].name = "strings"
    with pytest.raises(ConfigError, match="stage names must differ"):
        train(cfg)
    cfg = make_cfg(*TINY)
    with open_dict(cfg):
        cfg.pipeline.stages = []
    with pytest.raises(ConfigError, match="pipeline.stages is empty"):
        train(cfg)


def test_pipeline_summaries_average_over_seeds(tmp_path):
    from kd.pipeline import WITH, load_pipelines, summarize_pipelines

    for seed, upper in ((0, 0.5), (1, 1.0)):
        run = tmp_path / str(seed)
        run.mkdir()
        table = {WITH: {"strings": {"upper": upper, "sort": 0.0}}}
        (run / "pipeline.json").write_text(json.dumps({"seed": seed, "table": table}))
    text = summarize_pipelines(load_pipelines([tmp_path]))
    assert "seeds [0, 1]" in text
    row = next(line for line in text.splitlines() if line.strip().startswith("strings"))
    assert "75.0 ± 35.4" in row and "0.0 ± 0.0" in row  # mean and sample std of 50 and 100


def test_kd_report_skips_an_unreadable_pipeline_json_and_names_it(tmp_path, capsys):
    """A pipeline.json cut short (a run killed while writing it) or without its table is
    named and left out; the others are summarised (it used to raise a JSONDecodeError)."""
    from kd.pipeline import WITH
    from kd.report import main as report

    good = tmp_path / "0"
    good.mkdir()
    (good / "pipeline.json").write_text(json.dumps({"seed": 0, "table": {WITH: {"strings": {"upper": 0.25}}}}))
    for name, text in (("cut", '{"seed": 1, "table": {"with'), ("tableless", '{"seed": 2}'), ("list", "[1, 2]")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "pipeline.json").write_text(text)
    report([str(tmp_path), "--no-plots"])
    out, err = capsys.readouterr()
    assert "over 1 run(s), seeds [0]" in out and "25.0" in out
    for name in ("cut", "tableless", "list"):
        assert f"skipped the unreadable run {tmp_path / name / 'pipeline.json'} (" in err


def test_every_stage_is_checked_before_the_first_one_trains(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="recipe.stage_objective must be one of"):
        train(make_cfg(*TINY, "pipeline.stages.1.objective=rl"))
    assert not (tmp_path / "cache" / "stages").exists()


def test_a_stage_is_keyed_by_what_shapes_its_weights_not_by_where_the_cache_lives(make_cfg, tmp_path):
    """kd.subruns.run_key, the key of every cached run: a stage's teachers and starting
    weights (earlier stages' entries) count by their entry, wherever the cache is."""
    from kd.pipeline import _stage_config
    from kd.subruns import run_key

    def key(root: Path, lam: float = 1.0, earlier: str = "strings-0") -> str:
        cfg = make_cfg(*TINY, root=root)
        first, second = cfg.pipeline.stages
        entry = Path(cfg.paths.cache_dir) / "stages" / earlier
        return run_key(_stage_config(cfg, second, [(first, entry)], entry, lam, root / "out"))

    base = key(tmp_path / "a")
    assert key(tmp_path / "b") == base  # the same entries in another cache
    assert key(tmp_path / "a", earlier="strings-1") != base  # another first stage to start from and replay
    assert key(tmp_path / "a", lam=0.5) != base
    assert key(tmp_path / "a", lam=0.0) != base  # no replay: own skills only, no teachers


TINY_RL = ["pipeline=task_stages_rl", *TINY[1:10], "pipeline.stages.0.epochs=1", "trainer.limit_train_batches=2",
           "trainer.limit_val_batches=1", "pipeline.recipe.sampling.max_new_tokens=4", "pipeline.recipe.reward_window=1"]


def test_an_rl_stage_after_sft_on_every_skill_replays_only_the_skills_it_does_not_train(make_cfg, tmp_path):
    """pipeline=task_stages_rl: stage 1 trains every skill, stage 2 RL on sort/count (dense
    reward); only upper/reverse are replayed to stage 1's checkpoint (sort/count are the RL
    stage's own rows), with replay=distill or, for the control, replay=sft."""
    from kd.pipeline import _stage_config
    from kd.subruns import run_key

    cfg = make_cfg(*TINY_RL)
    first, second = cfg.pipeline.stages
    assert list(first.skills) == ["upper", "reverse", "sort", "count"] and second.objective == "grpo"
    entry = tmp_path / "stage1"
    entry.mkdir()
    sub = _stage_config(cfg, second, [(first, entry)], entry, 1.0, tmp_path / "out")
    assert dict(sub.data.routes) == {"upper": "sft_all", "reverse": "sft_all"}
    assert list(sub.data.train_skills) == ["sort", "count", "upper", "reverse"]
    assert sub.recipe.reward == "similarity" and sub.recipe.replay == "distill" and sub.recipe.stage_objective == "grpo"
    control = _stage_config(cfg, second, [(first, entry)], entry, 1.0, tmp_path / "out", "sft")
    assert control.recipe.replay == "sft" and dict(control.data.routes) == dict(sub.data.routes)
    # stage 1 replays nothing: one config (one cache entry) whatever the variant
    assert run_key(_stage_config(cfg, first, [], None, 1.0, tmp_path / "out", "sft")) == \
        run_key(_stage_config(cfg, first, [], None, 1.0, tmp_path / "out"))


def test_the_rl_pipeline_runs_the_control_and_reports_rewards_and_each_teachers_kl(make_cfg, tmp_path, capsys):
    from kd.pipeline import CONTROL, WITH, WITHOUT

    summary = train(make_cfg(*TINY_RL))
    assert list(summary["table"]) == [WITH, WITHOUT, CONTROL]
    entries = sorted(p.name.split("-")[0] for p in (tmp_path / "cache" / "stages").iterdir())
    assert entries == ["rl_sorting"] * 3 + ["sft_all"]  # stage 1 trained once for the three variants
    validation = summary["validation"]
    for variant in (WITH, WITHOUT, CONTROL):
        rl = validation[variant]["rl_sorting"]
        assert 0.0 <= rl["val/stage_reward_start"] <= 1.0 and 0.0 <= rl["val/stage_reward"] <= 1.0
    for variant in (WITH, CONTROL):  # routed runs: stage 1's teacher's KL on the upper/reverse rows
        assert validation[variant]["rl_sorting"]["val/teacher_kl/sft_all"] >= 0.0
    assert not any(k.startswith("val/teacher_kl/") for k in validation[WITHOUT]["rl_sorting"])
    assert "val/stage_reward" not in validation[WITH]["sft_all"]  # an SFT stage samples nothing
    printed = capsys.readouterr().out
    assert f"{CONTROL}, rl_sorting: reward " in printed and "KL(sft_all || student)" in printed
    header = next(line for line in printed.splitlines() if "after stage" in line)
    assert header.split()[2:] == ["upper", "reverse", "sort", "count"]  # a skill of two stages: one column
    assert json.loads((tmp_path / "run" / "pipeline.json").read_text())["validation"] == validation
