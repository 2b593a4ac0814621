"""`make test` step 3: the tables that nbval's run of the notebooks wrote (under $SSAH_RUN_OUTPUTS/tables,
runs/test-outputs/ in `make test-notebooks`) agree with the committed tables/*.csv: machine-dependent
tables within their stated tolerance, the others to their written precision (tests/nbval_policy.py).

Not collected by `pytest tests` (the name does not start with test_): it checks a run, so it needs one.
"""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nbval_policy as P  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def test_run_tables_match_the_committed_tables():
    out = os.environ.get("SSAH_RUN_OUTPUTS", "")
    if not out:
        pytest.fail("SSAH_RUN_OUTPUTS is not set: run `make test-notebooks`, which executes the notebooks with "
                    "SSAH_OUTPUT_DIR=runs/test-outputs and then this check on runs/test-outputs")
    run_tables = Path(out) / "tables"
    assert run_tables.is_dir(), f"{run_tables} does not exist: the notebook run wrote no tables"
    rep = P.compare_folders(ROOT / "tables", run_tables)
    msg = []
    if rep.missing:
        msg.append(f"tables not written by the run: {rep.missing}")
    if rep.extra:
        msg.append(f"tables the run wrote that are not committed: {rep.extra}")
    msg += rep.differences[:60]
    assert rep.ok, f"{len(rep.differences)} differences beyond tolerance ({rep.compared} tables compared):\n" + "\n".join(msg)
