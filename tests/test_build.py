"""The composition root (kd.build): recipes declare what they need, shared code reads only
that, groups are honest, knobs travel from the command line to the loss, one default per knob."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
import torch
from hydra.utils import get_class
from omegaconf import OmegaConf
from torch import Tensor

from kd import ConfigError
from kd.build import build
from kd.cli import CONF_DIR
from kd.evaluation import cross_entropy
from kd.recipe import DistillationRecipe, Needs
from tests.conftest import SMALL_TASK

ROOT = CONF_DIR.parent


def test_the_library_imports_nothing_from_recipes():
    for path in sorted((ROOT / "kd").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n == "recipes" or n.startswith("recipes.") for n in names), f"{path} imports {names}"


def test_the_cli_is_a_thin_shell():
    source = (ROOT / "kd" / "cli.py").read_text()
    assert len(source.splitlines()) < 200
    recipe_names = {p.stem for p in (CONF_DIR / "recipe").glob("*.yaml")}
    code = ast.unparse(ast.parse(source))  # no comments or docstring layout, names and strings only
    for name in recipe_names:
        assert f"'{name}'" not in code and f"recipes.{name}" not in code


def _code(cls) -> str:
    """The code (docstrings dropped) of a recipe class and of its bases in recipes/."""
    parts = []
    for klass in cls.__mro__:
        if klass.__module__.startswith("recipes."):
            tree = ast.parse(inspect.getsource(klass).lstrip())
            for node in ast.walk(tree):
                if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node) is not None:
                    node.body = node.body[1:] or [ast.Pass()]
            parts.append(ast.unparse(tree))
    return "\n".join(parts)


def test_every_shipped_recipe_declares_its_needs():
    """Each recipe class states its needs in its own body (inheriting the base class's default would
    make isinstance(cls.needs, Needs) true for any recipe), and what it declares is what its code does:
    a teacher, a divergence, hidden states, the teacher's own tokenizer, its own loop."""
    seen = set()
    for option in sorted(p.stem for p in (CONF_DIR / "recipe").glob("*.yaml")):
        cls = get_class(OmegaConf.load(CONF_DIR / "recipe" / f"{option}.yaml")._target_)
        assert "needs" in vars(cls) and type(cls.needs) is Needs, option
        uses = "divergence" in inspect.getsource(cls.compute_loss) if "compute_loss" in vars(cls) else False
        if uses:  # a recipe whose loss calls self.divergence must say so
            assert cls.needs.divergence, option
        code, needs = _code(cls), cls.needs
        assert needs.divergence == ("self.divergence" in code), option
        assert bool(needs.teacher) == any(t in code for t in ("self.teacher", "teacher_outputs(")), option
        # the outputs' hidden states (``out.hidden``), not a fused head's input (``logits.hidden``)
        assert needs.hidden_states == bool(re.search(r"(?<!logits)\.hidden\b", code)), option
        assert (needs.teacher_tokenizer == "own") == ("teacher_prompt_ids" in code), option
        assert needs.own_loop == any(t in code for t in ("manual_backward(", "buffer_updates(")), option
        seen.add(cls)
    # the checks above see both sides of every flag
    for flag in ("teacher", "divergence", "hidden_states", "own_loop"):
        assert {bool(getattr(c.needs, flag)) for c in seen} == {True, False}, flag


# ----------------------------------------------------------------------------- honest groups


def test_a_divergence_on_a_recipe_without_one_is_refused(make_cfg):
    with pytest.raises(ConfigError, match="uses no divergence, so divergence=uld would change nothing"):
        build(make_cfg("recipe=supervised", "divergence=uld"), setup=False)
    with pytest.raises(ConfigError, match="uses no divergence"):
        build(make_cfg(*SMALL_TASK, "recipe=seqkd", "divergence=jsd"), setup=False)
    assert build(make_cfg("recipe=supervised"), setup=False).recipe.divergence is None


def test_the_refusal_is_one_sentence_from_the_console_script(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "KD_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", "from kd.cli import main; main()", "recipe=supervised",
                           "divergence=uld"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "kd: error: recipe supervised uses no divergence, so divergence=uld would change nothing; drop the "
        "divergence override or choose a recipe whose loss uses one"]
    assert not (tmp_path / "cache").exists()


def test_one_knob_walks_from_the_command_line_to_the_loss(make_cfg):
    """divergence.beta=0.9: Hydra composes it into cfg.divergence, build instantiates the
    divergence group and hands it to the recipe, compute_loss calls it."""
    run = build(make_cfg(*SMALL_TASK, "recipe=gkd", "divergence.beta=0.9"), setup=False)
    assert type(run.recipe.divergence).__name__ == "JSD" and run.recipe.divergence.beta == 0.9
    default = build(make_cfg(*SMALL_TASK, "recipe=gkd"), setup=False)
    assert default.recipe.divergence.beta == 0.5  # one default, in conf/divergence/jsd.yaml


