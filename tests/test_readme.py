"""The README's "Adding a recipe" example, run exactly as printed: one class, one yaml."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import recipes
from kd.runs import train as run

README = Path(__file__).resolve().parent.parent / "README.md"


def block_after(marker: str, lang: str) -> str:
    text = README.read_text()
    start = text.index(marker)
    match = re.compile(rf"```{lang}\n(.*?)```", re.S).search(text, start)
    assert match, f"no {lang} block after {marker!r}"
    return match.group(1)


def test_readme_recipe_example_runs(make_cfg, tmp_path, monkeypatch):
    ext = tmp_path / "ext"
    (ext / "recipes").mkdir(parents=True)
    (ext / "conf" / "recipe").mkdir(parents=True)
    (ext / "recipes" / "logit_matching.py").write_text(block_after("`recipes/logit_matching.py`", "python"))
    (ext / "conf" / "recipe" / "logit_matching.yaml").write_text(block_after("`conf/recipe/logit_matching.yaml`", "yaml"))
    monkeypatch.setattr(recipes, "__path__", [*recipes.__path__, str(ext / "recipes")])

    cfg = make_cfg("recipe=logit_matching", "debug=fast_dev_run", f"hydra.searchpath=[file://{ext / 'conf'}]")
    summary = run(cfg)
    assert set(summary["results"]) == {"teacher", "student, from scratch", "student, logit_matching"}


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
    assert not any("pip install" in line and line != block[0] for line in ci), "CI installs nothing the README does not"
    import tomllib

    extras = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert '.[test]' in block[0]
    named = {r.split("[")[1].split("]")[0] for r in extras["test"] if r.startswith("kd[")}
    covered = set(extras["test"]) | {dep for group in named for extra in group.split(",") for dep in extras[extra]}
    for needed in ("accelerate", "gguf", "datasets", "chatterbot-corpus", "gensim"):
        assert any(d.startswith(needed) for d in covered), needed
