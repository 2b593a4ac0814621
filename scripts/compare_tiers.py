"""The paper's claims side by side on the two tiers: the paper's number, SmolLM2-135M's and the
organism's, with each tier's verdict, from the scorecards that 05_figures wrote
(`tables/claims_scorecard.csv` for the organism, `results/<preset>/tables/claims_scorecard.csv` for a real
tier). Nothing is typed by hand: every cell is a scorecard cell.

Usage: python scripts/compare_tiers.py [--real smollm2-135m] [--out docs/claims_by_tier.md] [--readme README.md]
With --readme, the table also replaces what stands between the README's `<!-- claims-by-tier:start -->` and
`<!-- claims-by-tier:end -->` markers (an error if they are not there exactly once each).
Exits 2 with what to run when a scorecard is missing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- claims-by-tier:start -->", "<!-- claims-by-tier:end -->"


def _cell(text) -> str:
    s = "" if pd.isna(text) else str(text)
    return s.replace("|", "\\|").replace("\n", " ")


# Fine-tuning sets that are the same kind of data on both tiers, so their claims share a row: the
# organism's Alpaca-like world set and the real Alpaca (benign instruction data, the paper's first attack).
SAME_SET = {"ft_alpaca": "alpaca"}


def _aligned_ids(card: pd.DataFrame) -> pd.DataFrame:
    """`card` indexed by claim id, with the organism's set names replaced by their real counterparts."""
    ids = [i.split(":")[0] + ":" + SAME_SET.get(i.split(":", 1)[1], i.split(":", 1)[1]) if ":" in i else i
           for i in card["id"]]
    return card.assign(id=ids).set_index("id")


def table(organism: pd.DataFrame, real: pd.DataFrame, real_name: str) -> str:
    o = _aligned_ids(organism)
    r = real.set_index("id")
    ids = list(dict.fromkeys(list(o.index) + list(r.index)))
    lines = [f"| claim | paper | {real_name} | verdict | organism | verdict |", "|---|---|---|---|---|---|"]
    for i in ids:
        src = o if i in o.index else r
        claim = _cell(src.at[i, "claim"])
        if i in o.index and i in r.index and claim != _cell(r.at[i, "claim"]):  # a shared row of two set names
            claim = _cell(r.at[i, "claim"]) + f" (organism: {', '.join(k for k, v in SAME_SET.items() if i.endswith(':' + v))})"
        row = [f"{claim} ({_cell(src.at[i, 'source'])})", _cell(src.at[i, "paper"])]
        for side in (r, o):
            row += [_cell(side.at[i, "run"]), f"**{_cell(side.at[i, 'verdict'])}**"] if i in side.index else ["-", "-"]
        lines.append("| " + " | ".join(row) + " |")
    counts = []
    for name, side in ((real_name, r), ("organism", o)):
        v = side["verdict"].value_counts()
        counts.append(f"{name}: " + ", ".join(f"{n} {k}" for k, n in v.items()))
    return "\n".join(lines) + "\n\nVerdict counts: " + "; ".join(counts) + ".\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", default="smollm2-135m", help="the real tier's preset (its results/<preset>/ folder)")
    ap.add_argument("--out", default="docs/claims_by_tier.md", help="markdown file to write ('-' = stdout)")
    ap.add_argument("--readme", default="", help="also put the table between the claims-by-tier markers of this file")
    a = ap.parse_args(argv)
    paths = {"organism": ROOT / "tables" / "claims_scorecard.csv",
             a.real: ROOT / "results" / a.real / "tables" / "claims_scorecard.csv"}
    missing = [f"{k}: {p.relative_to(ROOT)}" for k, p in paths.items() if not p.is_file()]
    if missing:
        print("error: no scorecard for " + "; ".join(missing) + f". Run `make reproduce` (organism) and "
              f"`make reproduce PRESET={a.real}` first.", file=sys.stderr)
        return 2
    body = table(pd.read_csv(paths["organism"]), pd.read_csv(paths[a.real]), a.real)
    md = (f"# The paper's claims on the organism and on {a.real}\n\n"
          f"Written by `scripts/compare_tiers.py` from `tables/claims_scorecard.csv` and "
          f"`results/{a.real}/tables/claims_scorecard.csv` (05_figures' scorecards; rules in 05).\n\n" + body)
    if a.readme:
        readme = ROOT / a.readme
        text = readme.read_text(encoding="utf-8")
        if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
            print(f"error: {a.readme} needs the markers {START} and {END}, once each and in that order", file=sys.stderr)
            return 2
        head, rest = text.split(START)
        _, tail = rest.split(END)
        new = head + START + "\n" + body + END + tail
        tmp = readme.with_suffix(".tmp")
        tmp.write_text(new, encoding="utf-8")
        tmp.replace(readme)
        print(f"updated {a.readme}")
    if a.out == "-":
        sys.stdout.write(md)
    else:
        out = ROOT / a.out
        tmp = out.with_suffix(".tmp")
        tmp.write_text(md, encoding="utf-8")
        tmp.replace(out)
        print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
