"""Put the nbval tag `nbval-ignore-output` on exactly the machine-dependent cells that
tests/nbval_policy.py lists (and on no other cell), in the committed notebooks' cell metadata.

Only metadata changes: sources and outputs are kept as they are (nothing is executed); the notebook's
jupytext source (notebooks/NN_name.py) is rewritten from it so the pair keeps agreeing. Run it after
adding a cell to the policy; tests/test_nbval_policy.py checks that notebooks, sources and policy agree.
    .venv/bin/python scripts/tag_notebooks.py [--check]
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from nbval_policy import IGNORE_TAG, MACHINE_DEPENDENT_CELLS  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
import notebooks as nbtool  # noqa: E402


def first_line(cell) -> str:
    lines = cell.source.splitlines()
    return lines[0] if lines else ""


def retag(path: Path, wanted: dict[str, str], write: bool) -> list[str]:
    nb = nbformat.read(path, as_version=4)
    changes, found = [], set()
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        tags = list(cell.metadata.get("tags", []))
        want = first_line(cell) in wanted
        found |= {first_line(cell)} if want else set()
        if want and IGNORE_TAG not in tags:
            tags.append(IGNORE_TAG)
        elif not want and IGNORE_TAG in tags:
            tags.remove(IGNORE_TAG)
        else:
            continue
        changes.append(f"{path.name} cell {i}: {'+' if want else '-'}{IGNORE_TAG}")
        if tags:
            cell.metadata["tags"] = tags
        else:
            cell.metadata.pop("tags", None)
    missing = set(wanted) - found
    if missing:
        raise SystemExit(f"{path.name}: no code cell starts with {sorted(missing)}; update tests/nbval_policy.py")
    if changes and write:
        nbtool.write_atomic(nbtool.strip(nb), path)
        nbtool.to_py(path)
    return changes


def main(argv: list[str]) -> int:
    check = "--check" in argv
    changes = []
    for name, wanted in MACHINE_DEPENDENT_CELLS.items():
        changes += retag(ROOT / "notebooks" / f"{name}.ipynb", wanted, write=not check)
    print("\n".join(changes) or "notebook tags agree with tests/nbval_policy.py")
    return 1 if (check and changes) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
