"""Dump the finished runs of 03 and 04 on a real tier from the cache (read-only), for a notebook run
that is still going or was cut off: one row per cached (set, condition, seed), nothing computed, with
the runs still missing listed. The notebooks themselves remain the results of record; this is the
interim record of what is already measured.

Usage: python scripts/interim_runs.py [--preset smollm2-135m] --out results/smollm2-135m/interim
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ssah_utils import cache, nbparams  # noqa: E402
from ssah_utils import stage_budget as sb  # noqa: E402
from ssah_utils import stage_freeze as sf  # noqa: E402


def freeze_rows(preset: str) -> tuple[pd.DataFrame, list[str]]:
    p = nbparams.notebook_params("03_freeze_finetune", {"preset": preset})
    for k in sf.NOTEBOOK_ONLY_PARAMS:
        p.pop(k)
    cfg = sf.choose_lr(sf.config_from_params(p), None)
    rows, missing = [], []
    with cache.read_only():
        for ds in cfg.datasets:
            for cond in cfg.conditions:
                for r in ([0] if cond == "before" else range(len(cfg.seeds))):
                    try:
                        m = sf.run(cfg, ds, cond, r)["metrics"]
                    except cache.CacheMiss:
                        missing.append(f"03 {ds} {cond} seed {cfg.seeds[r]}")
                        continue
                    rows.append({"dataset": ds, "condition": cond, "replicate": cfg.seeds[r] if cond != "before" else 0, **m})
    return pd.DataFrame(rows), missing


def budget_rows(preset: str) -> tuple[pd.DataFrame, list[str]]:
    cfg = sb.config_from_params(nbparams.notebook_params("04_alignment_budget", {"preset": preset}))
    rows, missing = [], []
    with cache.read_only():
        for which in ("base", "reference"):
            try:
                rows.append({"condition": which, "seed": -1, **sb.evaluate_reference(cfg, which)["metrics"]})
            except cache.CacheMiss:
                missing.append(f"04 {which}")
        for cond in cfg.conditions:
            for s in cfg.seeds:
                try:
                    tr = sb.train_run(cfg, cond, s)
                    m = sb.evaluate_run(cfg, cond, s)["metrics"]
                except cache.CacheMiss:
                    missing.append(f"04 {cond} seed {s}")
                    continue
                rows.append({"condition": cond, "seed": s, "trained_unit_params_pct": tr["summary"]["trained_unit_params_pct"],
                             "moved_outside_mask": tr["summary"]["moved_outside_mask"], **m})
    return pd.DataFrame(rows), missing


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    notes = []
    for name, fn in (("03_freeze_runs", freeze_rows), ("04_budget_runs", budget_rows)):
        df, missing = fn(a.preset)
        df.to_csv(out / f"{name}.csv", index=False)
        notes.append(f"{name}.csv: {len(df)} cached runs; missing: {', '.join(missing) or 'none'}")
        print(notes[-1])
    (out / "README.md").write_text("# One row per cached run (read from the cache by scripts/interim_runs.py; the notebooks are the results of record)\n\n"
                                   + "\n".join(f"- {n}" for n in notes) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