def test_sampling_is_one_typed_setting(make_cfg):
    from kd.generation import Sampling

    run = build(make_cfg(*SMALL_TASK, "recipe=gkd", "regime.sampling.temperature=0.3"), setup=False)
    assert run.recipe.regime.sampling == Sampling(temperature=0.3)
    minillm = build(make_cfg(*SMALL_TASK, "recipe=minillm", "recipe.sampling.top_k=5"), setup=False)
    assert minillm.recipe.sampling == Sampling(top_k=5)
    with pytest.raises(ConfigError, match="top_p must be in"):
        build(make_cfg(*SMALL_TASK, "recipe=gkd", "regime.sampling.top_p=0"), setup=False)


def _constructor_defaults(target: str) -> dict:
    cls = get_class(target)
    params = {}
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            for name, p in inspect.signature(klass.__init__).parameters.items():
                if p.default is not inspect.Parameter.empty:
                    params.setdefault(name, p.default)
    return params


#: named settings that differ from their class on purpose (a different option, not a default)
VARIANTS = {("recipe", "word_kd"): {"alpha"}}


@pytest.mark.parametrize("group", ["recipe", "divergence", "regime"])
def test_yaml_values_are_the_classes_defaults(group, make_cfg):
    """One default per knob: a group option, as composed (with the fragments its defaults list
    merges: conf/sampling/, conf/token_loss/), lists a class's knobs (so plain overrides and
    sweeps find their key) with the class's own defaults, never a second value."""
    from kd.generation import Sampling

    sampling = {k: f.default for k, f in Sampling.__dataclass_fields__.items()}
    for path in sorted((CONF_DIR / group).glob("*.yaml")):
        composed = make_cfg(f"{group}={path.stem}")[group]
        node = OmegaConf.to_container(composed, resolve=False)
        defaults = _constructor_defaults(node["_target_"])
        for key, value in node.items():
            if key == "_target_" or (group, path.stem) in VARIANTS and key in VARIANTS[(group, path.stem)]:
                continue
            if isinstance(value, str) and value.startswith("${"):
                continue
            if key == "sampling":
                assert value == sampling, f"{path.name}: sampling"
            elif isinstance(value, dict):
                continue
            else:
                assert key in defaults and defaults[key] == value, f"{path.name}: {key}={value} vs {defaults.get(key)}"


def test_shared_fragments_are_merged_where_their_knobs_are(make_cfg):
    """The token-loss and sampling settings are written once (conf/token_loss/, conf/sampling/)
    and reach every config that has those knobs, where a plain override still changes them."""
    token_keys = set(OmegaConf.load(CONF_DIR / "token_loss" / "default.yaml"))
    sampling_keys = set(OmegaConf.load(CONF_DIR / "sampling" / "default.yaml"))
    assert token_keys == {"select", "keep", "chunked", "chunk_size", "compile"}
    def nodes(node):
        yield node
        for value in node.values():
            if isinstance(value, dict):
                yield from nodes(value)

    for path in sorted(CONF_DIR.rglob("*.yaml")):
        if path.parent.name in ("token_loss", "sampling"):
            continue
        own = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        assert not any(set(n) == sampling_keys for n in nodes(own)), f"{path}: a copy of conf/sampling/default.yaml"
        if path.parent.name in ("divergence", "recipe"):
            # recipes outside the token loss (minillm, cross_stage, byte_kd) have one switch of their
            # own, chunked (their fused path); any other key of the fragment is a copy of it
            assert not (token_keys - {"chunked"}) & set(own), f"{path}: a copy of conf/token_loss/default.yaml"
            if "chunked" in own:
                assert "token_loss" not in str(OmegaConf.load(path).get("defaults", "")), path
    for option in ("forward_kl", "jsd", "tvd"):
        assert token_keys <= set(make_cfg(f"divergence={option}").divergence)
    for option in ("seqkd", "word_kd"):
        assert token_keys <= set(make_cfg(f"recipe={option}").recipe)
    cfg = make_cfg("recipe=minillm", "regime=on_policy", "recipe.sampling.top_k=5", "regime.sampling.temperature=0.5")
    assert (cfg.recipe.sampling.top_k, cfg.regime.sampling.temperature, cfg.regime.sampling.top_k) == (5, 0.5, 0)
    assert make_cfg("recipe=word_kd", "recipe.chunked=false").recipe.chunked is False


