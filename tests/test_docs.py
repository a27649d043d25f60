"""The documentation site: its generated pages follow the code and ``conf/``, it builds in
strict mode offline (a broken link, a missing page or a stale generated page fails), and the
README stays short and links to every page."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"


def _gen(root: Path = ROOT):
    spec = importlib.util.spec_from_file_location("kd_docs_gen_test", root / "docs" / "gen.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen():
    return _gen()


@pytest.fixture(scope="module")
def pages(gen):
    return gen.pages()


def test_the_committed_generated_pages_are_what_the_code_and_conf_give_now(gen, pages):
    assert gen.stale(pages) == [], "run `python docs/gen.py` and commit the pages"


def test_every_recipe_config_has_a_page_with_its_docstring_and_every_knob(pages):
    recipes = sorted(p.stem for p in (ROOT / "conf" / "recipe").glob("*.yaml"))
    assert sorted(p.removeprefix("recipes/").removesuffix(".md") for p in pages if p.startswith("recipes/")) == recipes
    for name in recipes:
        conf = yaml.safe_load((ROOT / "conf" / "recipe" / f"{name}.yaml").read_text())
        module, _, _ = conf["_target_"].rpartition(".")
        source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
        page = pages[f"recipes/{name}.md"]
        # the module docstring's first line (the paper), in the page
        first = re.match(r'\s*"""(.+)', source).group(1).strip()
        first = re.sub(r"``([^`]+)``", r"`\1`", first)
        assert first in page, (name, first)
        # every knob of the yaml file with its value, in the knobs table
        for key, value in conf.items():
            if key in ("_target_", "defaults") or isinstance(value, dict):
                continue
            shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
            assert re.search(rf"^\| `{re.escape(key)}` \| `{re.escape(shown)}` \|", page, re.M), (name, key, shown)


def test_hinton_page_gives_the_constructor_defaults_and_what_it_selects(pages):
    page = pages["recipes/hinton.md"]
    assert "| `lam` | `0.5` | `0.5` |" in page and "| `temperature` | `4.0` | `4.0` |" in page
    assert "divergence `kd.divergences.ForwardKL`" in page
    assert "L = (1 - lam) * CE(y, softmax(z_s)) + lam * T^2 * D(softmax(z_t / T) || softmax(z_s / T))" in page


def test_the_config_reference_lists_every_group_option_and_leaf_key(pages):
    page = pages["config.md"]
    for folder in sorted(p for p in (ROOT / "conf").iterdir() if p.is_dir()):
        assert f"\n## {folder.name} " in page, folder.name
        for option in sorted(folder.glob("*.yaml")):
            heading = f"### {folder.name}: {option.stem} "
            assert heading in page, heading
            section = page.split(heading, 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
            data = yaml.safe_load(option.read_text()) or {}

            def leaves(d, prefix=""):
                for k, v in d.items():
                    if prefix == "" and k == "defaults":
                        continue
                    if isinstance(v, dict) and v:
                        yield from leaves(v, f"{prefix}{k}.")
                    else:
                        yield prefix + str(k)

            for key in leaves(data):
                assert f"| `{key}` |" in section, (option, key)
    # a value read back: the quickstart's default epochs and the JSD's beta
    jsd = page.split("### divergence: jsd ", 1)[1].split("\n### ", 1)[0]
    assert "| `beta` | `0.5` |" in jsd


def test_a_changed_config_makes_its_pages_stale(tmp_path, monkeypatch):
    """The check the build hook and the test above rely on: with hinton's lam changed in a
    copy of conf/, the hinton page and the config reference are named stale, nothing else."""
    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf)
    path = conf / "recipe" / "hinton.yaml"
    path.write_text(path.read_text().replace("lam: 0.5", "lam: 0.7"))
    gen = _gen()
    monkeypatch.setattr(gen, "CONF", conf)
    assert sorted(gen.stale()) == ["config.md", "recipes/hinton.md"]


