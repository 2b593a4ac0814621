"""01_probe's figures and its report (the figures and tables the notebook saves), drawn from stage_probe's cached results.

Nothing here computes a result: the stage module (`ssah_utils.stage_probe`) computes and caches, this module draws.
05_figures calls `report` under the read-only cache, so the files it writes are those the notebook wrote.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from . import plots
from . import stage_probe as sp
from .report import Section, figure, table


_CONT_STYLE = {"refusal": "-", "compliance": "--"}


def _role_color(role: str) -> str:
    return plots.MODEL_COLORS.get(role, "#333333")


def plot_fig2(t2: pd.DataFrame, title: str) -> plt.Figure:
    """Fig 2: distance to the clean query as the continuation grows, aligned vs unaligned."""
    plots.set_style()
    fig, ax = plt.subplots()
    for (role, cont), d in t2.groupby(["role", "continuation"], sort=False):
        ax.errorbar(d["n_tokens"], d["mean"], yerr=d["sem"], color=_role_color(role), ls=_CONT_STYLE[cont],
                    marker="o", ms=4, capsize=2, label=f"{role} + {cont}")
    ax.set_xlabel("continuation tokens")
    ax.set_ylabel("cosine distance to clean query")
    ax.set_title(title)
    ax.legend(fontsize="small")
    return fig


def plot_fig3(t3: pd.DataFrame, title: str) -> plt.Figure:
    """Fig 3: distance per block at one continuation length."""
    plots.set_style()
    fig, ax = plt.subplots()
    for role, d in t3.groupby("role", sort=False):
        for cont in ("refusal", "compliance"):
            ax.plot(d["point"], d[cont], color=_role_color(role), ls=_CONT_STYLE[cont], marker="o", ms=4,
                    label=f"{role} + {cont}")
    ax.set_xlabel("residual point (0 = embeddings, i = after block i)")
    ax.set_ylabel("cosine distance to clean query")
    ax.set_title(title)
    ax.legend(fontsize="small")
    return fig


def plot_fig4(t4: pd.DataFrame, title: str) -> plt.Figure:
    """Fig 4: d(refusal) - d(compliance) per block (its absolute value is the paper's |difference|)."""
    plots.set_style()
    fig, ax = plt.subplots()
    roles = list(dict.fromkeys(t4["role"]))
    w = 0.8 / len(roles)
    for k, role in enumerate(roles):
        d = t4[t4["role"] == role]
        ax.bar(d["point"] + (k - (len(roles) - 1) / 2) * w, d["refusal_minus_compliance"], width=w,
               color=_role_color(role), label=role)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("residual point (0 = embeddings, i = after block i)")
    ax.set_ylabel("d(refusal) - d(compliance)\n(< 0: closer to refusal)")
    ax.set_title(title)
    ax.legend(fontsize="small")
    return fig


def plot_fig7(t2: pd.DataFrame, t3: pd.DataFrame, title: str) -> plt.Figure:
    """Fig 7 (appendix analogue): Fig 2 and Fig 3 side by side on a second harmful set."""
    plots.set_style()
    fig, axes = plt.subplots(1, 2, figsize=(plots.FIGSIZE[0] * 1.8, plots.FIGSIZE[1]))
    for (role, cont), d in t2.groupby(["role", "continuation"], sort=False):
        axes[0].plot(d["n_tokens"], d["mean"], color=_role_color(role), ls=_CONT_STYLE[cont], marker="o", ms=4,
                     label=f"{role} + {cont}")
    axes[0].set_xlabel("continuation tokens")
    axes[0].set_ylabel("cosine distance to clean query")
    for role, d in t3.groupby("role", sort=False):
        for cont in ("refusal", "compliance"):
            axes[1].plot(d["point"], d[cont], color=_role_color(role), ls=_CONT_STYLE[cont], marker="o", ms=4)
    axes[1].set_xlabel("residual point")
    axes[0].legend(fontsize="small")
    fig.suptitle(title)
    return fig


def plot_probes(acc: pd.DataFrame) -> plt.Figure:
    """Held-out balanced accuracy of the harmful-vs-benign probe per residual point, per model."""
    plots.set_style()
    fig, ax = plt.subplots()
    for role, d in acc.groupby("role", sort=False):
        ax.plot(d["point"], d["test_acc"], color=_role_color(role), marker="o", ms=4, label=role)
    ax.axhline(0.5, color="black", lw=0.8, ls=":", label="chance")
    ax.set_ylim(0.3, 1.03)
    ax.set_xlabel("residual point (0 = embeddings, i = after block i)")
    ax.set_ylabel("held-out balanced accuracy")
    ax.set_title("A linear probe reads harmful vs benign from the last prompt token")
    ax.legend(fontsize="small")
    return fig


def plot_direction(req: pd.DataFrame, point: int) -> plt.Figure:
    """Each request's score on the refusal direction, by group, coloured by what the model did."""
    plots.set_style()
    groups = list(dict.fromkeys(req["group"]))
    fig, ax = plt.subplots(figsize=(plots.FIGSIZE[0] * 1.3, 0.42 * len(groups) + 1.2))
    colors = {"refusal": "#d62728", "harmful": "#1f77b4", "correct": "#2ca02c", "wrong": "#ff7f0e", "degenerate": "#7f7f7f"}
    rng = np.random.default_rng(0)
    for k, g in enumerate(groups):
        d = req[req["group"] == g]
        for v, dv in d.groupby("verdict"):
            ax.scatter(dv["score0"], k + rng.uniform(-0.25, 0.25, len(dv)), s=12, color=colors.get(v, "#333333"),
                       label=v if k == 0 or v not in ax.get_legend_handles_labels()[1] else None)
    ax.axvline(0.5, color="black", lw=0.8, ls=":")
    ax.set_yticks(range(len(groups)), groups)
    ax.invert_yaxis()
    ax.set_xlabel(f"score on the refusal direction at point {point} (0 = benign mean, 1 = harmful mean)")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize="small", title="model did", loc="center left",
              bbox_to_anchor=(1.0, 0.5))
    return fig


