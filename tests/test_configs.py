"""Every yaml of every config group composes through Hydra and instantiates."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf, open_dict

from kd import ConfigError
from kd.cli import CONF_DIR
from kd.divergences import Divergence
from kd.recipe import DistillationRecipe

#: the groups train.yaml's defaults list chooses from (the command line's groups); the other
#: folders hold fragments that configs merge through their own defaults lists (conf/sampling/)
CHOSEN = {next(iter(e)) for e in OmegaConf.load(CONF_DIR / "train.yaml").defaults if not isinstance(e, str)}
GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name in CHOSEN)
FRAGMENTS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in CHOSEN)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


ALL = [(g, o) for g in GROUPS for o in options(g)]


def test_groups_of_the_design_exist():
    expected = {"recipe", "teacher", "student", "divergence", "data", "regime", "trainer", "logger",
                "callbacks", "experiment", "debug", "hydra"}
    assert expected <= set(GROUPS)
    assert all(options(g) for g in expected), "every group ships at least one option"


def test_every_fragment_is_merged_somewhere_and_is_no_command_line_group():
    assert FRAGMENTS == ["rollouts", "sampling", "token_loss"]
    texts = [p.read_text() for p in CONF_DIR.rglob("*.yaml")]
    for group in FRAGMENTS:
        for option in options(group):
            assert any(f"/{group}@" in text and f": {option}" in text for text in texts), f"{group}/{option}"


def _build(cfg):
    """Build a composed config through the composition root, as kd does (no training)."""
    from kd.build import build

    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        with open_dict(cfg):
            cfg.trainer.accelerator = "cpu"  # the rest of a GPU trainer still checks here
    run = build(cfg, setup=False)
    assert isinstance(run.datamodule, L.LightningDataModule)
    assert isinstance(run.recipe, DistillationRecipe)
    assert isinstance(run.trainer, L.Trainer)
    if cfg.get("divergence"):
        assert isinstance(run.recipe.divergence, Divergence)
    return run.recipe


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A tiny causal LM and tokenizer saved like a hub checkpoint, plus a jsonl file."""
    from kd.data.tokenizer import train_bpe_tokenizer
    from kd.models import save_model, tiny_causal_lm

    root = tmp_path_factory.mktemp("hf")
    save_model(tiny_causal_lm(vocab_size=300, hidden_size=32, num_layers=1), root / "model")
    train_bpe_tokenizer(["Q: a\nA: b"] * 10, vocab_size=280).save_pretrained(root / "model")
    (root / "train.jsonl").write_text('{"prompt": "p", "response": "r"}\n' * 30)
    return root


def extra_overrides(group: str, option: str, tiny_hf) -> list[str]:
    """What an option needs to compose on its own (mandatory values, a matching data group)."""
    model = str(tiny_hf / "model")
    if group == "teacher" and option == "none":
        return ["recipe=supervised"]
    if (group, option) == ("teacher", "served"):  # built without setup: no server is asked
        return ["data=task", "recipe=gkd", "student=task_llama", "teacher.url=http://127.0.0.1:1"]
    if (group, option) == ("teacher", "self"):  # the student itself, reading a rule: prompt/response data
        return ["data=task", "recipe=gkd", "student=task_llama", "regime=on_policy"]
    if (group, option) == ("student", "hf"):
        return ["data=task", f"student.name_or_path={model}"]
    if (group, option) == ("teacher", "hf"):
        return ["data=task", f"teacher.name_or_path={model}"]
    if option in ("smol_prune", "smol_prune_ce") or option.startswith("chat_"):  # the real pair: a tiny stand-in
        return [f"teacher.name_or_path={model}"]
    if option in ("smollm2", "smollm2_chat"):
        return ["data=text_lm", f"teacher.name_or_path={model}", "student=from_teacher"]
    if (group, option) == ("data", "text_lm"):
        return ["teacher=smollm2", f"teacher.name_or_path={model}", "student=from_teacher"]
    if option in ("text_bert", "from_teacher", "distilbert"):
        return ["data=text", "teacher=text_bert"]
    if (group, option) in {("recipe", "byte_kd"), ("recipe", "uld")}:
        return ["data=task", "teacher=task_llama_tok512", "student=task_llama"]
    if "task_llama" in option or option.startswith(("gkd", "minillm", "cross_stage")) or (group, option) in {("recipe", "seqkd"), ("recipe", "word_kd"),
                                                     ("regime", "teacher_generated"),
                                                     ("regime", "on_policy"), ("regime", "mixed"),
                                                     ("regime", "speculative"), ("regime", "adaptive")}:
        return ["data=task", "teacher=task_llama", "student=task_llama"]
    if (group, option) == ("data", "jsonl"):
        return [f"data.source.train={tiny_hf / 'train.jsonl'}", "student=hf", f"student.name_or_path={model}"]
    if (group, option) == ("data", "hf"):
        return ["data.source.path=json", f"data.source.data_files={tiny_hf / 'train.jsonl'}"]
    return []


