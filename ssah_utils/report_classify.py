"""02_classify's figures and its report (the figures and tables the notebook saves), drawn from stage_classify's cached results.

Nothing here computes a result: the stage module (`ssah_utils.stage_classify`) computes and caches, this module draws.
05_figures calls `report` under the read-only cache, so the files it writes are those the notebook wrote.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from . import stage_classify as sc
from .plots import UNIT_COLORS, set_style
from .report import Section, figure, table
from .units import LABELS


def plot_layer_map(cfg: sc.ClassifyConfig):
    """Stacked bars: share of each label per layer, MLP channels and heads side by side."""

    set_style()
    tab = sc.layer_map(cfg)
    fig, axes = plt.subplots(1, 2, figsize=(7.5, 3.4), sharey=True)
    for ax, module, title in zip(axes, ("mlp", "attn"), ("MLP channels", "attention heads")):
        t = tab.xs(module, level="module")
        bottom = np.zeros(len(t))
        for lab in LABELS:
            ax.bar(t.index, t[lab], bottom=bottom, color=UNIT_COLORS[lab], label=lab, width=0.8)
            bottom += t[lab].to_numpy()
        ax.set_title(title)
        ax.set_xlabel("layer")
        ax.set_xticks(list(t.index))
    axes[0].set_ylabel("% of the layer's units")
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def plot_scores(cfg: sc.ClassifyConfig):
    """z_S against z_U for every unit, coloured by label (MLP channels dots, heads crosses)."""

    set_style()
    df = sc.labels(cfg).frame()
    fig, ax = plt.subplots(figsize=(4.8, 4.0))
    for lab in LABELS:
        for module, marker, size in (("mlp", "o", 6), ("attn", "x", 30)):
            d = df[(df["label"] == lab) & (df["module"] == module)]
            ax.scatter(d["z_utility"], d["z_safety"], s=size, marker=marker, c=UNIT_COLORS[lab], alpha=0.6,
                       label=f"{lab} ({module})" if len(d) else None, linewidths=0.8)
    ax.set_xlabel("z-scored utility importance $I_U$")
    ax.set_ylabel("z-scored safety importance $I_S$")
    ax.legend(fontsize="x-small", ncol=2)
    fig.tight_layout()
    return fig


def plot_dose(curve: pd.DataFrame):
    """ASR and utility against the share of parameters removed, one line per ranking (sd over random orders)."""

    set_style()
    colors = {"ESU-like": UNIT_COLORS["ESU"], "EUU-like": UNIT_COLORS["EUU"], "RU-like": UNIT_COLORS["RU"], "random": "black"}
    fig, axes = plt.subplots(1, 3, figsize=(10.0, 3.2))
    for ax, metric, title in zip(axes, ("asr", "refusal", "utility"),
                                 ("attack success rate (%)", "refusals of harmful requests (%)", "task accuracy (%)")):
        for ranking, d in curve.groupby("ranking", sort=False):
            g = d.groupby("fraction")[metric]
            x = 100 * g.mean().index.to_numpy()
            ax.errorbar(x, g.mean(), yerr=g.std(ddof=1).fillna(0), label=ranking, color=colors[ranking], marker="o",
                        ms=3, capsize=2, ls="--" if ranking == "random" else "-")
        ax.set_xlabel("% of unit parameters removed")
        ax.set_title(title)
    axes[2].legend(fontsize="small")
    fig.tight_layout()
    return fig


def report(sec: Section) -> None:
    """02_classify: Table 1 and its checks, the label shares, layer map, score scatter and dose-response."""

    cfg, r = sec.cfg, sec.results
    table(sec, sc.fractions_vs_paper(cfg), "table1_classify_fractions")
    figure(sec, plot_layer_map(cfg), "fig_classify_layer_map")
    figure(sec, plot_scores(cfg), "fig_classify_scores")
    t1 = sc.table1(cfg)
    table(sec, t1["summary"], "table1_classify")
    table(sec, sc.bias_table(sc.bias_sensitivity(cfg)["runs"]), "table1_classify_bias")
    table(sec, sc.scorer_table(sc.scorer_ablation(cfg)["runs"]), "table1_classify_scorers")
    table(sec, sc.stability(cfg), "table1_classify_stability")
    table(sec, sc.estimator_table(sc.estimator_comparison(cfg)), "table1_classify_estimators")
    figure(sec, plot_dose(sc.dose_response(cfg)["curve"]), "fig_classify_dose")
    r.update(summary=t1["summary"], fractions=sc.label_fractions(cfg))
