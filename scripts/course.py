"""The course kit: student copies of notebooks 01-04 and a check that every exercise can pass and fail.

    python scripts/course.py build [--out course]   # course/student/NN_name.ipynb and the table in course/GUIDE.md
    python scripts/course.py test                   # every exercise: the master's answer passes, the stub fails with its hint
    python scripts/course.py run                    # every student copy run whole (classroom preset), with the answers
                                                    # filled in (every cell succeeds) and with the stubs (every check
                                                    # fails with its hint); prints each notebook's time

A student copy is the notebook's jupytext source with each cell tagged `solution` replaced by a stub (the
answer's function signatures, each raising NotImplementedError), the parameters of the classroom preset
(`notebooks/params/classroom.yaml`: the organism with classroom-sized counts) and no outputs. The test runs the exercise
cells of each master source (from "## Exercises" to the next "##" heading) twice in a fresh namespace: as
written (every `course.check` must pass) and with the stubs (every `course.check` must raise
`ExerciseFailed` whose message carries the exercise's hint).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import re
import sys
from pathlib import Path

import jupytext
import nbformat

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ssah_utils import course, nbparams  # noqa: E402

NOTEBOOKS = ("01_probe", "02_classify", "03_freeze_finetune", "04_alignment_budget")
STUDENT_PRESET = "classroom"  # the student copies' parameters: the organism with classroom-sized counts
GUIDE_START, GUIDE_END = "<!-- exercises:start -->", "<!-- exercises:end -->"


def stub(source: str) -> str:
    """The solution cell's top-level functions, each with its signature and a body that raises."""
    tree = ast.parse(source)
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    if not funcs or len(funcs) != len(tree.body):
        raise ValueError(f"a solution cell must hold only function definitions, got:\n{source}")
    lines = source.splitlines()
    out = []
    for f in funcs:
        header = "\n".join(lines[f.lineno - 1:f.body[0].lineno - 1]).rstrip()
        ex = next((e for e in course.EXERCISES.values() if e.function == f.name), None)
        what = f"exercise {ex.id}: " if ex else ""
        out.append(f'{header}\n    raise NotImplementedError("{what}write {f.name}")')
    return "\n\n\n".join(out)


def _read(name: str):
    return jupytext.read(ROOT / "notebooks" / f"{name}.py")


def classroom_parameters(source: str, name: str) -> str:
    """The parameters cell with `preset` and every count of the classroom preset's file for notebook `name`."""
    values = {"preset": STUDENT_PRESET, **nbparams.preset_defaults(STUDENT_PRESET, name)}
    out, seen = [], set()
    for line in source.splitlines():
        m = re.match(r"^(\w+) = (.*?)(\s+#.*)?$", line)
        if m and m.group(1) in values:
            v = values[m.group(1)]
            line = f"{m.group(1)} = {json.dumps(v) if isinstance(v, str) else repr(v)}{m.group(3) or ''}"
            seen.add(m.group(1))
        out.append(line)
    if set(values) - seen:
        raise ValueError(f"{name}: the parameters cell has no {sorted(set(values) - seen)}")
    return "\n".join(out)


def student_copy(name: str, *, answers: bool = False):
    """The student's notebook (classroom parameters, stubs, no outputs); `answers=True` keeps the master's
    answers in place of the stubs (what a student who solved every exercise holds)."""
    nb = _read(name)
    for cell in nb.cells:
        if "parameters" in cell.metadata.get("tags", []):
            cell.source = classroom_parameters(cell.source, name)
        if "solution" in cell.metadata.get("tags", []) and not answers:
            cell.source = stub(cell.source)
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return nb


def exercise_cells(nb) -> list:
    """The code cells of the notebook's exercise section."""
    out, inside = [], False
    for cell in nb.cells:
        if cell.cell_type == "markdown" and cell.source.lstrip().startswith("## "):
            inside = cell.source.lstrip().startswith("## Exercises")
            continue
        if inside and cell.cell_type == "code":
            out.append(cell)
    return out


def run_cells(cells, *, stubs: bool) -> list[str]:
    """Execute the cells in one namespace; a `course.check` cell records 'ok' or the ExerciseFailed message."""
    ns: dict = {}
    results = []
    for cell in cells:
        src = stub(cell.source) if stubs and "solution" in cell.metadata.get("tags", []) else cell.source
        if "course.check(" in src:
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    exec(compile(src, "<exercise>", "exec"), ns)  # noqa: S102
                results.append("ok")
            except course.ExerciseFailed as err:
                results.append(str(err))
        else:
            exec(compile(src, "<exercise>", "exec"), ns)  # noqa: S102
    return results


