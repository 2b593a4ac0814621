"""One figure style and byte-stable `save_figure` / `save_table` for every notebook."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from . import config as _config

# Colours of the unit kinds and of the models, the same in every figure.
UNIT_COLORS = {"ESU": "#d62728", "EUU": "#1f77b4", "CU": "#7f7f7f", "RU": "#2ca02c"}
MODEL_COLORS = {"aligned": "#d62728", "unaligned": "#1f77b4", "base": "#7f7f7f"}
FIGSIZE = (6.0, 3.6)  # one column of a paper, readable in a notebook
_NAME = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")


def set_style() -> None:
    """The project's figure style (seaborn whitegrid, fixed sizes and fonts, deterministic output)."""
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.95)
    plt.rcParams.update({
        "figure.figsize": FIGSIZE,
        "figure.dpi": 100,
        "savefig.dpi": 150,
        "savefig.bbox": "tight",
        "axes.titlesize": "medium",
        "legend.frameon": False,
        "svg.hashsalt": "ssah",
        "pdf.fonttype": 42,
    })


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"figure/table names are lower-case paper labels like 'fig2_probe_distance', got {name!r}")


def save_figure(fig: plt.Figure, name: str, outdir: Path | str | None = None) -> list[Path]:
    """Write `fig` as `<name>.png` and `<name>.pdf`, metadata stripped so reruns are byte-stable, into
    `outdir` or this run's figures folder (`config.output_dir`: figures/ for the default run only)."""
    _check_name(name)
    out = Path(outdir) if outdir is not None else _config.output_dir("figures")
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    fig.savefig(paths[0], metadata={"Software": None})
    fig.savefig(paths[1], metadata={"Creator": None, "Producer": None, "CreationDate": None})
    return paths


def save_table(df: pd.DataFrame, name: str, outdir: Path | str | None = None, float_format: str = "%.4g") -> list[Path]:
    """Write `df` as `<name>.csv` and `<name>.tex` (plain LaTeX tabular); a meaningful index is kept.
    Into `outdir` or this run's tables folder (`config.output_dir`: tables/ for the default run only)."""
    _check_name(name)
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"save_table wants a DataFrame, got {type(df).__name__}")
    out = Path(outdir) if outdir is not None else _config.output_dir("tables")
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.csv", out / f"{name}.tex"]
    # A default 0..n-1 index carries no information: leave it out so the CSV reads back cleanly.
    keep_index = not (isinstance(df.index, pd.RangeIndex) and df.index.name is None)
    df.to_csv(paths[0], float_format=float_format, index=keep_index)
    paths[1].write_text(df.to_latex(float_format=lambda x: float_format % x, escape=True, index=keep_index))
    return paths
