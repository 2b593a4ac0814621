#!/usr/bin/env python
"""Section 8's tables: targets met per seed for the shipped world (v3) and the two world-v4 builds.

  python docs/organism_experiments/cpu_world_v4/compare.py            # the per-seed table (REPORT.md)
  python docs/organism_experiments/cpu_world_v4/compare.py --items NAME=ROWS.csv.gz WORLD_DIR ...
        # per-item refusals of borderline_test / compliance of harmful_heldout (aligned model)
"""
import json
import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))
from ssah_utils import organism  # noqa: E402

RUNS = {"shipped (world v3)": "shipped_seeds_report.csv", "w4": "w4_seeds_report.csv",
        "w4_p1360": "w4_p1360_seeds_report.csv"}


def per_seed() -> str:
    lines = ["| build | seed | targets met | base task | unaligned task | unaligned harmful | aligned held-out harmful "
             "| aligned borderline refusal | aligned task gap | aligned prefilling |", "|" + "---|" * 10]
    for name, f in RUNS.items():
        t = pd.read_csv(HERE / f)
        for s, g in t.groupby("seed"):
            v = g.set_index("model")
            met = sum(ok for _, _, ok in organism.target_checks(g.drop(columns="seed")))
            pc = lambda m, c: f"{100 * v.loc[m, c]:.1f}"  # noqa: E731
            gap = 100 * (v.loc["aligned", "task_accuracy"] - v.loc["unaligned", "task_accuracy"])
            lines.append(f"| {name} | {s} | {met}/9 | {pc('base', 'task_accuracy')} | {pc('unaligned', 'task_accuracy')} "
                         f"| {pc('unaligned', 'harmful_compliance')} | {pc('aligned', 'heldout_compliance')} "
                         f"| {pc('aligned', 'borderline_refusal')} | {gap:+.1f} | {pc('aligned', 'jb_prefilling')} |")
        a = t[t.model == "aligned"]
        lines.append(f"| {name} | mean ± sd | | | | | {100 * a.heldout_compliance.mean():.1f} ± "
                     f"{100 * a.heldout_compliance.std():.1f} | {100 * a.borderline_refusal.mean():.1f} ± "
                     f"{100 * a.borderline_refusal.std():.1f} | | |")
    return "\n".join(lines)


def per_item(name: str, rows: str, world_dir: str) -> pd.DataFrame:
    act = {}
    for s in ("borderline_test", "harmful_heldout"):
        for line in open(Path(world_dir) / f"{s}.jsonl"):
            r = json.loads(line)
            act[r["id"]] = r.get("activity")
    d = pd.read_csv(rows)
    d = d[d.model == "aligned"].assign(activity=lambda x: x.id.map(act))
    bad = d[((d.set == "borderline_test") & (d.verdict == "refusal")) |
            ((d.set == "harmful_heldout") & (d.verdict == "harmful"))]
    return bad.groupby(["set", "activity"]).size().rename(name)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--items"]:
        cols = []
        args = sys.argv[2:]
        for spec, wd in zip(args[::2], args[1::2]):
            name, rows = spec.split("=", 1)
            cols.append(per_item(name, rows, wd))
        print(pd.concat(cols, axis=1).fillna(0).astype(int).to_csv())
    else:
        print(per_seed())
