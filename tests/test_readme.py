"""The "Adding a recipe" example (docs/adding-a-recipe.md), run exactly as printed: one class,
one yaml; and the README's commands, which CI runs verbatim."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import recipes
from kd.models import tiny_causal_lm
from kd.runs import train as run

README = Path(__file__).resolve().parent.parent / "README.md"
ADDING = README.parent / "docs" / "adding-a-recipe.md"


def block_after(marker: str, lang: str, page: Path = README) -> str:
    text = page.read_text()
    start = text.index(marker)
    match = re.compile(rf"```{lang}\n(.*?)```", re.S).search(text, start)
    assert match, f"no {lang} block after {marker!r}"
    return match.group(1)


@pytest.fixture
def readme_recipe(tmp_path, monkeypatch):
    """The docs' example recipe, written out as printed; returns its conf directory."""
    ext = tmp_path / "ext"
    (ext / "recipes").mkdir(parents=True)
    (ext / "conf" / "recipe").mkdir(parents=True)
    (ext / "recipes" / "logit_matching.py").write_text(block_after("`recipes/logit_matching.py`", "python", ADDING))
    (ext / "conf" / "recipe" / "logit_matching.yaml").write_text(block_after("`conf/recipe/logit_matching.yaml`", "yaml", ADDING))
    monkeypatch.setattr(recipes, "__path__", [*recipes.__path__, str(ext / "recipes")])
    return ext / "conf"


def test_readme_recipe_example_runs(make_cfg, readme_recipe):
    cfg = make_cfg("recipe=logit_matching", "debug=fast_dev_run", f"hydra.searchpath=[file://{readme_recipe}]")
    summary = run(cfg)
    assert set(summary["results"]) == {"teacher", "student, from scratch", "student, logit_matching"}
    student = summary["results"]["student, logit_matching"]
    assert 0.0 <= student["test/acc"] <= 1.0 and student["test/loss"] > 0


def test_readme_recipe_with_routed_teachers_counts_only_rows_that_have_a_teacher(readme_recipe):
    """Two routed teachers and a row routed to none: the example's loss equals the mean squared
    logit difference over the positions of rows that have a teacher, each against its own
    teacher (hand-computed here from plain forwards); the row without one changes nothing."""
    from importlib import import_module

    LogitMatching = import_module("recipes.logit_matching").LogitMatching
    V = 40
    models = [tiny_causal_lm(vocab_size=V, hidden_size=16, num_layers=1, num_heads=2) for _ in range(3)]
    student, a, b = models
    recipe = LogitMatching(student=student, teacher={"a": a, "b": b})
    torch.manual_seed(0)
    ids = torch.randint(3, V, (3, 7))
    labels = ids.clone()
    labels[:, :3] = -100  # prompt positions
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "teacher_index": torch.tensor([1, -1, 0])}
    loss = recipe.compute_loss(batch)["loss"]

    with torch.no_grad():
        squares = []
        for row, teacher in ((0, b), (2, a)):
            s = student(input_ids=ids[row:row + 1]).logits[0, :-1]
            t = teacher(input_ids=ids[row:row + 1]).logits[0, :-1]
            valid = labels[row, 1:] != -100
            squares.append((s - t).pow(2).mean(-1)[valid])
        expected = torch.cat(squares).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_readme_recipe_with_a_cached_top_k_teacher_is_refused_in_one_sentence(make_cfg, readme_recipe):
    """Its loss reads the teacher's logits as a tensor, so regime=teacher_logits (a top-k
    cache) is refused before anything trains, not an AttributeError in the first step."""
    from kd import ConfigError
    from kd.build import build
    from tests.conftest import SMALL_TASK

    cfg = make_cfg(*SMALL_TASK, "recipe=logit_matching", "regime=teacher_logits",
                   f"hydra.searchpath=[file://{readme_recipe}]")
    with pytest.raises(ConfigError) as err:
        build(cfg, setup=False)
    assert str(err.value) == ("regime=teacher_logits gives the loss a cached top-k teacher (k ids and a tail bin), "
                              "which recipe logit_matching's loss does not take (it takes logits); use regime=offline")


def test_readme_commands_exist():
    text = README.read_text()
    assert ".venv/bin/python -m pytest -q" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert ".venv/bin/python -m pytest -q" in ci, "CI must run the README's test command"
    assert "kd -m divergence=forward_kl,reverse_kl,jsd seed=0,1,2" in text


def test_ci_runs_exactly_the_readme_commands():
    """The README's setup and test commands are the contract: .ci/run runs them verbatim,
    and the setup installs every extra the suite imports (through the test extra)."""
    block = block_after("## Quickstart", "bash").strip().splitlines()
    assert len(block) == 2
    ci = [line.strip() for line in (README.parent / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert block[0] in ci and block[1] in ci
    assert ci.index(block[0]) < ci.index(block[1])
    assert not any("pip install" in line and line not in block for line in ci), "CI installs nothing the README does not"
    import tomllib

    extras = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert '.[test]' in block[0]
    named = {r.split("[")[1].split("]")[0] for r in extras["test"] if r.startswith("kd[")}
    covered = set(extras["test"]) | {dep for group in named for extra in group.split(",") for dep in extras[extra]}
    for needed in ("accelerate", "gguf", "datasets", "chatterbot-corpus", "gensim"):
        assert any(d.startswith(needed) for d in covered), needed
