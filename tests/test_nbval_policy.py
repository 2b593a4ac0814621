"""The nbval masking rule (tests/nbval_policy.py) is applied exactly, and its tolerance check can fail."""

import sys
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nbval_policy as P  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _tagged(nb_name: str) -> set[str]:
    nb = nbformat.read(ROOT / "notebooks" / f"{nb_name}.ipynb", as_version=4)
    return {c.source.splitlines()[0] for c in nb.cells
            if c.cell_type == "code" and P.IGNORE_TAG in c.metadata.get("tags", [])}


@pytest.mark.parametrize("nb_name", sorted(P.MACHINE_DEPENDENT_CELLS))
def test_exactly_the_listed_cells_are_masked_in_the_notebook(nb_name):
    assert _tagged(nb_name) == set(P.MACHINE_DEPENDENT_CELLS[nb_name])


def test_every_notebook_has_an_entry_and_no_other_masking_tag():
    names = {p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")}
    assert names == set(P.MACHINE_DEPENDENT_CELLS)
    for name in names:
        nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
        for c in nb.cells:  # nbval-skip would hide a cell from every check
            assert "nbval-skip" not in c.metadata.get("tags", []), (name, c.source[:60])


def _percent_tagged(path: Path) -> set[str]:
    """First source lines of the cells tagged IGNORE_TAG in a jupytext percent script (`# %% tags=[...]`)."""
    lines, out = path.read_text().splitlines(), set()
    for i, line in enumerate(lines):
        if line.startswith("# %%") and P.IGNORE_TAG in line:
            body = next((x for x in lines[i + 1:] if x.strip()), "")
            out.add(body)
    return out


@pytest.mark.parametrize("nb_name", sorted(P.MACHINE_DEPENDENT_CELLS))
def test_jupytext_sources_tag_the_same_cells(nb_name):
    """The notebook's jupytext percent source (what a contributor edits) tags the same cells."""
    assert _percent_tagged(ROOT / "notebooks" / f"{nb_name}.py") == set(P.MACHINE_DEPENDENT_CELLS[nb_name])


def test_every_machine_dependent_table_is_committed():
    committed = {p.stem for p in (ROOT / "tables").glob("*.csv")}
    assert set(P.MACHINE_DEPENDENT_TABLES) <= committed


def test_committed_tables_agree_with_themselves():
    rep = P.compare_folders(ROOT / "tables", ROOT / "tables")
    assert rep.ok and rep.compared == len(list((ROOT / "tables").glob("*.csv")))


def test_tolerance_rule_accepts_within_and_rejects_beyond():
    ref = pd.DataFrame({"condition": ["full", "ru_only"], "harmful": [0.17, 19.4], "harmful_sd": [0.3, 3.5],
                        "ppl": [4.45, 4.6], "train_seconds": [78.0, 70.0], "run": ["10.2 ± 0.2%", "3 of 8"]})
    tol = P.TRAINED
    assert P.compare_tables(ref, ref.copy(), tol) == []
    ok = ref.assign(harmful=[5.0, 29.0], ppl=[4.9, 4.0], train_seconds=[1.0, 999.0], run=["12.0 ± 0.9%", "3 of 8"])
    assert P.compare_tables(ref, ok, tol) == []  # 8 points; 3 sd = 10.5; 15% ppl; timings ignored
    bad = ref.assign(harmful=[9.0, 19.4])
    assert P.compare_tables(ref, bad, tol) == ["row 0, harmful: committed 0.17, run 9.0"]
    assert P.compare_tables(ref, ref.assign(run=["10.2 ± 0.2%", "3 of 9 x"]), tol)  # text changed
    assert P.compare_tables(ref, ref.assign(run=["30.2 ± 0.2%", "3 of 8"]), tol)  # number in text beyond
    assert P.compare_tables(ref, ref.assign(ppl=[np.nan, 4.6]), tol)  # a value became NaN
    assert P.compare_tables(ref, ref.iloc[:1], tol) == ["2 rows committed, 1 in the run"]
    assert P.compare_tables(ref, ref.drop(columns="ppl"), tol)[0].startswith("columns differ")
    exact = pd.DataFrame({"x": [0.1234, 1000.0]})
    assert P.compare_tables(exact, exact.assign(x=[0.1235, 1001.0]), P.EXACT) == []
    assert P.compare_tables(exact, exact.assign(x=[0.1240, 1000.0]), P.EXACT)
    verdicts = pd.DataFrame({"verdict": ["holds"]})
    assert P.compare_tables(verdicts, verdicts.assign(verdict=["does not hold on this model"]), tol)


def test_a_missing_or_extra_table_fails(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    pd.DataFrame({"x": [1]}).to_csv(tmp_path / "a" / "t1.csv", index=False)
    rep = P.compare_folders(tmp_path / "a", tmp_path / "b")
    assert not rep.ok and rep.missing == ["t1"]
    pd.DataFrame({"x": [1]}).to_csv(tmp_path / "b" / "t1.csv", index=False)
    pd.DataFrame({"x": [1]}).to_csv(tmp_path / "b" / "t2.csv", index=False)
    rep = P.compare_folders(tmp_path / "a", tmp_path / "b")
    assert not rep.ok and rep.extra == ["t2"]
    assert not P.compare_folders(tmp_path / "empty", tmp_path / "empty").ok  # nothing compared is no pass