@pytest.mark.parametrize("group,option", ALL, ids=[f"{g}={o}" for g, o in ALL])
def test_every_option_composes_and_instantiates(group, option, make_cfg, tmp_path, tiny_hf):
    if group == "hydra":
        cfg = make_cfg(f"hydra={option}")
        assert "${now:" in OmegaConf.to_container(cfg.hydra, resolve=False)["run"]["dir"]
        return
    if group == "pipeline":  # a pipeline is its stages: each stage's run config builds
        from kd.build import build
        from kd.pipeline import _stage_config

        from kd.config import instantiate, student_factory

        cfg = make_cfg(f"pipeline={option}")
        done = []
        for stage in cfg.pipeline.stages:
            entry = tmp_path / str(stage.name)  # a stage's entry: the student's weights (checked when it starts one)
            entry.mkdir()
            torch.save(instantiate(student_factory(cfg)[0]).state_dict(), entry / "model.pt")
            for lam in (cfg.pipeline.lam, 0.0):
                run = build(_stage_config(cfg, stage, done, done[-1][1] if done else None, lam, tmp_path / "out"),
                            setup=False)
                assert type(run.recipe).__module__.startswith("recipes.")
            done.append((stage, entry))
        return
    cfg = make_cfg(f"{group}={option}", *extra_overrides(group, option, tiny_hf))
    if (group, option) == ("trainer", "deepspeed") and importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(ConfigError, match="needs a package that is not installed.*pip install"):
            _build(cfg)
        return
    if (group, option) == ("trainer", "fsdp") and not torch.cuda.is_available():  # FSDP wants GPUs: its strategy alone
        from lightning.pytorch.strategies import FSDPStrategy

        from kd.config import instantiate

        strategy = instantiate(cfg.trainer.strategy)
        assert isinstance(strategy, FSDPStrategy) and strategy.kwargs["use_orig_params"]
        with open_dict(cfg):
            cfg.trainer.strategy = "auto"
    plain = cfg.copy()
    with open_dict(plain):
        del plain["hydra"]
    assert OmegaConf.to_container(plain, resolve=True)  # every interpolation resolves
    recipe = _build(cfg)
    if group == "recipe":
        assert type(recipe).__module__.startswith("recipes.")


def test_text_data_takes_the_students_tokenizer_unless_told(make_cfg, tiny_hf):
    model = str(tiny_hf / "model")
    for data in ("jsonl", "hf", "chatterbot"):
        assert make_cfg(f"data={data}", "student=hf", f"student.name_or_path={model}").data.tokenizer == model
        assert make_cfg(f"data={data}", "student=task_llama").data.tokenizer is None  # BPE trained on the data
        assert make_cfg(f"data={data}", "student=hf", f"student.name_or_path={model}",
                        "data.tokenizer=other").data.tokenizer == "other"


def test_plain_text_data_takes_the_teachers_tokenizer_also_in_sub_runs(make_cfg, tiny_hf):
    from kd.config import sub_config

    model = str(tiny_hf / "model")
    cfg = make_cfg("experiment=smol_prune", f"teacher.name_or_path={model}")
    assert cfg.data.tokenizer == model and cfg.data.chat_template is False
    assert cfg.student._target_ == "kd.models.shallower_copy" and cfg.student.num_layers == 10
    # a cached sub-run drops the teacher but keeps the data's tokenizer (and the student built from it)
    sub = sub_config(cfg, recipe=cfg.supervised_recipe, teacher=None)
    assert sub.data.tokenizer == model and sub.student.model.name_or_path == model
    assert make_cfg("experiment=smol_prune_ce", f"teacher.name_or_path={model}").recipe.lam == 0


def test_recipe_picks_its_own_teacher_default_and_command_line_wins(make_cfg):
    assert not make_cfg("recipe=supervised").teacher
    assert make_cfg("recipe=supervised", "teacher=digits_cnn").teacher.model._target_ == "kd.models.DigitsCNN"


def test_unknown_divergence_names_the_options(make_cfg):
    with pytest.raises(Exception) as err:
        make_cfg("divergence=nope")
    message = str(err.value)
    assert "divergence/nope" in message and "forward_kl" in message and "jsd" in message


def test_every_recipe_module_has_a_yaml_and_a_docstring_with_a_command():
    modules = sorted(p.stem for p in (CONF_DIR.parent / "recipes").glob("*.py") if p.stem != "__init__")
    assert set(modules) <= set(options("recipe"))
    for option in options("recipe"):
        target = OmegaConf.load(CONF_DIR / "recipe" / f"{option}.yaml")._target_
        assert target.split(".")[1] in modules, f"recipe/{option}.yaml points outside recipes/"
    for m in modules:
        doc = (CONF_DIR.parent / "recipes" / f"{m}.py").read_text().split('"""')[1]
        assert "kd recipe=" in doc, f"recipes/{m}.py docstring shows no command"


def test_cache_keys_ignore_what_cannot_change_the_weights(make_cfg):
    from kd.subruns import run_key as _run_key

    base = make_cfg("data=task")
    eval_change = make_cfg("data=task", "data.generation_eval_size=7")
    cosmetic = make_cfg("data=task", "trainer.enable_progress_bar=true", "trainer.log_every_n_steps=3")
    training = make_cfg("data=task", "trainer.max_epochs=2")
    assert _run_key(base, weights_only=True) == _run_key(eval_change, weights_only=True)  # the teacher is reused
    assert _run_key(base) != _run_key(eval_change)  # a baseline's cached metrics are not
    assert _run_key(base) == _run_key(cosmetic)
    assert _run_key(base, weights_only=True) != _run_key(training, weights_only=True)