def test_the_teacher_layer_init_is_a_top_level_knob_and_the_old_key_is_refused(make_cfg):
    assert make_cfg().student_init_from_teacher is None
    assert make_cfg("data=text").student_init_from_teacher == "even"  # data=text brings student=from_teacher
    assert build(make_cfg("data=text", "student_init_from_teacher=block"), setup=False).init_scheme == "block"
    assert build(make_cfg("data=text", "student_init_from_teacher=null"), setup=False).init_scheme is None
    with pytest.raises(ConfigError, match=r"^student.init_from_teacher is now the top-level student_init_from_teacher; "
                                          r"set student_init_from_teacher=block instead$"):
        build(make_cfg("data=text", "+student.init_from_teacher=block"), setup=False)


def test_the_optimizer_a_recipe_falls_back_to_is_the_configs(make_cfg):
    from functools import partial

    from kd.config import instantiate
    from recipes.supervised import Supervised

    configured = instantiate(make_cfg().optimizer)
    fallback = Supervised(student=torch.nn.Linear(2, 2)).optimizer_factory
    assert isinstance(configured, partial) and isinstance(fallback, partial)
    assert (fallback.func, fallback.keywords) == (configured.func, configured.keywords)


# ----------------------------------------------------------------------------- a new recipe's needs


class _Probe(DistillationRecipe):
    """A recipe defined outside the zoo: build must honour what it declares."""

    needs = Needs(teacher=False, hidden_states=True, regimes=("offline",))

    def compute_loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        out = self.outputs(self.student, batch)
        assert out.hidden is not None and out.hidden.shape[:2] == out.logits.shape[:2]
        ce = cross_entropy(out.logits, out.labels)
        return {"loss": ce}


class _OwnLoop(_Probe):
    needs = Needs(teacher=False, own_loop=True)


def _probe_cfg(make_cfg, target: str, *overrides: str):
    cfg = make_cfg(*SMALL_TASK, "recipe=supervised", *overrides)
    cfg.recipe._target_ = target
    return cfg


def test_build_reads_a_new_recipes_needs(make_cfg):
    run = build(_probe_cfg(make_cfg, f"{__name__}._Probe"))
    assert run.teacher is None and run.recipe.regime.name == "offline"
    batch = next(iter(run.datamodule.train_dataloader()))
    assert torch.isfinite(run.recipe.compute_loss(batch)["loss"])  # hidden states arrive
    with pytest.raises(ConfigError, match="cannot train with regime=on_policy; use regime=offline"):
        build(_probe_cfg(make_cfg, f"{__name__}._Probe", "regime=on_policy"), setup=False)
    own = build(_probe_cfg(make_cfg, f"{__name__}._OwnLoop"), setup=False)
    assert own.recipe.automatic_optimization is False
    with pytest.raises(ConfigError, match="runs its own optimisation loop"):
        build(_probe_cfg(make_cfg, f"{__name__}._OwnLoop", "trainer.accumulate_grad_batches=2"), setup=False)


def test_a_recipe_with_its_own_teacher_tokenizer_gets_it_on_the_datamodule(make_cfg):
    from tests.test_byte_kd import SMALL_PAIR

    run = build(make_cfg(*SMALL_PAIR, "recipe=uld"))
    dm = run.datamodule
    assert dm.teacher_tokenizer is not None
    # it is the teacher's own: the one its fit trains it with (300 tokens, not the data's 600), not the data's
    assert len(dm.tokenizer) > 300 >= len(dm.teacher_tokenizer)
    assert len(dm.teacher_tokenizer) <= run.teacher.get_input_embeddings().num_embeddings == 300
    assert dm.teacher_tokenizer.get_vocab() != dm.tokenizer.get_vocab()
    batch = next(iter(dm.train_dataloader()))
    assert "teacher_prompt_ids" in batch
    # ... and batches carry each prompt in its tokens: the same text as the data's prompt, tokenized otherwise
    differ = 0
    for r in range(len(batch["prompt_ids"])):
        ours = batch["prompt_ids"][r][batch["prompt_mask"][r].bool()].tolist()
        theirs = batch["teacher_prompt_ids"][r][batch["teacher_prompt_mask"][r].bool()].tolist()
        assert dm.teacher_tokenizer.decode(theirs, skip_special_tokens=True) == dm.tokenizer.decode(
            ours, skip_special_tokens=True)
        assert theirs == dm.teacher_tokenizer(dm.tokenizer.decode(ours), add_special_tokens=False)["input_ids"]
        differ += theirs != ours
    assert differ > 0
    shared = build(make_cfg(*SMALL_TASK, "recipe=hinton"))
    assert shared.datamodule.teacher_tokenizer is None
