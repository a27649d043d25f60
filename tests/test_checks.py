"""kd.checks: each rule about what a recipe needs is written once, in check_recipe, and a run
composed from the config (kd.build.build) and a recipe constructed in Python are refused by
it with the same sentence (only the names differ: the config option, or the class name)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf, open_dict
from torch import nn

import kd.build
import kd.checks
import kd.recipe
from kd import ConfigError
from kd.build import build
from kd.checks import check_recipe
from kd.divergences import ForwardKL
from kd.recipe import Needs
from kd.regimes import OnPolicy, TeacherGenerated
from recipes.hinton import Hinton
from recipes.supervised import Supervised
from tests.conftest import SMALL_TASK

NO_TEACHER = [o for o in SMALL_TASK if not o.startswith("teacher")]
TINY_TEACHER = {"model": {"_target_": "kd.models.tiny_causal_lm", "vocab_size": 300, "hidden_size": 32,
                          "num_layers": 1}}

NEEDS_TEACHER = "recipe {recipe} needs a teacher; choose one with teacher=<config> (see conf/teacher/)"
NO_DIVERGENCE = ("recipe {recipe} uses no divergence, so divergence={divergence} would change nothing; drop the "
                 "divergence override or choose a recipe whose loss uses one")
NEEDS_DIVERGENCE = "recipe {recipe} needs a divergence; choose one with divergence=<config> (see conf/divergence/)"
ONE_TEACHER = ("regime=teacher_generated generates data with one teacher, not with routed teachers (teachers:); use "
               "regime=offline or regime=on_policy")


def _refusal(make) -> str:
    with pytest.raises(ConfigError) as err:
        make()
    return str(err.value)


def _routed_cfg(make_cfg):
    cfg = make_cfg(*NO_TEACHER, "recipe=hinton", "teacher=none", "regime=teacher_generated", "data.routes={upper: a}")
    with open_dict(cfg):
        cfg.teachers = OmegaConf.create({"a": TINY_TEACHER})
    return cfg


def _without_divergence(cfg):
    with open_dict(cfg):
        cfg.divergence = None
    return cfg


def test_build_and_the_recipe_call_the_one_function():
    assert kd.build.check_recipe is kd.recipe.check_recipe is kd.checks.check_recipe


@pytest.mark.parametrize("sentence,option,cls,from_config,from_python", [
    (NEEDS_TEACHER, "hinton", Hinton,
     lambda make_cfg: make_cfg("recipe=hinton", "teacher=none"),
     lambda tmp: dict(teacher=None, divergence=ForwardKL())),
    (NO_DIVERGENCE, "supervised", Supervised,
     lambda make_cfg: make_cfg("recipe=supervised", "divergence=forward_kl"),
     lambda tmp: dict(divergence=ForwardKL())),
    (NEEDS_DIVERGENCE, "hinton", Hinton,
     lambda make_cfg: _without_divergence(make_cfg("recipe=hinton")),
     lambda tmp: dict(teacher=nn.Linear(2, 2), divergence=None)),
    (ONE_TEACHER, "hinton", Hinton,
     _routed_cfg,
     lambda tmp: dict(teacher={"a": nn.Linear(2, 2)}, divergence=ForwardKL(), regime=TeacherGenerated(str(tmp)))),
], ids=["needs a teacher", "uses no divergence", "needs a divergence", "one teacher, routed"])
def test_a_rule_refuses_from_the_config_and_from_python_with_one_sentence(sentence, option, cls, from_config,
                                                                          from_python, make_cfg, tmp_path):
    """Composed from the config, the recipe and divergence are named by their options; built
    from Python, by their classes. The sentence is otherwise the same."""
    cfg = from_config(make_cfg)
    assert _refusal(lambda: build(cfg, setup=False)) == sentence.format(recipe=option, divergence="forward_kl")
    assert _refusal(lambda: cls(student=nn.Linear(2, 2), **from_python(tmp_path))) == sentence.format(
        recipe=cls.__name__, divergence="ForwardKL")


def test_check_recipe_takes_plain_facts(tmp_path):
    """The function itself: no config, no models, only the recipe's needs and the facts."""
    hinton = Needs(divergence=True)
    check_recipe("hinton", hinton, teacher=True, divergence="forward_kl")  # nothing missing, nothing ignored
    check_recipe("hinton", hinton, teacher=True, routed=True, divergence="jsd", regime=OnPolicy())
    with pytest.raises(ConfigError, match=r"^recipe probe needs a teacher"):
        check_recipe("probe", Needs(), teacher=False)
    with pytest.raises(ConfigError, match=r"^recipe probe cannot train with regime=on_policy; use regime=offline$"):
        check_recipe("probe", Needs(regimes=("offline",)), teacher=True, regime=OnPolicy())
    with pytest.raises(ConfigError, match=r"^recipe probe gives its teacher its own tokenizer, which routed teachers"):
        check_recipe("probe", Needs(teacher_tokenizer="own"), teacher=True, routed=True)
    check_recipe("probe", Needs(teacher_tokenizer="own"), teacher=True, routed=False)
    own = Needs(teacher_tokenizer="own", regimes=("offline", "on_policy", "mixed"))
    with pytest.raises(ConfigError, match=r"^cross-tokenizer recipes cannot train on teacher-generated tokens"):
        check_recipe("probe", own, teacher=True, regime=TeacherGenerated(str(tmp_path)))  # before the regime list
