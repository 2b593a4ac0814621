"""What every stage's report shares: the `Section` a report fills (05_figures' record of one notebook's results
and files), the two writers `figure` and `table` (which honour 05's dry run), and the scorecard's drawing.

The stage modules compute and cache; `report_probe`, `report_classify`, `report_freeze` and `report_budget`
draw each stage's figures and tables from those results; `stage_figures` (05) runs the four reports under
the read-only cache and scores the claims. Nothing here computes a result.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd

from . import plots

DRY: list[bool] = [False]  # while True, reports read and draw but write no file (`stage_figures.missing_sections`)
HOLDS, FAILS, MISSING, UNTESTABLE = "holds", "does not hold on this model", "missing", "not testable here"
VERDICT_COLORS = {HOLDS: "#b7e1b0", FAILS: "#f4b6b6", MISSING: "#dddddd", UNTESTABLE: "#eeeeee"}


@dataclass
class Section:
    """One notebook's results as read from the cache: configs, results, files written, or the CacheMiss."""

    name: str
    notebook: str
    params: dict = field(default_factory=dict)
    cfg: Any = None  # the stage config (None when the parameters could not be read)
    results: dict = field(default_factory=dict)
    written: list = field(default_factory=list)  # (kind, name) in the order written
    message: str = ""  # the CacheMiss (or config error) text when not ok
    log: str = ""  # what the stage functions printed (cache hits)

    @property
    def ok(self) -> bool:
        return not self.message

    def outputs(self) -> pd.DataFrame:
        """The files written (figure: png+pdf in figures/, table: csv+tex in tables/)."""
        return pd.DataFrame(self.written, columns=["kind", "name"])

    def __repr__(self) -> str:
        if not self.ok:
            return f"{self.notebook}: not shown. {self.message}"
        figs = [n for k, n in self.written if k == "figure"]
        tabs = [n for k, n in self.written if k == "table"]
        return (f"{self.notebook}: redrawn from the cache: {len(figs)} figures ({', '.join(figs) or '-'}); "
                f"{len(tabs)} tables ({', '.join(tabs) or '-'})")


def figure(sec: Section, fig, name: str) -> None:
    if not DRY[0]:
        plots.save_figure(fig, name)
    plt.close(fig)
    sec.written.append(("figure", name))


def table(sec: Section, df: pd.DataFrame, name: str) -> None:
    if not DRY[0]:
        plots.save_table(df, name)
    sec.written.append(("table", name))


def plot_scorecard(card: pd.DataFrame, width: int = 46) -> plt.Figure:
    """The scorecard as a table: claim, the paper, this run, verdict (coloured)."""
    plots.set_style()
    wrap = lambda t, w: "\n".join(textwrap.wrap(str(t), w)) or "-"  # noqa: E731
    cells = [[wrap(r.claim, width), wrap(r.paper, width - 8),
              wrap(f"{r.run}; vs {r.control}" if r.run != "-" else (r.note or "-"), width), wrap(r.verdict, 14)]
             for r in card.itertuples()]
    lines = [max(c.count("\n") + 1 for c in row) for row in cells]
    fig, ax = plt.subplots(figsize=(16.0, 0.5 + 0.17 * (sum(lines) + len(lines))))
    ax.axis("off")
    tab = ax.table(cellText=cells, colLabels=["claim", "paper", "this run (vs control)", "verdict"],
                   colWidths=[0.31, 0.26, 0.33, 0.10], loc="upper center", cellLoc="left")
    tab.auto_set_font_size(False)
    tab.set_fontsize(7)
    total = sum(lines) + len(lines) + 2
    for (i, j), cell in tab.get_celld().items():
        h = (2 if i == 0 else lines[i - 1] + 1) / total
        cell.set_height(h)
        if i == 0:
            cell.set_text_props(weight="bold")
        elif j == 3:
            cell.set_facecolor(VERDICT_COLORS.get(card["verdict"].iloc[i - 1], "white"))
    return fig


def save_scorecard(card: pd.DataFrame, name: str) -> None:
    """Draw the scorecard (`plot_scorecard`) and save it as figure `name` (png + pdf)."""
    fig = plot_scorecard(card)
    plots.save_figure(fig, name)
    plt.close(fig)


def close_figures() -> None:
    """Close every open matplotlib figure (after a report, so that none leaks into the next)."""
    plt.close("all")
