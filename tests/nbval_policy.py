"""What `make test` checks exactly and what within a tolerance: the one reviewable rule.

nbval re-executes every notebook and compares each cell's text output with the committed one (after
`nbval_sanitize.cfg` masks cache keys, timings, long floats, commit ids and paths). That is right for
everything that is the same on every machine: structure, text, counts, numbers derived from the data
and the shipped models' masks, scores and forward passes. It is wrong for numbers that come from
**training** (03, 04 and 05's cells that report them) or from the **greedy generations of ablated or
trained models**: a different CPU, instruction set or thread count rounds float sums differently,
training then flips greedy tokens of the tiny organism, and a rate moves by whole prompts (issue 14:
04's full SFT seed 0 gave task 97.9% on one machine, 99.0% on another).

So:
- `MACHINE_DEPENDENT_CELLS` lists those cells, by notebook and the first line of their source, with
  the reason. Exactly these cells carry the nbval tag `nbval-ignore-output` in the notebooks and in
  their jupytext sources (`notebooks/NN_name.py`); `tests/test_nbval_policy.py` checks both.
- Their numbers are not left unchecked: the notebooks save them as tables, and
  `tests/check_run_outputs.py` (run by `make test` after nbval, on the tables that nbval's own run
  wrote under runs/test-outputs/) compares every table with the committed `tables/*.csv`:
  the tables of `MACHINE_DEPENDENT_TABLES` within their stated `Tolerance`, every other table to
  0.15% relative (`EXACT`: the precision of the 4 significant digits tables are written with).
- Same-machine determinism is checked exactly elsewhere (tests/test_reliability.py: two runs of the
  same training and caching give identical bytes).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import pandas as pd

IGNORE_TAG = "nbval-ignore-output"

_TRAINED = "numbers of models fine-tuned or aligned in this run (training flips greedy tokens across machines)"
_GENERATED = "rates of greedy generations (a float difference flips whole prompts)"

# notebook -> {first line of the cell's source: why its output is machine-dependent}
MACHINE_DEPENDENT_CELLS: dict[str, dict[str, str]] = {
    "01_probe": {
        'dvb = sp.direction_vs_behaviour(dr["requests"])': "refusal/harmful rates of generations vs the direction",
        'ts = sp.token_summary(dr["tokens"], max_step=10)': "the direction re-read at each generated token",
        'sep = sp.token_separation(dr["tokens"])': "AUC per generated token",
        "se = sp.seed_example(cfg)": "counts of generated refusals/compliances",
        'with pd.option_context("display.max_colwidth", 200):': "generated responses and their scores",
        'se["tokens"].pivot(index="step", columns="request", values="score").head(12).round(3)':
            "the direction at each generated token",
        "print(sp.summary_text(cfg, dist, dist7, acc, dr, se, point))": "quotes the generation rates above",
    },
    "02_classify": {
        "t1 = sc.table1(cfg)": _GENERATED + " of ablated models",
        'bias_runs = sc.bias_sensitivity(cfg)["runs"]': _GENERATED + " of ablated models",
        'scorer_runs = sc.scorer_ablation(cfg)["runs"]': _GENERATED + " of ablated models",
        "print(sc.summary_text(cfg))": "quotes Table 1's rates",
    },
    "03_freeze_finetune": {
        "lrs = sf.parse_lr_grid(lr_grid)": "the learning-rate sweep: " + _TRAINED,
        "summary = sf.summarize(df)": "Table 2: " + _TRAINED,
        "vs = sf.vs_paper(summary)": "Table 2 vs the paper: " + _TRAINED,
        "fig = rf.plot_transfer(cfg) if cfg.relabel else None": "Fig 5 label transfer of fine-tuned models",
        "print(sf.summary_text(cfg, sweep))": "quotes Table 2",
    },
    "04_alignment_budget": {
        "t4 = sb.table4(cfg)  # trains and evaluates every condition and seed (each run cached)":
            "Table 4 and the per-run log lines: " + _TRAINED,
        'sb.response_examples(cfg, "harmful", n=2)': "responses of the aligned runs",
        'sb.response_examples(cfg, "utility", n=2)': "responses of the aligned runs",
        'vs = sb.table4_vs_paper(t4["summary"])': "Table 4 vs the paper: " + _TRAINED,
        'pd.DataFrame({"safety_calibration": tr["safety_calibration"]}).join(tr["shares"].T.round(1))':
            "label shares of the aligned runs (Fig 6)",
        "print(sb.summary_text(cfg, tr))": "quotes Table 4",
    },
    "05_figures": {
        "card, pvr = sfig.write_paper_tables(sections)": "02's Table 1 rates next to the paper's",
        'pvr["paper_vs_run_table2"]': "03's results next to the paper's",
        'pvr["paper_vs_run_table4"]': "04's results next to the paper's",
        'card[["claim", "paper", "run", "control", "verdict"]]': "the scorecard quotes 02-04's numbers",
        "print(sfig.summary_text(sections, card))": "quotes the scorecard",
    },
}


@dataclass(frozen=True)
class Tolerance:
    """How far a run's number may be from the committed one: |run - committed| <=
    max(abs_tol, rel_tol * |committed|, k_sd * sd), where sd is the row's `<column>_sd` when the table has
    one (the spread over seeds that the table itself reports). Columns in `ignore` are not compared
    (timings). Text, booleans and verdicts must match exactly; numbers inside text (e.g. '10.2 ± 0.2%')
    are compared with the same rule."""

    abs_tol: float
    rel_tol: float = 0.0
    k_sd: float = 0.0
    ignore: tuple[str, ...] = ()
    why: str = ""


# Every table not listed here is compared to 0.15% relative: the precision of its 4 written significant digits.
EXACT = Tolerance(abs_tol=1e-12, rel_tol=1.5e-3, why="written with 4 significant digits; same on every machine")
_TIMINGS = ("train_seconds", "train_seconds_sd", "seconds", "eval_seconds")
# Percentages over 64-192 prompts: 1 prompt is 0.5-1.6 points. Trained models: up to 8 points (or 3 sd
# of the seeds' own spread); losses and perplexities 15%. Generations of ablated shipped models: 3 points.
TRAINED = Tolerance(abs_tol=8.0, rel_tol=0.15, k_sd=3.0, ignore=_TIMINGS,
                    why="trained models: rates within 8 points or 3 sd over seeds, losses/ppl within 15%")
GENERATED = Tolerance(abs_tol=3.0, rel_tol=0.05, k_sd=3.0,
                      why="greedy generations of shipped or ablated models: rates within 3 points")
SCORES = Tolerance(abs_tol=0.1, rel_tol=0.1, why="direction scores and AUCs read along generated tokens")

MACHINE_DEPENDENT_TABLES: dict[str, Tolerance] = {
    "probe_direction_vs_behaviour": GENERATED,
    "probe_direction_per_token": SCORES,
    "probe_direction_token_auc": SCORES,
    "table1_classify": GENERATED,
    "table1_classify_bias": GENERATED,
    "table1_classify_scorers": GENERATED,
    "table2_freeze_lr_sweep": TRAINED,
    "table2_freeze": TRAINED,
    "table2_freeze_vs_paper": TRAINED,
    "fig5_freeze_label_transfer": TRAINED,
    "table4_budget": TRAINED,
    "table4_budget_vs_paper": TRAINED,
    "fig6_budget_label_transfer": TRAINED,
    "paper_vs_run_table1": GENERATED,
    "paper_vs_run_table2": TRAINED,
    "paper_vs_run_table4": TRAINED,
    "claims_scorecard": TRAINED,
}


def tolerance_for(table: str) -> Tolerance:
    return MACHINE_DEPENDENT_TABLES.get(table, EXACT)


_NUMBER = re.compile(r"[-+−]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def _as_number(x):
    """A float for a numeric cell (NaN for an empty one), else None."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return float("nan")
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    return None


