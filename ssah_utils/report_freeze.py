"""03_freeze_finetune's figures and its report (the figures and tables the notebook saves), drawn from stage_freeze's cached results.

Nothing here computes a result: the stage module (`ssah_utils.stage_freeze`) computes and caches, this module draws.
05_figures calls `report` under the read-only cache, so the files it writes are those the notebook wrote.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from . import stage_freeze as sf
from .plots import set_style
from .report import Section, figure, table
from .units import LABELS


def plot_transfer(cfg: sf.FreezeConfig, replicate: int = 0):
    """Heatmaps of the label transfer (percent of each row) for each fine-tuning set, and the noise floor."""
    import seaborn as sns


    set_style()
    panels = [(f"full fine-tuning on {ds}", sf.label_transfer(cfg, ds, replicate)) for ds in cfg.datasets]
    panels.append(("no fine-tuning (calibration halves)", sf.label_noise(cfg)))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.2))
    for ax, (title, tab) in zip(np.atleast_1d(axes), panels):
        sns.heatmap(tab.loc[list(LABELS), list(LABELS)], annot=True, fmt=".0f", cmap="Reds", vmin=0, vmax=100,
                    cbar=False, ax=ax, square=True)
        ax.set_title(title, fontsize="small")
        ax.set_xlabel("label after")
        ax.set_ylabel("label before")
    fig.tight_layout()
    return fig


def plot_asr(df: pd.DataFrame):
    """Bars per condition (mean ± sd over replicates), one colour per fine-tuning set: keyword ASR (the
    paper's metric), oracle ASR, refusals of harmful requests, task accuracy."""

    set_style()
    metrics = [("asr_kw", "keyword ASR (%)"), ("asr", "oracle ASR (%)"), ("refusal", "refusals of harmful (%)"),
               ("utility", "task accuracy (%)")]
    conds = list(dict.fromkeys(df["condition"]))
    dss = list(dict.fromkeys(df["dataset"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.3 * len(metrics), 3.6), sharex=True)
    width = 0.8 / len(dss)
    x = np.arange(len(conds))
    for ax, (m, title) in zip(axes, metrics):
        for i, ds in enumerate(dss):
            g = df[df["dataset"] == ds].groupby("condition", sort=False)[m]
            mean, sd = g.mean().reindex(conds), g.std(ddof=1).fillna(0.0).reindex(conds)
            ax.bar(x + (i - (len(dss) - 1) / 2) * width, mean, width, yerr=sd, capsize=2, label=ds)
        ax.set_title(title)
        ax.set_xticks(x)
        ax.set_xticklabels([sf.COND_LABELS[c] for c in conds], rotation=60, ha="right", fontsize="small")
    axes[-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def report(sec: Section) -> None:
    """03_freeze_finetune: masks, lr sweep, Table 2 (+ vs paper, verification), Fig 5."""

    cfg, r = sec.cfg, sec.results
    table(sec, sf.mask_table(cfg), "table2_freeze_masks")
    lrs = sf.parse_lr_grid(sec.params.get("lr_grid", ""))
    sweep = sf.lr_sweep(cfg, lrs) if lrs else None
    cfg = sec.cfg = sf.choose_lr(cfg, sweep)  # the lr of every run: the loss rule's choice, as in the notebook
    if sweep is not None:
        table(sec, sf.sweep_table(cfg, sweep), "table2_freeze_lr_sweep")
    df = sf.runs(cfg)
    table(sec, sf.verify_table(df), "table2_freeze_verify")
    summary = sf.summarize(df)
    table(sec, summary, "table2_freeze")
    table(sec, sf.vs_paper(summary), "table2_freeze_vs_paper")
    figure(sec, plot_asr(df), "fig_freeze_asr")
    r.update(summary=summary, transfer=None)
    if cfg.relabel:
        figure(sec, plot_transfer(cfg), "fig5_freeze_label_transfer")
        r["transfer"] = sf.transfer_summary(cfg)
        table(sec, r["transfer"], "fig5_freeze_label_transfer")
