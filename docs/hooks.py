"""MkDocs hook: the build fails when a generated page (``docs/gen.py``) differs from what
the code and ``conf/`` give now, so the site can never show a stale recipe page or config
table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mkdocs.exceptions import PluginError


def on_pre_build(config, **kwargs) -> None:
    spec = importlib.util.spec_from_file_location("kd_docs_gen", Path(__file__).with_name("gen.py"))
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    bad = gen.stale()
    if bad:
        raise PluginError(f"generated pages are stale: {', '.join('docs/' + p for p in bad)}; "
                          "run `python docs/gen.py` and commit them")