def _mkdocs(root: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1",
           # offline: any attempt to reach the network fails at once
           "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_the_site_builds_in_strict_mode_offline(tmp_path):
    done = _mkdocs(ROOT, tmp_path / "site")
    assert done.returncode == 0, done.stderr[-3000:]
    site = tmp_path / "site"
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]

    def files(items):
        for item in items:
            if isinstance(item, str):
                yield item
            else:
                for value in item.values():
                    yield from (files(value) if isinstance(value, list) else [value])

    listed = set(files(nav))
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert listed == pages, (pages - listed, listed - pages)
    for page in pages:
        html = site / (page.removesuffix(".md").removesuffix("index").rstrip("/") + "/index.html"
                       if page != "index.md" else "index.html")
        assert html.is_file(), page
    api = (site / "api" / "index.html").read_text()
    assert "DistillationRecipe" in api and "compute_loss" in api  # mkdocstrings rendered the docstrings
    assert "Hinton, Vinyals" in (site / "recipes" / "hinton" / "index.html").read_text()
    assert (site / "img" / "report_test_acc.png").is_file()


def _copy_site_sources(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copytree(DOCS, root / "docs", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "mkdocs.yml", root / "mkdocs.yml")
    for name in ("kd", "recipes", "conf"):
        (root / name).symlink_to(ROOT / name)
    return root


def test_a_broken_link_or_a_stale_generated_page_fails_the_build(tmp_path):
    root = _copy_site_sources(tmp_path)
    page = root / "docs" / "scale.md"
    page.write_text(page.read_text() + "\nSee [nowhere](no-such-page.md).\n")
    (root / "docs" / "recipes" / "gkd.md").write_text("# stale\n")
    done = _mkdocs(root, tmp_path / "site")
    assert done.returncode != 0
    assert "docs/recipes/gkd.md" in done.stderr and "python docs/gen.py" in done.stderr  # the hook stops it first
    (root / "docs" / "recipes" / "gkd.md").write_text((DOCS / "recipes" / "gkd.md").read_text())
    done = _mkdocs(root, tmp_path / "site")
    assert done.returncode != 0 and "no-such-page.md" in done.stderr


def test_the_readme_is_short_and_links_to_every_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    linked = set(re.findall(r"\]\(docs/([^)#]+\.md)", text))
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert pages - linked == set()
    assert all((DOCS / p).is_file() for p in linked)
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert images and all((ROOT / i).is_file() for i in images)


def test_what_the_readme_lost_is_on_a_docs_page():
    """Sentences of the former README that the docs carry now: the results' readings and
    the references newcomers look for (a sample, each from a different part)."""
    docs = "\n".join(p.read_text() for p in DOCS.rglob("*.md"))
    for moved in ("Experiment B in one line", "Experiment C in one line", "Which layers are kept matters far more",
                  "A stopped run resumes as if it had never stopped", "A config is code.",
                  "**Loss memory and time**", "Junk records of `jsonl` and `hf` data",
                  "`Needs` fields:", "LoRA students: `peft=lora`", "Real pretrained models offline"):
        assert moved in docs, moved


def test_the_readmes_commands_compose():
    """Each command of the README's "ten commands" without a placeholder is a config kd
    composes (a renamed option or key would fail here before a reader tries it)."""
    import shlex

    from kd.config import compose_config

    block = re.search(r"## Ten commands.*?```bash\n(.*?)```", README.read_text(), re.S).group(1)
    commands = [re.sub(r"\s+#.*$", "", c).strip() for c in block.replace("\\\n", " ").splitlines()]
    runnable = [c for c in commands if c.startswith("kd ") and not c.startswith("kd -m") and "<" not in c
                and "..." not in c]
    assert len(runnable) >= 5
    for command in runnable:
        compose_config(*shlex.split(command)[1:])
    assert any(c.startswith("kd -m ") for c in commands) and any(c.startswith("kd-report ") for c in commands)
