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
