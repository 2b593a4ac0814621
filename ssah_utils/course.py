"""Exercise checkers of the course kit: a student writes the piece of the method that matters, and
`check(exercise_id, their_function)` runs it against the package's reference on small inputs.

Each exercise lives in notebooks 01-04 as three cells: a markdown cell tagged `exercise` (goal,
difficulty, minutes), a code cell tagged `solution` (the master notebook's answer; the student copy
built by `make course` replaces it with a stub that raises `NotImplementedError`) and a code cell that
calls `check`. A passing check prints one line; a failing one raises `ExerciseFailed` with what went
wrong and a hint. `EXERCISES` lists them all (the teacher's guide is built from it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import torch

from . import stage_figures, units
from .models import UnitShape


class ExerciseFailed(AssertionError):
    """A student's function gave a wrong answer (or none yet); the message says what and gives a hint."""


@dataclass(frozen=True)
class Exercise:
    id: str
    notebook: str
    function: str  # the name the student defines
    goal: str
    difficulty: str  # easy | medium | hard
    minutes: int
    hint: str
    checker: Callable[[Callable], int]  # raises AssertionError on a wrong answer, returns the number of cases


def _close(got, want, what: str, atol: float = 1e-6) -> None:
    got = torch.as_tensor(got)
    want = torch.as_tensor(want)
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    if got.dtype == torch.bool or want.dtype == torch.bool:
        if not torch.equal(got.bool(), want.bool()):
            raise AssertionError(f"{what}: {int((got.bool() != want.bool()).sum())} entries differ from the reference")
        return
    if not torch.allclose(got.double(), want.double(), atol=atol, rtol=1e-5):
        err = float((got.double() - want.double()).abs().max())
        raise AssertionError(f"{what}: differs from the reference by up to {err:.3g}")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# 01_probe
# --------------------------------------------------------------------------------------------------

def _check_cosine_distance(fn) -> int:
    g = _gen(0)
    for shape in ((8,), (5, 8), (2, 3, 16)):
        a, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        _close(fn(a, b), 1 - torch.nn.functional.cosine_similarity(a, b, dim=-1), f"inputs of shape {shape}")
    a = torch.randn(4, 8, generator=g)
    _close(fn(a, 3.0 * a), torch.zeros(4), "a vector against a scaled copy of itself (distance 0)", atol=1e-5)
    _close(fn(a, -a), torch.full((4,), 2.0), "a vector against its negative (distance 2)", atol=1e-5)
    return 5


def _check_refusal_direction(fn) -> int:
    g = _gen(1)
    for n_h, n_b, d in ((6, 9, 8), (20, 20, 32)):
        harm, harmless = torch.randn(n_h, d, generator=g) + 1.0, torch.randn(n_b, d, generator=g)
        want = harm.mean(0) - harmless.mean(0)
        got = torch.as_tensor(fn(harm, harmless))
        _close(got.norm(), torch.tensor(1.0), "the direction's length (it should be a unit vector)", atol=1e-5)
        _close(got, want / want.norm(), f"{n_h} harmful and {n_b} harmless states of dim {d}")
    return 2


def _check_project_out(fn) -> int:
    g = _gen(2)
    h, d = torch.randn(7, 16, generator=g), torch.randn(16, generator=g)
    got = torch.as_tensor(fn(h, d))
    u = d / d.norm()
    _close(got @ u, torch.zeros(7), "the component along the direction after projecting it out", atol=1e-5)
    _close(got, h - (h @ u)[:, None] * u, "7 states of dim 16, a direction that is not of unit length")
    _close(fn(u[None], u), torch.zeros(1, 16), "the direction itself (nothing should be left)", atol=1e-5)
    return 3


# --------------------------------------------------------------------------------------------------
# 02_classify
# --------------------------------------------------------------------------------------------------

def _check_wifv(fn) -> int:
    g = _gen(3)
    for tokens, d_in, d_out in ((50, 12, 6), (7, 4, 9)):
        x, w = torch.randn(tokens, d_in, generator=g) * torch.arange(1, d_in + 1), torch.randn(d_out, d_in, generator=g)
        want = x.double().var(0, unbiased=False) * w.double().pow(2).sum(0)
        _close(fn(x, w), want, f"{tokens} tokens, an output projection of shape ({d_out}, {d_in})", atol=1e-4)
    return 2


def _check_take_by_params(fn) -> int:
    g = _gen(4)
    cases = 0
    for n, frac in ((30, 0.1), (30, 0.5), (12, 0.01), (40, 0.3)):
        params = torch.randint(1, 50, (n,), generator=g).double()
        params[0] = 400.0  # one unit larger than most targets
        order = torch.randperm(n, generator=g)
        _close(fn(order, params, frac), units.take_by_params(order, params, frac),
               f"{n} units, fraction {frac} of their parameters")
        cases += 1
    return cases


