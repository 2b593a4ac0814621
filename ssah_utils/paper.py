"""The paper's reported numbers (data/paper/reported.csv), for side-by-side tables."""

from __future__ import annotations

import pandas as pd

from . import config as _config

REPORTED_CSV = _config.PAPER_DIR / "reported.csv"


def reported(experiment: str | None = None) -> pd.DataFrame:
    """Rows of the paper's reported numbers, optionally one experiment (e.g. 'table1', 'probe_distance')."""
    df = pd.read_csv(REPORTED_CSV)
    if experiment is None:
        return df
    known = sorted(df["experiment"].unique())
    if experiment not in known:
        raise KeyError(f"no reported numbers for {experiment!r}; known experiments: {', '.join(known)}")
    return df[df["experiment"] == experiment].reset_index(drop=True)


def side_by_side(ours: pd.DataFrame, experiment: str, on: list[str], value: str = "value") -> pd.DataFrame:
    """Join our computed rows with the paper's on the columns `on` (our value column named `ours`)."""
    paper = reported(experiment).rename(columns={"value": "paper"})
    return paper.merge(ours.rename(columns={value: "ours"}), on=on, how="outer")
