"""scripts/compare_tables.py: a rerun's tables against committed ones (text exact, numbers within --atol)."""

import importlib.util
from pathlib import Path

import pandas as pd

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "compare_tables.py"


def _main():
    spec = importlib.util.spec_from_file_location("compare_tables", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_reproduced_tables_pass_and_changed_ones_fail(tmp_path, capsys):
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir(), new.mkdir()
    pd.DataFrame({"model": ["a", "b"], "asr": [1.0, 2.0]}).to_csv(old / "t.csv", index=False)
    pd.DataFrame({"model": ["a", "b"], "asr": [1.0, 2.00004]}).to_csv(new / "t.csv", index=False)
    main = _main()
    assert main([str(old), str(new), "--atol", "1e-3"]) == 0
    assert "| t.csv | 2 | yes | yes | 4e-05 | asr |" in capsys.readouterr().out
    assert main([str(old), str(new), "--atol", "1e-6"]) == 1
    pd.DataFrame({"model": ["a", "c"], "asr": [1.0, 2.0]}).to_csv(new / "t.csv", index=False)
    assert main([str(old), str(new)]) == 1  # a label changed
    pd.DataFrame({"model": ["a"], "asr": [1.0]}).to_csv(new / "t.csv", index=False)
    assert main([str(old), str(new)]) == 1  # a row is missing


def test_committed_tables_from_before_the_suite_compare_under_its_names(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir(), new.mkdir()
    pd.DataFrame({"condition": ["full"], "task_accuracy": [50.0], "task_accuracy_sd": [1.0], "harmful": [3.0]}).to_csv(
        old / "table4_budget.csv", index=False)
    pd.DataFrame({"condition": ["full"], "utility": [50.0], "utility_sd": [1.0], "asr": [3.0]}).to_csv(
        new / "table4_budget.csv", index=False)
    main = _main()
    assert main([str(old), str(new)]) == 1  # the names differ
    assert main([str(old), str(new), "--suite-names"]) == 0
    assert main([str(old), str(new), "--rename", "task_accuracy=utility", "task_accuracy_sd=utility_sd",
                 "harmful=asr"]) == 0


def test_a_rerun_with_a_subset_of_the_rows_compares_on_its_keys(tmp_path, capsys):
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir(), new.mkdir()
    pd.DataFrame({"dataset": ["alpaca", "alpaca", "harmful_10"], "condition": ["before", "full", "full"],
                  "asr": [3.1, 17.2, 75.0], "extra": [1, 2, 3]}).to_csv(old / "table2_freeze.csv", index=False)
    pd.DataFrame({"dataset": ["alpaca", "alpaca"], "condition": ["before", "full"], "asr": [3.1, 17.25]}).to_csv(
        new / "table2_freeze.csv", index=False)
    main = _main()
    assert main([str(old), str(new)]) == 1  # a row and a column fewer
    assert main([str(old), str(new), "--keys", "dataset", "condition", "--atol", "0.1"]) == 0
    assert "| table2_freeze.csv | 2 | yes | yes | 0.05 | asr |" in capsys.readouterr().out
    assert main([str(old), str(new), "--keys", "dataset", "condition", "--atol", "0.01"]) == 1


def test_skipped_columns_are_left_out(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir(), new.mkdir()
    pd.DataFrame({"c": ["a"], "asr": [1.0], "asr_sd": [1.0]}).to_csv(old / "t.csv", index=False)
    pd.DataFrame({"c": ["a"], "asr": [1.0], "asr_sd": [1.41]}).to_csv(new / "t.csv", index=False)
    main = _main()
    assert main([str(old), str(new), "--atol", "1e-9"]) == 1
    assert main([str(old), str(new), "--atol", "1e-9", "--skip", "*_sd"]) == 0