def _check_compensation(fn) -> int:
    g = _gen(5)
    w = torch.randn(6, 10, generator=g)
    mean = torch.randn(10, generator=g)
    removed = torch.zeros(10, dtype=torch.bool)
    removed[[1, 4, 7]] = True
    got = torch.as_tensor(fn(w, removed, mean))
    _close(got, w[:, removed] @ mean[removed], "a (6, 10) projection, inputs 1, 4 and 7 removed")
    x = mean.clone()
    x[~removed] = torch.randn(int((~removed).sum()), generator=g)
    kept_only = w @ torch.where(removed, torch.zeros_like(x), x) + got
    _close(kept_only, w @ x, "an input whose removed channels sit at their mean (the output must not change)", atol=1e-5)
    return 2


# --------------------------------------------------------------------------------------------------
# 03_freeze_finetune
# --------------------------------------------------------------------------------------------------

def _check_frozen_step(fn) -> int:
    torch.manual_seed(6)
    layer = torch.nn.Linear(4, 8)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.1)
    frozen = torch.tensor([0, 3, 5])
    before = layer.weight.detach().clone()
    for step in range(5):
        opt.zero_grad()
        (layer(torch.randn(16, 4)) ** 2).sum().backward()
        fn(layer.weight, opt, frozen)
        if not torch.equal(layer.weight.detach()[frozen], before[frozen]):
            moved = int((layer.weight.detach()[frozen] != before[frozen]).sum())
            raise AssertionError(f"after step {step + 1}, {moved} entries of the frozen rows changed")
    others = torch.ones(8, dtype=torch.bool)
    others[frozen] = False
    if torch.equal(layer.weight.detach()[others], before[others]):
        raise AssertionError("the rows that are not frozen never changed: the optimizer step did not run")
    return 5


def _check_random_like(fn) -> int:
    g = _gen(7)
    mask = torch.rand(200, generator=g) < 0.15
    a, b, c = (torch.as_tensor(fn(mask, s)).bool() for s in (0, 0, 1))
    if a.shape != mask.shape:
        raise AssertionError(f"shape {tuple(a.shape)}, expected {tuple(mask.shape)}")
    if int(a.sum()) != int(mask.sum()):
        raise AssertionError(f"{int(a.sum())} units chosen, the mask has {int(mask.sum())}: a control must be of equal size")
    if not torch.equal(a, b):
        raise AssertionError("two calls with the same seed gave different masks: seed the draw")
    if torch.equal(a, c) or torch.equal(a, mask):
        raise AssertionError("the draw does not change with the seed (or returns the mask itself)")
    return 3


def _check_verdict(fn) -> int:
    cases = [(10.0, 2.0, 1.0, "higher"), (3.0, 2.0, 0.5, "higher"), (-5.0, 1.0, 1.0, "lower"), (0.5, 0.2, 0.3, "same"),
             (1.5, 0.1, 0.2, "same"), (4.0, 0.1, 0.2, "higher"), (1.9, 0.0, 0.0, "higher")]
    for effect, sd_a, sd_b, expect in cases:
        want = stage_figures.judge(effect, stage_figures.K_SD * max(sd_a, sd_b, stage_figures.SD_FLOOR), expect)
        got = fn(effect, sd_a, sd_b, expect)
        if got != want:
            raise AssertionError(f"effect {effect}, sds {sd_a} and {sd_b}, expected {expect!r}: got {got!r}, the rule says {want!r}")
    return len(cases)


# --------------------------------------------------------------------------------------------------
# 04_alignment_budget
# --------------------------------------------------------------------------------------------------

def _check_ru_budget(fn) -> int:
    g = _gen(8)
    for n, frac in ((50, 0.2), (80, 0.1)):
        zs, zu = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
        params = torch.randint(10, 100, (n,), generator=g).double()
        want = units.take_by_params(torch.argsort(zs + zu, stable=True), params, frac)
        _close(fn(zs, zu, params, frac), want, f"{n} units, budget {frac} of the parameters")
    return 2


def _check_transfer(fn) -> int:
    shape = UnitShape(n_layers=1, d_model=4, d_mlp=10, n_heads=2, n_kv_heads=1, head_dim=2)
    g = _gen(9)
    names = list(units.LABELS)
    before = [names[int(i)] for i in torch.randint(0, 4, (12,), generator=g)]
    after = [names[int(i)] for i in torch.randint(0, 4, (12,), generator=g)]
    z = torch.zeros(12, dtype=torch.float64)
    want = units.transfer_matrix(units.Labels(shape, before, z, z, (0.1, 0.01, 0.1)),
                                 units.Labels(shape, after, z, z, (0.1, 0.01, 0.1)))
    got = fn(before, after)
    if not isinstance(got, pd.DataFrame):
        raise AssertionError(f"expected a DataFrame (rows: labels before, columns: labels after), got {type(got).__name__}")
    try:
        got = got.reindex(index=names, columns=names).astype(float)
    except (TypeError, ValueError) as err:
        raise AssertionError(f"rows and columns must be the labels {names}: {err}") from err
    if got.isna().any().any():
        raise AssertionError(f"rows and columns must be the four labels {names}, each present (0 where empty)")
    _close(torch.tensor(got.to_numpy()), torch.tensor(want.to_numpy()), "12 units' labels before and after", atol=1e-6)
    return 1