def plot_tokens(tokens: pd.DataFrame, sep: pd.DataFrame, groups: list[str], max_step: int = 16) -> plt.Figure:
    """Left: mean direction score per generated token and group. Right: per-token AUC of each contrast."""
    plots.set_style()
    fig, axes = plt.subplots(1, 2, figsize=(plots.FIGSIZE[0] * 2, plots.FIGSIZE[1] * 1.15))
    cmap = plt.get_cmap("tab10")
    t = tokens[(tokens["step"] < max_step) & tokens["group"].isin(groups)]
    for k, g in enumerate(groups):
        d = t[t["group"] == g]
        if len(d):
            m = d.groupby("step")["score"].mean()
            axes[0].plot(m.index, m.values, color=cmap(k % 10), marker=".", label=f"{g} (n={d['id'].nunique()})")
    axes[0].axhline(0.5, color="black", lw=0.8, ls=":")
    axes[0].set_xlabel("generated token (0 = state that picks the first answer token)")
    axes[0].set_ylabel("score on the refusal direction")
    axes[0].legend(fontsize="x-small")
    for k, (c, d) in enumerate(sep[sep["step"] < max_step].groupby("contrast", sort=False)):
        axes[1].plot(d["step"], d["auc"], color=cmap((k + 5) % 10), marker=".", label=c)
    axes[1].axhline(0.5, color="black", lw=0.8, ls=":")
    axes[1].set_ylim(-0.02, 1.02)
    axes[1].set_xlabel("generated token")
    axes[1].set_ylabel("AUC, harmful vs benign group")
    axes[1].legend(fontsize="x-small")
    fig.tight_layout()
    return fig


def report(sec: Section) -> None:
    """01_probe: Figs 2, 3, 4, 7 and the probe/direction figures and tables (as the notebook draws them)."""

    cfg, r = sec.cfg, sec.results
    dist = sp.distances(cfg)
    n_points = int(dist["point"].max()) + 1
    layer = int(sec.params.get("layer", -1))
    point = layer if layer >= 0 else n_points + layer
    t2 = sp.fig2_table(dist, point)
    table(sec, t2, "probe_fig2_distance_tokens")
    figure(sec, plot_fig2(t2, f"Fig 2 analogue: distance at point {point} ({cfg.preset})"), "fig2_probe_distance_tokens")
    k_max = max(cfg.distance.lengths)
    t3 = sp.fig3_table(dist, k_max)
    figure(sec, plot_fig3(t3, f"Fig 3 analogue: distance per block, {k_max} continuation tokens"),
         "fig3_probe_distance_blocks")
    t4 = sp.fig4_table(dist, k_max)
    table(sec, t4, "probe_fig4_distance_gap")
    figure(sec, plot_fig4(t4, f"Fig 4 analogue: d(refusal) - d(compliance), {k_max} tokens"), "fig4_probe_distance_gap")
    table(sec, sp.robustness(cfg), "probe_distance_robustness")
    dist7 = sp.distances(cfg, set_name=cfg.sets.appendix)
    figure(sec, plot_fig7(sp.fig2_table(dist7, point), sp.fig3_table(dist7, k_max), f"Fig 7 analogue: {cfg.sets.appendix}"),
         "fig7_probe_distance_appendix")
    acc = sp.probes(cfg)
    table(sec, acc, "probe_linear_accuracy")
    figure(sec, plot_probes(acc), "figx_probe_linear")
    dr = sp.direction(cfg)
    table(sec, sp.direction_vs_behaviour(dr["requests"]), "probe_direction_vs_behaviour")
    figure(sec, plot_direction(dr["requests"], dr["point"]), "figx_probe_direction")
    table(sec, sp.token_summary(dr["tokens"], max_step=10), "probe_direction_per_token")
    sep = sp.token_separation(dr["tokens"])
    table(sec, sep, "probe_direction_token_auc")
    groups = ["plain harmful", "plain benign", "jailbreak: benign_motive", "jailbreak: prefilling", "prefilled benign"]
    figure(sec, plot_tokens(dr["tokens"], sep, [g for g in groups if g in set(dr["tokens"]["group"])]),
         "figx_probe_tokens")
    r.update(dist=dist, point=point, k_max=k_max, t2=t2, acc=acc)
