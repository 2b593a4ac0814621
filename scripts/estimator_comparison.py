"""02's estimator comparison on any preset without rerunning all of 02: how far the authors' streaming
estimator's labels (`wifv_variant="flap"`) are from the default's, per label, beside the eos token alone
and FLAP on its samples in reverse order (`stage_classify.estimator_comparison`, with the preset's 02
parameters, `notebooks/params/<preset>.yaml`). Cached like 02's steps (calibration first, if missing).

Usage: python scripts/estimator_comparison.py --preset smollm2-135m [--out results/smollm2-135m/estimators.csv]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ssah_utils import stage_classify as sc  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="CSV of the per-comparison table (default: results/<preset>/estimators.csv)")
    a = ap.parse_args(argv)
    cfg = sc.notebook_config(a.preset, None, a.seed)
    t0 = time.perf_counter()
    comp = sc.estimator_comparison(cfg)
    table = sc.estimator_table(comp)
    out = Path(a.out or ROOT / "results" / a.preset / "estimators.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    table.round(4).to_csv(out)
    comp["jaccard"].round(4).to_csv(out.with_name(out.stem + "_per_draw.csv"), index=False)
    print(table.round(3).to_string())
    print(f"{len(cfg.calib.seeds)} draws of {cfg.calib.n_calib} pairs; {time.perf_counter() - t0:.0f} s "
          f"(FLAP's batch-of-one scoring {comp['seconds']:.0f} s); wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
