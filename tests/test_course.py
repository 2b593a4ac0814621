"""The course kit (issue 19): every checker passes the master notebook's answer, fails its stub with the
hint, and fails a typical wrong answer; student copies hold no answer."""

import importlib.util
from pathlib import Path

import pandas as pd
import pytest
import torch

from ssah_utils import course, units

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("course_script", ROOT / "scripts" / "course.py")
kit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kit)


@pytest.mark.parametrize("name", kit.NOTEBOOKS)
def test_answers_pass_and_stubs_fail_with_the_hint(name):
    assert kit.check_notebook(name) == []


def _unseeded(mask, seed):
    return mask.clone()


def _grad_mask_only(weight, optimizer, rows):
    weight.grad[rows] = 0
    optimizer.step()


WRONG = {
    "E1": lambda a, b: torch.nn.functional.cosine_similarity(a, b, dim=-1),
    "E2": lambda h, b: h.mean(0) - b.mean(0),
    "E3": lambda h, d: h - (h @ d)[:, None] * d,
    "E4": lambda x, w: x.double().var(0) * w.double().pow(2).sum(0),
    "E5": lambda order, params, f: units.take_by_params(order, params, f, rule="floor"),
    "E6": lambda w, removed, mean: w[:, ~removed] @ mean[~removed],
    "E7": _grad_mask_only,
    "E8": _unseeded,
    "E9": lambda e, a, b, x: "holds" if {"higher": e > 2 * max(a, b), "lower": e < -2 * max(a, b),
                                          "same": abs(e) <= 2 * max(a, b)}[x] else "does not hold on this model",
    "E10": lambda zs, zu, p, f: units.take_by_params(torch.argsort(zs + zu, descending=True), p, f),
    "E11": lambda before, after: pd.crosstab(pd.Categorical(before, list(units.LABELS)),
                                             pd.Categorical(after, list(units.LABELS)), dropna=False),
    "E12": lambda g, rows: g,
}


@pytest.mark.parametrize("ex_id", sorted(course.EXERCISES))
def test_a_typical_wrong_answer_fails(ex_id):
    assert set(WRONG) == set(course.EXERCISES)
    with pytest.raises(course.ExerciseFailed, match=ex_id) as err:
        course.check(ex_id, WRONG[ex_id])
    assert course.EXERCISES[ex_id].hint in str(err.value)


def test_student_copies_hold_no_answer(tmp_path):
    (tmp_path / "GUIDE.md").write_text(f"# guide\n{kit.GUIDE_START}\nstale table\n{kit.GUIDE_END}\nend\n")
    kit.build(tmp_path)
    guide = (tmp_path / "GUIDE.md").read_text()
    assert "| E12 | 04_alignment_budget |" in guide and "stale table" not in guide and guide.endswith("end\n")
    for name in kit.NOTEBOOKS:
        master = kit._read(name)
        answers = [c.source for c in master.cells if "solution" in c.metadata.get("tags", [])]
        student = (tmp_path / "student" / f"{name}.ipynb").read_text()
        assert len(answers) >= 3
        for src in answers:
            body = src.splitlines()[1].strip()  # the first line of each answer's body
            assert body not in student, f"{name}: the answer line {body!r} is in the student copy"
        assert student.count("NotImplementedError") >= len(answers)
        params = next(c.source for c in kit.student_copy(name).cells if "parameters" in c.metadata.get("tags", []))
        assert 'preset = "classroom"' in params
        for key, value in kit.nbparams.preset_defaults("classroom", name).items():
            assert f"{key} = " in params and (repr(value) in params or f'"{value}"' in params), (name, key)
    with pytest.raises(ValueError, match="only function definitions"):
        kit.stub("x = 1")
    with pytest.raises(ValueError, match="unknown exercise"):
        course.check("E99", print)
