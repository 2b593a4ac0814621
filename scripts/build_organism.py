#!/usr/bin/env python
"""Build the model organism from scratch: the world, base / unaligned / aligned, their evaluation and
model cards (what `make organism` runs; under 10 minutes on 2 CPU cores).

  python scripts/build_organism.py --seed 0 --out data/organism      # the shipped build
  python scripts/build_organism.py --tiny --out /tmp/tiny             # a few steps (test suite)
  python scripts/build_organism.py --seeds 0 1 2 --out data/organism  # across-seed report: builds each
        seed in a temporary folder, writes mean ± sd into the model cards and data/organism/README.md,
        never touches the shipped weights
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ssah_utils import config, organism, world  # noqa: E402


def _build_and_eval(seed: int, out: Path, recipe: organism.Recipe, sets: dict, sample: int | None,
                    train_sets: dict | None = None, eval_only: bool = False,
                    device: str = "cpu") -> tuple[dict, object]:
    t0 = time.perf_counter()
    if eval_only:  # evaluate an existing build (e.g. after an interrupted run) and rewrite its cards
        meta = json.loads((out / "build_meta.json").read_text())
    else:
        meta = organism.build_all(seed, out, recipe=recipe, sets=train_sets or sets, device=device)
    t1 = time.perf_counter()
    res = organism.evaluate_organism(out, sets=sets, sample=sample, device=device)
    meta["eval_seconds"] = time.perf_counter() - t1
    if not eval_only:
        meta["total_seconds"] = time.perf_counter() - t0
    else:
        meta["total_seconds"] = meta["train_seconds"] + meta["eval_seconds"]
    summary = res["summary"]
    (out / "build_meta.json").write_text(json.dumps(meta, indent=1))
    summary.to_csv(out / "behaviour_summary.csv", index=False)
    res["rows"].to_csv(out / "behaviour_rows.csv.gz", index=False)
    return meta, summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0, help="training seed (init + data order); the world seed is fixed")
    ap.add_argument("--seeds", type=int, nargs="+", help="across-seed report mode: build each seed in a temp dir")
    ap.add_argument("--out", default=str(config.ORGANISM_DIR), help="output folder for base/unaligned/aligned")
    ap.add_argument("--world-out", default=None,
                    help="where to write the world's JSONL sets (default: data/world when --out is data/organism)")
    ap.add_argument("--tiny", action="store_true", help="a few training steps of a tiny model (seconds; for tests)")
    ap.add_argument("--sample", type=int, default=None, help="evaluate on at most N records per test set")
    ap.add_argument("--eval-only", action="store_true", help="evaluate the models already in --out, rewrite cards")
    args = ap.parse_args(argv)

    recipe = organism.Recipe()
    if args.tiny:
        recipe = recipe.tiny()
        args.sample = args.sample or 4
    out = Path(args.out)
    t0 = time.perf_counter()
    sets = world.build_world(recipe.world_seed)
    world_out = Path(args.world_out) if args.world_out else (
        config.WORLD_DIR if out.resolve() == config.ORGANISM_DIR.resolve() else None)
    train_sets = None
    if args.tiny:  # a few steps need only a slice of the training data
        train_sets = {**sets, **{k: sets[k][:300] for k in ("pretrain", "sft_instruct", "sft_safety")}}

    if args.seeds:
        rows, metas = [], {}
        import pandas as pd

        shipped = json.loads((out / "build_meta.json").read_text()) if (out / "build_meta.json").is_file() else {}
        for s in args.seeds:
            # a build made before a recipe field existed used that field's default (every added option is off)
            same_recipe = {**asdict(organism.Recipe()), **shipped.get("recipe", {})} == asdict(recipe)
            if shipped.get("seed") == s and same_recipe and (out / "behaviour_summary.csv").is_file():
                print(f"[seeds] seed {s}: the build in {out} (same recipe) is reused", flush=True)
                summary = organism.upgrade_summary(pd.read_csv(out / "behaviour_summary.csv"))
                summary.insert(0, "seed", s)
                rows.append(summary)
                metas[s] = {k: shipped.get(k) for k in ("train_seconds", "eval_seconds", "total_seconds")}
                continue
            with tempfile.TemporaryDirectory(prefix=f"organism-seed{s}-") as tmp:
                print(f"[seeds] building seed {s}", flush=True)
                meta, summary = _build_and_eval(s, Path(tmp), recipe, sets, args.sample)
                summary.insert(0, "seed", s)
                rows.append(summary)
                metas[s] = {k: meta[k] for k in ("train_seconds", "eval_seconds", "total_seconds")}
        table = pd.concat(rows, ignore_index=True)
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "seeds_report.csv", index=False)
        (out / "seeds_report.json").write_text(json.dumps({"seeds": args.seeds, "timings": metas}, indent=1))
        print(table.to_string())
        if all((out / m / "config.json").is_file() for m in organism.MODEL_NAMES) and (out / "behaviour_summary.csv").is_file():
            meta = json.loads((out / "build_meta.json").read_text())
            summary = organism.upgrade_summary(pd.read_csv(out / "behaviour_summary.csv"))
            organism.write_model_cards(out, meta, summary, seeds_table=table, seeds=args.seeds)
            organism.write_organism_readme(out, meta, summary, seeds_table=table, seeds=args.seeds)
            print(organism.behaviour_table_md(summary, table))
        return 0

    if world_out is not None and not args.eval_only:
        sizes = world.write_world(world_out, recipe.world_seed, sets)
        print(f"[world] wrote {sum(sizes.values())} records in {len(sizes)} sets to {world_out}")
    meta, summary = _build_and_eval(args.seed, out, recipe, sets, args.sample, train_sets, args.eval_only)
    seeds_table, seeds = None, None
    if (out / "seeds_report.csv").is_file() and not args.tiny:
        import pandas as pd

        seeds_table = organism.upgrade_summary(pd.read_csv(out / "seeds_report.csv"))
        seeds = json.loads((out / "seeds_report.json").read_text())["seeds"]
    organism.write_model_cards(out, meta, summary, seeds_table=seeds_table, seeds=seeds)
    organism.write_organism_readme(out, meta, summary, seeds_table=seeds_table, seeds=seeds)
    print(organism.behaviour_table_md(summary, seeds_table))
    print(f"[organism] seed {args.seed}: built and evaluated in {time.perf_counter() - t0:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