def _check_train_only_grad(fn) -> int:
    g = _gen(10)
    grad = torch.randn(6, 3, generator=g)
    rows = torch.tensor([1, 4])
    got = torch.as_tensor(fn(grad.clone(), rows))
    want = torch.zeros_like(grad)
    want[rows] = grad[rows]
    _close(got, want, "a (6, 3) gradient, rows 1 and 4 trained")
    return 1


EXERCISES: dict[str, Exercise] = {e.id: e for e in (
    Exercise("E1", "01_probe", "cosine_distance", "the cosine distance that compares a hidden state with the "
             "refusal and the compliance continuation", "easy", 5,
             "1 - cos(a, b) along the last dimension; torch.nn.functional.cosine_similarity does the cosine.",
             _check_cosine_distance),
    Exercise("E2", "01_probe", "refusal_direction", "the difference-in-means refusal direction", "easy", 10,
             "mean of the harmful states minus mean of the harmless ones, divided by its norm.", _check_refusal_direction),
    Exercise("E3", "01_probe", "project_out", "removing the refusal direction from hidden states", "medium", 10,
             "normalise the direction first; subtract (h . u) u from every row.", _check_project_out),
    Exercise("E4", "02_classify", "wifv_channel_scores", "WIFV of one output projection from its captured inputs",
             "medium", 10, "the variance of each input channel over tokens (population, not sample) times the "
             "squared norm of the weight column that reads it: x.var(0, unbiased=False) * (W ** 2).sum(0).",
             _check_wifv),
    Exercise("E5", "02_classify", "take_by_params", "a parameter-weighted threshold (the paper's h shares)", "medium", 15,
             "walk the ranking, accumulate parameters, keep the prefix whose total is closest to fraction x total "
             "(the shorter prefix on a tie); the empty prefix counts too.", _check_take_by_params),
    Exercise("E6", "02_classify", "compensation_bias", "FLAP's bias compensation for removed input channels", "medium",
             10, "the removed channels' columns of W times their mean activation: W[:, removed] @ mean[removed].",
             _check_compensation),
    Exercise("E7", "03_freeze_finetune", "frozen_step", "an optimizer step that keeps chosen rows bit for bit", "hard", 15,
             "zeroing the gradient is not enough: AdamW's weight decay and its moments still move the rows. Save "
             "the frozen rows before optimizer.step() and write them back after it (under torch.no_grad()).",
             _check_frozen_step),
    Exercise("E8", "03_freeze_finetune", "random_like", "the random control of equal size", "easy", 5,
             "draw mask.sum() distinct positions with torch.randperm and a torch.Generator seeded with `seed`.",
             _check_random_like),
    Exercise("E9", "03_freeze_finetune", "verdict", "reading a claim's verdict by the scorecard's rule", "easy", 10,
             "margin = 2 x max(sd_run, sd_control, 1); 'higher' holds when effect > margin, 'lower' when effect < "
             "-margin, 'same' when |effect| <= margin; return 'holds' or 'does not hold on this model'.", _check_verdict),
    Exercise("E10", "04_alignment_budget", "ru_budget", "the redundant-unit budget of a base model", "medium", 10,
             "rank units by z_safety + z_utility, lowest first, and take the prefix closest to the fraction of "
             "parameters (units.take_by_params does the threshold).", _check_ru_budget),
    Exercise("E11", "04_alignment_budget", "transfer_matrix", "where the units of each label go (Fig 6)", "medium", 10,
             "pd.crosstab of the labels before (rows) and after (columns), every label present, as percent of each row.",
             _check_transfer),
    Exercise("E12", "04_alignment_budget", "train_only_grad", "a gradient mask that trains only chosen rows", "easy", 5,
             "keep the gradient of the trained rows and set every other row to 0.", _check_train_only_grad),
)}


def check(exercise_id: str, fn: Callable) -> None:
    """Run exercise `exercise_id`'s checker on the student's `fn`; print one line when it passes, raise
    `ExerciseFailed` (what went wrong and a hint) when it does not."""
    if exercise_id not in EXERCISES:
        raise ValueError(f"unknown exercise {exercise_id!r}; known: {', '.join(EXERCISES)}")
    ex = EXERCISES[exercise_id]
    try:
        n = ex.checker(fn)
    except NotImplementedError:
        raise ExerciseFailed(f"{ex.id} ({ex.function}): not written yet. Hint: {ex.hint}") from None
    except AssertionError as err:
        raise ExerciseFailed(f"{ex.id} ({ex.function}): {err}. Hint: {ex.hint}") from None
    except Exception as err:  # a crash in the student's code is a failed exercise, with its cause
        raise ExerciseFailed(f"{ex.id} ({ex.function}) raised {type(err).__name__}: {err}. Hint: {ex.hint}") from err
    print(f"{ex.id} {ex.function}: correct on {n} case{'s' if n != 1 else ''}.")


def exercises_table() -> pd.DataFrame:
    """One row per exercise: notebook, function, goal, difficulty, minutes (the teacher's guide)."""
    return pd.DataFrame([{"id": e.id, "notebook": e.notebook, "function": e.function, "goal": e.goal,
                          "difficulty": e.difficulty, "minutes": e.minutes} for e in EXERCISES.values()])

