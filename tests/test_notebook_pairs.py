"""The notebook sources (notebooks/NN_name.py, jupytext percent format) and the executed notebooks
(notebooks/NN_name.ipynb) must hold the same cells; scripts/notebooks.py is the check."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("nbtool", ROOT / "scripts" / "notebooks.py")
nbtool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nbtool)

PAIRS = nbtool.pairs()


def test_every_numbered_notebook_has_a_source():
    assert [py.stem for py, _ in PAIRS] == [
        "01_probe", "02_classify", "03_freeze_finetune", "04_alignment_budget", "05_figures"]


@pytest.mark.parametrize("py,nb", PAIRS, ids=[p.stem for p, _ in PAIRS])
def test_source_and_notebook_agree(py, nb):
    assert nbtool.diff(py, nb) is None


@pytest.mark.parametrize("py,nb", PAIRS, ids=[p.stem for p, _ in PAIRS])
def test_committed_notebook_has_no_volatile_metadata(py, nb):
    book = nbformat.read(nb, as_version=4)
    assert set(book.metadata) <= set(nbtool.KEEP_NB_METADATA)
    for cell in book.cells:
        assert set(cell.metadata) <= set(nbtool.KEEP_CELL_METADATA), cell.metadata


def test_check_catches_an_edit_to_either_side(tmp_path):
    py, nb = PAIRS[0]
    shutil.copy(py, tmp_path / py.name)
    shutil.copy(nb, tmp_path / nb.name)
    text = (tmp_path / py.name).read_text()
    (tmp_path / py.name).write_text(text.replace("# %% [markdown]\n# # 01", "# %% [markdown]\n# # 01 edited", 1))
    assert "cell 0 differs in source" in nbtool.diff(tmp_path / py.name, tmp_path / nb.name)
    (tmp_path / py.name).write_text(text + "\n# %%\nprint('a new cell')\n")
    assert "cells" in nbtool.diff(tmp_path / py.name, tmp_path / nb.name)
    book = nbformat.read(tmp_path / nb.name, as_version=4)
    book.cells[1].metadata["tags"] = ["other"]
    nbformat.write(book, tmp_path / nb.name)
    (tmp_path / py.name).write_text(text)
    assert "differs in tags" in nbtool.diff(tmp_path / py.name, tmp_path / nb.name)


def test_source_round_trips_to_an_unexecuted_notebook(tmp_path):
    py, nb = PAIRS[1]
    out = tmp_path / "x.ipynb"
    nbtool.to_ipynb(py, out)
    fresh = nbformat.read(out, as_version=4)
    assert nbtool.source_cells(fresh) == nbtool.source_cells(nbformat.read(nb, as_version=4))
    assert all(not c.get("outputs") for c in fresh.cells if c.cell_type == "code")
    assert fresh.metadata["kernelspec"]["name"] == "python3"


def test_finalize_refuses_a_notebook_with_an_error_and_leaves_the_target(tmp_path):
    py, nb = PAIRS[0]
    run, dst = tmp_path / "run.ipynb", tmp_path / "dst.ipynb"
    shutil.copy(nb, dst)
    before = dst.read_bytes()
    book = nbformat.read(nb, as_version=4)
    code = next(c for c in book.cells if c.cell_type == "code")
    code.outputs = [nbformat.v4.new_output("error", ename="RuntimeError", evalue="boom", traceback=[])]
    nbformat.write(book, run)
    with pytest.raises(SystemExit, match="error outputs"):
        nbtool.finalize(run, dst)
    assert dst.read_bytes() == before
    assert not list(tmp_path.glob(".dst.ipynb.*"))