def _close(run: float, ref: float, tol: Tolerance, sd: float) -> bool:
    if math.isnan(run) or math.isnan(ref):
        return math.isnan(run) and math.isnan(ref)
    bound = max(tol.abs_tol, tol.rel_tol * abs(ref), tol.k_sd * (sd if sd == sd else 0.0))
    return abs(run - ref) <= bound + 1e-12


def _numbers(text: str) -> tuple[str, list[float]]:
    """The text with each number replaced by '#', and the numbers."""
    nums = [float(m.replace("−", "-")) for m in _NUMBER.findall(text)]
    return _NUMBER.sub("#", text), nums


def compare_tables(ref: pd.DataFrame, run: pd.DataFrame, tol: Tolerance, name: str = "") -> list[str]:
    """Every difference between a committed table `ref` and a run's `run` beyond `tol` (empty: they agree)."""
    where = f"{name}: " if name else ""
    if list(ref.columns) != list(run.columns):
        return [f"{where}columns differ: committed {list(ref.columns)}, run {list(run.columns)}"]
    if len(ref) != len(run):
        return [f"{where}{len(ref)} rows committed, {len(run)} in the run"]
    out = []
    for col in ref.columns:
        if col in tol.ignore:
            continue
        sd_col = f"{col}_sd" if f"{col}_sd" in ref.columns else None
        for i, (a, b) in enumerate(zip(ref[col].tolist(), run[col].tolist())):
            sd = _as_number(ref[sd_col].iloc[i]) if sd_col else 0.0
            sd = 0.0 if sd is None else sd
            na, nb = _as_number(a), _as_number(b)
            if na is not None and nb is not None:
                if not _close(nb, na, tol, sd):
                    out.append(f"{where}row {i}, {col}: committed {a!r}, run {b!r}")
                continue
            sa, sb = str(a), str(b)
            ta, xa = _numbers(sa)
            tb, xb = _numbers(sb)
            if ta != tb or len(xa) != len(xb) or not all(_close(y, x, tol, 0.0) for x, y in zip(xa, xb)):
                out.append(f"{where}row {i}, {col}: committed {sa!r}, run {sb!r}")
    return out


@dataclass
class Report:
    """Result of comparing a run's tables folder with the committed one."""

    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)
    compared: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.differences) and self.compared > 0


def compare_folders(committed, run) -> Report:
    """Compare every `*.csv` of the committed tables folder with the same table of a run's folder."""
    from pathlib import Path

    committed, run = Path(committed), Path(run)
    ref_names = {p.stem for p in committed.glob("*.csv")}
    run_names = {p.stem for p in run.glob("*.csv")} if run.is_dir() else set()
    rep = Report(missing=sorted(ref_names - run_names), extra=sorted(run_names - ref_names))
    for name in sorted(ref_names & run_names):
        ref_df = pd.read_csv(committed / f"{name}.csv", keep_default_na=True)
        run_df = pd.read_csv(run / f"{name}.csv", keep_default_na=True)
        rep.differences += compare_tables(ref_df, run_df, tolerance_for(name), name)
        rep.compared += 1
    return rep
