"""04_alignment_budget's figures and its report (the figures and tables the notebook saves), drawn from stage_budget's cached results.

Nothing here computes a result: the stage module (`ssah_utils.stage_budget`) computes and caches, this module draws.
05_figures calls `report` under the read-only cache, so the files it writes are those the notebook wrote.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from . import stage_budget as sb
from .plots import UNIT_COLORS, set_style
from .report import Section, figure, table
from .units import LABELS


_AFTER_TITLE = {"reference": "shipped aligned model", "full": "full SFT (seed 0)", "ru_only": "RU-only SFT (seed 0)",
                "random_only": "random-units SFT (seed 0)", "top_only": "top-utility SFT (seed 0)"}


def plot_transfer(tr: dict):
    """Heatmaps: base labels (rows: RU, EUU) against labels after alignment (columns), percent of row."""

    set_style()
    mats = tr["matrices"]
    fig, axes = plt.subplots(1, len(mats), figsize=(3.3 * len(mats), 2.6), squeeze=False)
    for ax, (name, m) in zip(axes[0], mats.items()):
        ax.imshow(m.to_numpy(), cmap="Greens", vmin=0, vmax=100, aspect="auto")
        ax.set_xticks(range(len(LABELS)), LABELS)
        ax.set_yticks(range(len(m.index)), [f"base {x}" for x in m.index])
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                v = m.iat[i, j]
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="white" if v > 60 else "black", fontsize=9)
        ax.set_title(f"base → {_AFTER_TITLE.get(name, name)}", fontsize="small")
        ax.grid(False)
    axes[0][0].set_ylabel("label in the base")
    fig.supxlabel("label after alignment (% of the row's units)", fontsize="small")
    fig.tight_layout()
    return fig


def plot_tax(runs: pd.DataFrame):
    """Task accuracy and harmful compliance per condition: mean ± sd bars with each seed as a dot;
    the base (dashed) and the reference aligned model (dotted) as lines."""

    set_style()
    colors = {"full": "#7f7f7f", "ru_only": UNIT_COLORS["RU"], "random_only": "#bcbd22", "top_only": UNIT_COLORS["EUU"]}
    conds = [c for c in sb.CONDITIONS if c in set(runs["condition"])]
    fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.2))
    for ax, metric, title in zip(axes, ("utility", "asr"), ("task accuracy (%)", "harmful compliance (%)")):
        for i, c in enumerate(conds):
            v = runs.loc[runs["condition"] == c, metric]
            ax.bar(i, v.mean(), yerr=v.std(ddof=1) if len(v) > 1 else 0, color=colors[c], capsize=3, alpha=0.8)
            ax.scatter(np.full(len(v), i), v, color="black", s=8, zorder=3)
        for ref, ls in (("base", "--"), ("reference", ":")):
            v = runs.loc[runs["condition"] == ref, metric]
            if len(v):
                ax.axhline(float(v.iloc[0]), ls=ls, color="black", lw=1, label=ref)
        ax.set_xticks(range(len(conds)), [c.replace("_", "\n") for c in conds])
        ax.set_title(title)
        ax.set_ylim(0, 100)
    axes[1].legend(fontsize="small", loc="upper right")
    fig.tight_layout()
    return fig


def plot_losses(cfg: sb.BudgetConfig):
    """Training loss per step of the first seed of each condition (stages one after another)."""

    set_style()
    colors = {"full": "#7f7f7f", "ru_only": UNIT_COLORS["RU"], "random_only": "#bcbd22", "top_only": UNIT_COLORS["EUU"]}
    fig, ax = plt.subplots(figsize=(6.0, 3.2))
    for c in cfg.conditions:
        d = sb.train_run(cfg, c, cfg.seeds[0])["losses"]
        ax.plot(np.arange(1, len(d) + 1), d["loss"], color=colors[c], lw=1, label=c)
    ax.set_xlabel("optimizer step (all SFT stages)")
    ax.set_ylabel("response-token loss")
    ax.set_yscale("log")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def report(sec: Section) -> None:
    """04_alignment_budget: masks, Table 4 (+ vs paper), the tax and loss figures, Fig 6."""

    cfg, r = sec.cfg, sec.results
    table(sec, sb.mask_table(cfg), "table4_budget_masks")
    t4 = sb.table4(cfg, log=None)
    table(sec, t4["summary"], "table4_budget")
    figure(sec, plot_tax(t4["runs"]), "fig_budget_tax")
    figure(sec, plot_losses(cfg), "fig_budget_losses")
    table(sec, sb.table4_vs_paper(t4["summary"]), "table4_budget_vs_paper")
    tr = sb.transfer(cfg)
    table(sec, sb.transfer_table(tr), "fig6_budget_label_transfer")
    figure(sec, plot_transfer(tr), "fig6_budget_label_transfer")
    r.update(summary=t4["summary"], transfer=tr, base_fractions=sb.base_labels(cfg).fractions())