def check_notebook(name: str) -> list[str]:
    """Problems with one notebook's exercises (empty when every check passes with the answers and fails
    with the stubs, each with its hint)."""
    cells = exercise_cells(_read(name))
    ids = [c.source.split('course.check("')[1].split('"')[0] for c in cells if "course.check(" in c.source]
    problems = []
    if len(ids) < 3:
        problems.append(f"{name}: {len(ids)} exercises, at least 3 expected")
    for ex_id, res in zip(ids, run_cells(cells, stubs=False)):
        if res != "ok":
            problems.append(f"{name} {ex_id}: the master's answer fails: {res}")
    for ex_id, res in zip(ids, run_cells(cells, stubs=True)):
        hint = course.EXERCISES[ex_id].hint
        if res == "ok" or hint not in res:
            problems.append(f"{name} {ex_id}: the stub does not fail with the hint (got {res!r})")
    return problems


def execute_student(name: str, *, answers: bool, timeout: int = 1800) -> tuple[float, list[str]]:
    """Run a whole student copy in a fresh kernel (cwd: the repository root), as a student runs it: with the
    answers filled in every cell must succeed; with the stubs every `course.check` cell must fail with
    `ExerciseFailed` carrying its exercise's hint, and every other cell must still succeed. Returns the
    seconds it took and the problems found."""
    import time

    from nbclient import NotebookClient

    nb = student_copy(name, answers=answers)
    client = NotebookClient(nb, kernel_name="python3", timeout=timeout, allow_errors=True,
                            resources={"metadata": {"path": str(ROOT)}})
    t0 = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - t0
    problems = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        check = re.search(r'course\.check\("(E\d+)"', cell.source)
        where = f"{name} cell {i}" + (f" ({check.group(1)})" if check else "")
        if answers or not check:
            problems += [f"{where}: {e['ename']}: {e['evalue'][:300]}" for e in errors]
        elif not errors:
            problems.append(f"{where}: the stub passed its checker")
        else:
            e = errors[0]
            hint = course.EXERCISES[check.group(1)].hint
            if e["ename"] != "ExerciseFailed" or hint not in e["evalue"]:
                problems.append(f"{where}: expected ExerciseFailed with the hint, got {e['ename']}: {e['evalue'][:300]}")
    return seconds, problems


def guide_table() -> str:
    rows = ["| id | notebook | write | goal | difficulty | minutes |", "|---|---|---|---|---|---|"]
    for e in course.EXERCISES.values():
        rows.append(f"| {e.id} | {e.notebook} | `{e.function}` | {e.goal} | {e.difficulty} | {e.minutes} |")
    total = sum(e.minutes for e in course.EXERCISES.values())
    return "\n".join(rows) + f"\n\n{len(course.EXERCISES)} exercises, about {total} minutes in all."


def build(out: Path) -> list[Path]:
    written = []
    (out / "student").mkdir(parents=True, exist_ok=True)
    for name in NOTEBOOKS:
        path = out / "student" / f"{name}.ipynb"
        tmp = path.with_suffix(".ipynb.partial")
        nbformat.write(student_copy(name), tmp)
        tmp.replace(path)
        written.append(path)
    guide = out / "GUIDE.md"
    text = guide.read_text(encoding="utf-8")
    if GUIDE_START not in text or GUIDE_END not in text:
        raise ValueError(f"{guide} lacks the markers {GUIDE_START} ... {GUIDE_END} for the exercise table")
    head, rest = text.split(GUIDE_START, 1)
    _, tail = rest.split(GUIDE_END, 1)
    guide.write_text(f"{head}{GUIDE_START}\n{guide_table()}\n{GUIDE_END}{tail}", encoding="utf-8")
    written.append(guide)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("build", "test", "run"))
    ap.add_argument("--out", default=str(ROOT / "course"))
    ap.add_argument("--notebooks", default=",".join(NOTEBOOKS), help="run: which student copies (comma-separated)")
    a = ap.parse_args(argv)
    if a.command == "run":
        names = [n.strip() for n in a.notebooks.split(",") if n.strip()]
        bad = [n for n in names if n not in NOTEBOOKS]
        if bad or not names:
            ap.error(f"--notebooks must name some of {', '.join(NOTEBOOKS)}, got {a.notebooks!r}")
        problems = []
        for answers in (True, False):
            for name in names:
                seconds, found = execute_student(name, answers=answers)
                problems += found
                print(f"[course] {name} with {'the answers' if answers else 'the stubs'}: {seconds:.0f} s, "
                      f"{'ok' if not found else f'{len(found)} problems'}", flush=True)
        for p in problems:
            print(p, file=sys.stderr)
        print(f"[course] {len(names)} student notebooks run whole, with the answers and with the stubs: "
              f"{'every answer passes and every stub fails with its hint' if not problems else f'{len(problems)} problems'}")
        return 1 if problems else 0
    if a.command == "build":
        for p in build(Path(a.out)):
            print(f"wrote {p}")
        return 0
    problems = [p for name in NOTEBOOKS for p in check_notebook(name)]
    for p in problems:
        print(p, file=sys.stderr)
    n = len(course.EXERCISES)
    print(f"{n} exercises: {'every answer passes and every stub fails with its hint' if not problems else f'{len(problems)} problems'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
