"""The notebooks' two files: `notebooks/NN_name.py` (jupytext percent format, the source a contributor
edits) and `notebooks/NN_name.ipynb` (the same cells, executed, with outputs; what a reader opens).

    python scripts/notebooks.py check                   # every pair agrees (cells, types, tags)? exit 1 if not
    python scripts/notebooks.py to-ipynb SRC.py OUT.ipynb   # an unexecuted notebook from a source (papermill's input)
    python scripts/notebooks.py finalize RUN.ipynb DST.ipynb  # strip volatile metadata, then replace DST atomically
    python scripts/notebooks.py to-py NB.ipynb          # rewrite the .py source from a notebook (after editing in Lab
                                                        # without the jupytext extension)

A pair agrees when the .py's cells equal the .ipynb's cells in order, type, source and tags, leaving out
the cell papermill injects when it is run with parameters (tag `injected-parameters`): that cell records
how the committed copy was run and is not part of the source. Outputs and metadata are not compared.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import jupytext
import nbformat

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
INJECTED = "injected-parameters"
# What is kept of a cell's metadata in a committed notebook (papermill's timings and execution
# timestamps change on every run and would make every rerun a diff).
KEEP_CELL_METADATA = ("tags",)
KEEP_NB_METADATA = ("kernelspec", "language_info")


def pairs() -> list[tuple[Path, Path]]:
    """Every notebooks/NN_*.py with its .ipynb; a source or notebook without its partner is an error."""
    pys = {p.stem: p for p in NOTEBOOKS.glob("[0-9][0-9]_*.py")}
    nbs = {p.stem: p for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")}
    lonely = sorted(set(pys) ^ set(nbs))
    if lonely:
        raise SystemExit(
            "notebooks without their partner (each NN_name.py needs NN_name.ipynb and back): "
            + ", ".join(lonely)
            + ". Create the .ipynb with `make nb-NN`, or the .py with `python scripts/notebooks.py to-py NB.ipynb`."
        )
    return [(pys[k], nbs[k]) for k in sorted(pys)]


def source_cells(nb: nbformat.NotebookNode) -> list[tuple[str, str, tuple[str, ...]]]:
    """(type, source, tags) of each cell but papermill's injected-parameters cell."""
    out = []
    for cell in nb.cells:
        tags = tuple(cell.get("metadata", {}).get("tags", []))
        if INJECTED in tags:
            continue
        out.append((cell.cell_type, cell.source.strip("\n"), tags))
    return out


def read_py(path: Path) -> nbformat.NotebookNode:
    return jupytext.read(path, fmt="py:percent")


def diff(py: Path, ipynb: Path) -> str | None:
    """None when the pair agrees, else a message naming the first cell that differs."""
    a = source_cells(read_py(py))
    b = source_cells(nbformat.read(ipynb, as_version=4))
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            what = "type" if x[0] != y[0] else "tags" if x[2] != y[2] else "source"
            first = x[1].splitlines()[0] if x[1] else ""
            return f"cell {i} differs in {what} ({py.name}: {first[:70]!r})"
    if len(a) != len(b):
        return f"{py.name} has {len(a)} cells, {ipynb.name} has {len(b)} (not counting {INJECTED})"
    return None


def check() -> int:
    bad = []
    for py, nb in pairs():
        d = diff(py, nb)
        print(f"{'ok ' if d is None else 'BAD'} {py.name} <-> {nb.name}" + ("" if d is None else f": {d}"))
        if d is not None:
            bad.append(py.stem)
    if bad:
        print(
            "\nA source and its executed notebook disagree. Edit the .py, then run it: "
            + " ".join(f"`make nb-{s[:2]}`" for s in bad)
            + " (or, if you edited the .ipynb in Lab, `python scripts/notebooks.py to-py notebooks/NN_name.ipynb`).",
            file=sys.stderr,
        )
        return 1
    return 0


def strip(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drop volatile metadata; keep outputs, execution counts, tags and the kernel."""
    nb.metadata = {k: v for k, v in nb.metadata.items() if k in KEEP_NB_METADATA}
    for cell in nb.cells:
        meta = {k: v for k, v in cell.get("metadata", {}).items() if k in KEEP_CELL_METADATA and v}
        cell.metadata = meta
        cell.pop("id", None)
    nb.nbformat_minor = 4  # no cell ids: they would change with every conversion
    return nb


def write_atomic(nb: nbformat.NotebookNode, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            nbformat.write(nb, fh)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_ipynb(src: Path, out: Path) -> None:
    nb = read_py(src)
    nb.metadata.setdefault("language_info", {"name": "python"})
    write_atomic(strip(nb), out)


def finalize(run: Path, dst: Path) -> None:
    nb = nbformat.read(run, as_version=4)
    failed = [
        i for i, c in enumerate(nb.cells) if c.cell_type == "code" and any(o.get("output_type") == "error" for o in c.get("outputs", []))
    ]
    if failed:
        raise SystemExit(f"{run} has error outputs in cells {failed}: not copied over {dst}")
    write_atomic(strip(nb), dst)


def to_py(ipynb: Path) -> None:
    nb = nbformat.read(ipynb, as_version=4)
    nb.cells = [c for c in nb.cells if INJECTED not in c.get("metadata", {}).get("tags", [])]
    nb = strip(nb)
    nb.metadata = {"kernelspec": nb.metadata.get("kernelspec", {})}
    jupytext.write(nb, ipynb.with_suffix(".py"), fmt="py:percent")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check")
    p = sub.add_parser("to-ipynb")
    p.add_argument("src", type=Path)
    p.add_argument("out", type=Path)
    p = sub.add_parser("finalize")
    p.add_argument("run", type=Path)
    p.add_argument("dst", type=Path)
    p = sub.add_parser("to-py")
    p.add_argument("ipynb", type=Path, nargs="+")
    a = ap.parse_args(argv)
    if a.cmd == "check":
        return check()
    if a.cmd == "to-ipynb":
        to_ipynb(a.src, a.out)
    elif a.cmd == "finalize":
        finalize(a.run, a.dst)
    elif a.cmd == "to-py":
        for nb in a.ipynb:
            to_py(nb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
