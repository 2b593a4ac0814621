"""Compare the tables of a rerun with committed ones: did the rerun reproduce them, and how closely?

    python scripts/compare_tables.py results/smollm2-135m/tables runs/smollm2-135m/tables --prefix probe_ table1
    python scripts/compare_tables.py OLD NEW --atol 1e-3        # exit status 1 if a table differs beyond atol

For every CSV present in both folders (optionally only names starting with one of `--prefix`): the same
columns and rows, the text columns equal (labels, verdicts), and the largest absolute difference of the
numeric columns. Prints a Markdown table (`--out` writes it to a file too). Tables in only one folder are
listed. Exit status 1 when shapes, columns or text differ, or a numeric difference exceeds `--atol` (when given).

`--rename OLD=NEW ...` renames columns of the committed tables first; `--suite-names` renames those of tables
executed before the one evaluation suite (`ssah_utils.evaluation.LEGACY_NAMES`: 04's task_accuracy -> utility,
howto_accuracy -> howto_utility, harmful -> asr, jailbreak -> jailbreak_asr, and the organism cards' names). Their sd columns then still differ where the old stage printed the population
sd (02 and 03 before the suite: ddof 0; now ddof 1 everywhere).

`--keys COL ...` compares a rerun that holds a subset of the committed rows or columns (e.g. 03 with one attack
set of the two committed): rows are matched on the key columns, only rows and columns present in both are
compared, and the report says how many rows were matched.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
from pathlib import Path

import numpy as np
import pandas as pd


def _suite_renames() -> dict[str, str]:
    """`ssah_utils.evaluation.LEGACY_NAMES` and their sd columns (imported only when asked: the package loads torch)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from ssah_utils.evaluation import LEGACY_NAMES

    return {old: new for o, n in LEGACY_NAMES.items() for old, new in ((o, n), (f"{o}_sd", f"{n}_sd"))}


def _common(a: pd.DataFrame, b: pd.DataFrame, keys: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The rows of `a` and `b` whose key columns agree (in `b`'s order) and the columns both have."""
    missing = [k for k in keys if k not in a.columns or k not in b.columns]
    if missing:
        raise ValueError(f"key columns {missing} are not in both tables")
    cols = [c for c in b.columns if c in a.columns]
    ia, ib = a.set_index(keys), b.set_index(keys)
    if ia.index.has_duplicates or ib.index.has_duplicates:
        raise ValueError(f"the key columns {keys} do not identify one row each; add the columns that tell rows apart")
    common = [k for k in ib.index if k in ia.index]
    return (ia.loc[common].reset_index()[cols], ib.loc[common].reset_index()[cols])


def compare(old: Path, new: Path, renames: dict[str, str] | None = None, keys: list[str] | None = None,
            skip: list[str] | None = None) -> dict:
    a, b = pd.read_csv(old).rename(columns=renames or {}), pd.read_csv(new)
    if skip:  # columns left out of the comparison (fnmatch patterns, e.g. '*_sd')
        a = a[[c for c in a.columns if not any(fnmatch.fnmatch(c, p) for p in skip)]]
        b = b[[c for c in b.columns if not any(fnmatch.fnmatch(c, p) for p in skip)]]
    if keys:
        a, b = _common(a, b, keys)
    row = {"table": old.name, "rows": len(a), "same_shape": a.shape == b.shape and list(a.columns) == list(b.columns)}
    if not row["same_shape"]:
        return {**row, "text_equal": False, "max_abs_diff": float("nan"), "worst_column": ""}
    num = [c for c in a.columns if pd.api.types.is_numeric_dtype(a[c]) and pd.api.types.is_numeric_dtype(b[c])]
    text = [c for c in a.columns if c not in num]
    row["text_equal"] = bool((a[text].astype(str).values == b[text].astype(str).values).all()) if text else True
    worst, col = 0.0, ""
    for c in num:
        x, y = a[c].to_numpy(float), b[c].to_numpy(float)
        both_nan = np.isnan(x) & np.isnan(y)
        if (np.isnan(x) != np.isnan(y)).any():
            return {**row, "text_equal": row["text_equal"], "max_abs_diff": float("inf"), "worst_column": c}
        d = float(np.max(np.abs(x - y)[~both_nan], initial=0.0))
        if d > worst:
            worst, col = d, c
    return {**row, "max_abs_diff": worst, "worst_column": col}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", type=Path, help="the committed tables folder")
    ap.add_argument("new", type=Path, help="the rerun's tables folder")
    ap.add_argument("--prefix", nargs="*", default=[], help="compare only tables whose names start with these")
    ap.add_argument("--atol", type=float, default=None, help="largest numeric difference that passes")
    ap.add_argument("--out", type=Path, default=None, help="also write the Markdown report here")
    ap.add_argument("--rename", nargs="*", default=[], metavar="OLD=NEW", help="rename columns of the committed tables")
    ap.add_argument("--keys", nargs="*", default=[], help="match rows on these columns; compare common rows and columns")
    ap.add_argument("--skip", nargs="*", default=[], metavar="PATTERN",
                    help="leave out columns matching these fnmatch patterns (e.g. '*_sd' across the sd convention change)")
    ap.add_argument("--suite-names", action="store_true",
                    help="rename pre-suite columns of the committed tables to the suite's (evaluation.LEGACY_NAMES)")
    a = ap.parse_args(argv)
    bad = [r for r in a.rename if r.count("=") != 1 or not all(r.split("="))]
    if bad:
        raise SystemExit(f"--rename takes OLD=NEW pairs, got {bad}")
    renames = {**(_suite_renames() if a.suite_names else {}), **dict(r.split("=") for r in a.rename)}
    for d in (a.old, a.new):
        if not d.is_dir():
            raise SystemExit(f"{d} is not a folder of tables")

    def pick(folder: Path) -> dict[str, Path]:
        return {p.name: p for p in sorted(folder.glob("*.csv")) if not a.prefix or p.name.startswith(tuple(a.prefix))}

    old, new = pick(a.old), pick(a.new)
    if not old.keys() & new.keys():
        raise SystemExit(f"no table is in both {a.old} and {a.new}" + (f" with prefix {a.prefix}" if a.prefix else ""))
    rows = []
    for n in sorted(old.keys() & new.keys()):
        try:
            rows.append(compare(old[n], new[n], renames, a.keys, a.skip))
        except ValueError as err:  # a table without the key columns: say which, before printing anything
            raise SystemExit(f"{n}: {err} (compare it alone with --prefix, or without --keys)") from None
    lines = [f"Tables of `{a.new}` against `{a.old}` (`scripts/compare_tables.py`)", "",
             "| table | rows | same columns and rows | text columns equal | max abs diff (numeric) | in column |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['table']} | {r['rows']} | {'yes' if r['same_shape'] else 'NO'} | {'yes' if r['text_equal'] else 'NO'} "
              f"| {r['max_abs_diff']:.3g} | {r['worst_column']} |" for r in rows]
    only_old, only_new = sorted(old.keys() - new.keys()), sorted(new.keys() - old.keys())
    if only_old:
        lines += ["", f"Only in {a.old}: {', '.join(only_old)}"]
    if only_new:
        lines += ["", f"Only in {a.new}: {', '.join(only_new)}"]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if a.out:
        a.out.write_text(text, encoding="utf-8")
    bad = [r for r in rows if not (r["same_shape"] and r["text_equal"])
           or (a.atol is not None and not r["max_abs_diff"] <= a.atol)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
