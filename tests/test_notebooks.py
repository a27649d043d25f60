"""notebooks/ run top to bottom in their fast setting (KD_NOTEBOOK_FAST=1: seconds-long runs,
caches and outputs in a temporary directory), and are committed without outputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_three_notebooks_committed_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart_explained.ipynb", "02_your_own_models.ipynb",
                                           "03_compare_divergences.ipynb"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and all(not c.outputs and c.execution_count is None for c in code), path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("KD_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("KD_NOTEBOOK_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the failing cell, on any error
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if "image/png" in o.get("data", {})]
    if path.stem != "02_your_own_models":  # the other two are about plots
        assert images, "the notebook shows its plots"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert not errors and os.environ["KD_NOTEBOOK_FAST"] == "1"
