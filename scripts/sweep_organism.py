#!/usr/bin/env python
"""Recipe experiments for the model organism: build and evaluate variants of `organism.Recipe`,
one row of behaviour per (variant, seed, model), in parallel processes.

  python scripts/sweep_organism.py --out runs/sweep --device cuda --jobs 6 --seeds 0 1 \\
      --variant shipped --variant replay8:instruct_replay=8,safety_replay=8
  python scripts/sweep_organism.py --out runs/safety --reuse data/organism --seeds 0 \\
      --variant shipped --variant se5:safety_epochs=5.0     # only the safety SFT redone (about a minute each)
  python scripts/sweep_organism.py --out runs/sft --reuse data/organism --redo sft --seeds 0 \\
      --variant shipped --variant lo:instruct_lr=2e-4       # both SFT stages redone on the kept base
  python scripts/sweep_organism.py --out runs/sweep --report  # OUT/REPORT.md: mean ± sd per variant

A variant is `name` (the shipped recipe) or `name:field=value,field=value` (fields of
`organism.Recipe`). Weights are written to a temporary folder and dropped; what stays is
`OUT/sweep.csv` (all rows) and `OUT/<variant>-s<seed>/behaviour_summary.csv`, `behaviour_rows.csv.gz`
(every response and verdict) + `build_meta.json`.
Numbers from `--device cuda` differ from a CPU build in the last bits of the weights: use the sweep
to choose a recipe, then rebuild on CPU (`make organism`) and report the CPU build.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import fields, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ssah_utils import organism, world  # noqa: E402


def parse_variant(spec: str) -> tuple[str, dict]:
    """`name:field=value,...` -> (name, {field: typed value}); unknown fields are an error."""
    name, _, rest = spec.partition(":")
    types = {f.name: type(getattr(organism.Recipe(), f.name)) for f in fields(organism.Recipe)}
    over: dict = {}
    for item in filter(None, rest.split(",")):
        key, eq, val = item.partition("=")
        if not eq or key not in types:
            raise SystemExit(f"bad override {item!r} in variant {spec!r}; fields of Recipe: {', '.join(types)}")
        over[key] = types[key](val)
    if not name:
        raise SystemExit(f"variant {spec!r} needs a name before ':'")
    return name, over


def _reuse(tmp: Path, reuse: Path, recipe, seed: int, sets: dict, device: str, redo: str = "safety") -> dict:
    """Models copied from an existing build, the later stages redone with `recipe`: `redo="safety"` keeps
    base and unaligned and redoes the safety SFT; `redo="sft"` keeps only the base and redoes both SFTs."""
    import shutil
    from dataclasses import asdict

    from transformers import AutoModelForCausalLM, AutoTokenizer

    kept = ("base", "unaligned") if redo == "safety" else ("base",)
    for m in kept:
        shutil.copytree(reuse / m, tmp / m)
    organism.set_determinism(recipe.threads, warn_only=not device.startswith("cpu"))
    meta = {"seed": seed, "recipe": asdict(recipe), "reused": {m: str(reuse / m) for m in kept}}
    if redo == "sft":
        tok = AutoTokenizer.from_pretrained(tmp / "base")
        model = AutoModelForCausalLM.from_pretrained(tmp / "base").to(device)
        meta["unaligned"] = organism.instruct_sft(model, tok, sets, recipe, seed, log=None)
        organism.save_model(model, tok, tmp / "unaligned")
    tok = AutoTokenizer.from_pretrained(tmp / "unaligned")
    model = AutoModelForCausalLM.from_pretrained(tmp / "unaligned").to(device)
    meta["aligned"] = organism.safety_sft(model, tok, sets, recipe, seed, log=None)
    organism.save_model(model, tok, tmp / "aligned")
    return meta


def run_one(spec: str, seed: int, out: Path, device: str, reuse: Path | None = None, redo: str = "safety") -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    name, over = parse_variant(spec)
    recipe = replace(organism.Recipe(), **over)
    sets = world.build_world(recipe.world_seed)
    dest = out / f"{name}-s{seed}"
    dest.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"sweep-{name}-") as tmp:
        meta = (_reuse(Path(tmp), reuse, recipe, seed, sets, device, redo) if reuse else
                organism.build_all(seed, tmp, recipe=recipe, sets=sets, device=device, log=None))
        res = organism.evaluate_organism(tmp, sets=sets, device=device, log=None)
    meta["total_seconds"] = time.perf_counter() - t0
    summary = res["summary"]
    summary.insert(0, "seed", seed)
    summary.insert(0, "variant", name)
    summary["spec"] = spec
    summary.to_csv(dest / "behaviour_summary.csv", index=False)
    res["per_framing"].to_csv(dest / "per_framing.csv", index=False)
    # per-task accuracy: where the utility number comes from
    rows = res["rows"]
    rows.to_csv(dest / "behaviour_rows.csv.gz", index=False)  # every response and verdict
    ut = rows[rows["set"] == "utility_test"]
    ut.groupby(["model", "task"])["verdict"].apply(lambda v: (v == "correct").mean()).unstack(0).to_csv(
        dest / "per_task.csv")
    (dest / "build_meta.json").write_text(json.dumps({**meta, "variant": spec}, indent=1))
    print(f"[sweep] {name} seed {seed}: {meta['total_seconds']:.0f} s", flush=True)


def collect(out: Path):
    """Gather every finished build under `out` into `sweep.csv` and `per_task_all.csv` (rewritten after
    each build, so an interrupted sweep keeps what it finished)."""
    import pandas as pd

    parts = [organism.upgrade_summary(pd.read_csv(f)) for f in sorted(out.glob("*/behaviour_summary.csv"))]
    if not parts:
        return None
    table = pd.concat(parts, ignore_index=True)
    table.to_csv(out / "sweep.csv", index=False)
    tasks = []
    for f in sorted(out.glob("*/per_task.csv")):
        name, _, seed = f.parent.name.rpartition("-s")
        tasks.append(pd.read_csv(f).assign(variant=name, seed=int(seed)))
    if tasks:
        pd.concat(tasks, ignore_index=True).to_csv(out / "per_task_all.csv", index=False)
    return table


REPORT_COLS = [("unaligned", "utility", "unaligned task acc."),
               ("unaligned", "asr", "unaligned harmful compl."),
               ("aligned", "asr", "aligned harmful compl. (plain)"),
               ("aligned", "heldout_asr", "aligned harmful compl. (held-out)"),
               ("aligned", "over_refusal", "aligned borderline refusal"),
               ("aligned", "utility", "aligned task acc."),
               ("aligned", "jailbreak_asr_prefilling", "aligned prefilling compl.")]


def report_md(out: Path) -> str:
    """Markdown: mean ± sd over seeds per variant for the issue-3 metrics, the recipe of each variant,
    and list reversal (the fragile task) per seed."""
    import pandas as pd

    t = organism.upgrade_summary(pd.read_csv(out / "sweep.csv"))  # sweeps of any age, in the suite's vocabulary
    specs = dict(zip(t["variant"], t["spec"])) if "spec" in t.columns else {}
    for f in out.glob("*/build_meta.json"):  # sweeps written before the spec column
        spec = json.loads(f.read_text()).get("variant", "")
        specs.setdefault(spec.partition(":")[0], spec)
    lines = ["| variant | seeds | " + " | ".join(c[2] for c in REPORT_COLS) + " |",
             "|---|---|" + "---|" * len(REPORT_COLS)]
    for v, g in t.groupby("variant", sort=False):
        cells = []
        for model, col, _ in REPORT_COLS:
            x = g[g["model"] == model][col]
            cells.append(f"{x.mean():.1f} ± {x.std(ddof=1):.1f}" if len(x) > 1 else f"{x.mean():.1f}")
        lines.append(f"| {v} | {g['seed'].nunique()} | " + " | ".join(cells) + " |")
    lines += ["", "Variants (overrides of `organism.Recipe`):", ""]
    lines += [f"- `{v}`: {specs.get(v) or v}" for v in t["variant"].unique()]
    pt = out / "per_task_all.csv"
    if pt.is_file():
        r = pd.read_csv(pt)
        r = r[r["task"] == "reverse"].pivot_table(index="variant", columns="seed", values="unaligned")
        lines += ["", "List reversal accuracy of the unaligned model, per seed:", "",
                  "| variant | " + " | ".join(f"seed {c}" for c in r.columns) + " |", "|---|" + "---|" * len(r.columns)]
        lines += [f"| {v} | " + " | ".join("" if x != x else f"{100 * x:.0f}%" for x in row) + " |"
                  for v, row in r.iterrows()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", help="name or name:field=value,...")
    ap.add_argument("--report", action="store_true", help="only write OUT/REPORT.md from the finished builds in OUT")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", default="runs/sweep")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--jobs", type=int, default=1, help="variant builds run at once (separate processes)")
    ap.add_argument("--reuse", default=None,
                    help="an organism folder (e.g. data/organism) whose models are kept and whose later stages are "
                         "redone (see --redo; about a minute each; the seed must be the one that folder was built with)")
    ap.add_argument("--redo", choices=("safety", "sft"), default="safety",
                    help="with --reuse: 'safety' keeps base and unaligned (default), 'sft' keeps only the base and "
                         "redoes instruction and safety SFT")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # worker mode: one variant, one seed
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.redo != "safety" and not args.reuse:
        raise SystemExit(f"--redo {args.redo} redoes stages of an existing build: give that build with --reuse DIR")
    if args.reuse and not (Path(args.reuse) / "unaligned" / "config.json").is_file():
        raise SystemExit(f"--reuse {args.reuse}: no unaligned model there (expected {args.reuse}/unaligned/config.json)")
    if args.report:
        if not (out / "sweep.csv").is_file():
            raise SystemExit(f"{out}/sweep.csv not found: run the sweep into --out first")
        (out / "REPORT.md").write_text(report_md(out) + "\n")
        print((out / "REPORT.md").read_text())
        return 0
    if not args.variant:
        raise SystemExit("give at least one --variant (or --report)")
    for spec in args.variant:
        parse_variant(spec)  # fail before starting anything
    if args.one:
        run_one(args.variant[0], args.seeds[0], out, args.device, Path(args.reuse) if args.reuse else None, args.redo)
        return 0
    todo = [(v, s) for s in args.seeds for v in args.variant]
    running: list[tuple[subprocess.Popen, str]] = []
    failed = []
    while todo or running:
        while todo and len(running) < args.jobs:
            v, s = todo.pop(0)
            cmd = [sys.executable, __file__, "--one", "--variant", v, "--seeds", str(s), "--out", str(out),
                   "--device", args.device] + (["--reuse", str(Path(args.reuse).resolve()), "--redo", args.redo]
                                               if args.reuse else [])
            running.append((subprocess.Popen(cmd), f"{v} seed {s}"))
        time.sleep(1)
        for p, what in list(running):
            if p.poll() is not None:
                running.remove((p, what))
                if p.returncode:
                    failed.append(what)
                collect(out)
    table = collect(out)
    if table is not None:
        cols = ["variant", "seed", "model", "asr", "heldout_asr", "utility", "over_refusal", "benign_refusal",
                "howto_utility"]
        print(table[[c for c in cols if c in table.columns]].round(3).to_string())
    if failed:
        print("[sweep] FAILED: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
