"""04's alignment-budget experiment (paper Table 4) on a second real family: google/gemma-3-270m, the pre-trained base.

The paper aligns a pre-trained base (LLaMA-7B) with Alpaca SFT, once training every parameter and once
training only the base's redundant units (the 20% of unit parameters with the lowest utility score), and
reads the alignment tax off the utility benchmarks. This script runs that protocol through
`ssah_utils.stage_budget` (the code of notebook 04, every step cached and resumable) on Gemma-3-270M at
CPU-sized counts: the base's RU from its own WIFV utility score (Alpaca calibration, raw text), Alpaca SFT
in the raw instruction format (Stanford Alpaca's lr 2e-5, cosine, 3% warmup, no weight decay; one epoch of
`--n-train` records in batches of 8 instead of 3 epochs of 52k in batches of 128), conditions full /
ru_only / random_only (a random mask with RU's composition: the control) with `--n-seeds` training
seeds each, and every model measured on WikiText-2 perplexity, held-out Alpaca answer NLL, GSM8K (final
number), AdvBench, four jailbreak framings and XSTest's safe prompts (greedy, the project's judge).
Gemma-3-270M has no chat template, so there is no aligned reference model: the base is the only baseline.

Writes results/gemma3-270m/budget.md (+ budget_runs.csv, budget_summary.csv, budget_masks.csv,
budget_transfer.csv). The model comes from the package index (`ssah_utils.real_models.convert_gemma3`: five
packages, Gemma terms of use, kept in the git-ignored data/external/); the shared datasets from
$SSAH_DATA_ROOT. One thread by default; about an hour on one core of a 2-core machine with the defaults.

Usage: python scripts/gemma3_budget.py [--threads 1] [--n-seeds 2] [--n-train 96] [--n-eval 16] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from ssah_utils import real_models  # noqa: E402
from ssah_utils import stage_budget as sb  # noqa: E402

METRICS = ("ppl", "alpaca_nll", "utility", "asr", "refusal", "jailbreak_asr", "over_refusal", "degenerate")  # evaluation.METRICS


def _pm(s: pd.DataFrame, cond: str, m: str, nd: int = 2) -> str:
    if cond not in s.index or m not in s.columns:
        return "-"
    mean, sd, n = float(s.loc[cond, m]), float(s.loc[cond, f"{m}_sd"]), int(s.loc[cond, "n"])
    return f"{mean:.{nd}f}" if n < 2 else f"{mean:.{nd}f} ± {sd:.{nd}f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-seeds", type=int, default=2, help="training seeds per condition")
    ap.add_argument("--n-train", type=int, default=96, help="Alpaca training records (a seeded sample)")
    ap.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step")
    ap.add_argument("--n-calib", type=int, default=32, help="Alpaca calibration pairs of the utility score")
    ap.add_argument("--n-eval", type=int, default=16, help="prompts per evaluation set")
    ap.add_argument("--conditions", default="full,ru_only,random_only")
    ap.add_argument("--out", default=str(ROOT / "results" / "gemma3-270m"))
    ap.add_argument("--no-transfer", action="store_true",
                    help="skip Fig 6 (relabelling the seed-0 full and RU-only runs with 02's calibration: its "
                         "generation of the calibration answers on Gemma took over 15 min a run here)")
    a = ap.parse_args(argv)
    for name in ("threads", "n_seeds", "n_train", "batch_size", "n_calib", "n_eval"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()

    folder = real_models.convert_gemma3()
    cfg = sb.make_config("smollm2-135m", model=str(folder), alignment="instruct", n_seeds=a.n_seeds,
                         conditions=a.conditions, n_calib=a.n_calib, n_eval=a.n_eval, batch_size=16,
                         n_train=a.n_train, epochs="1")
    st = cfg.stages[0]
    # CPU-sized: batches of 8 (micro-batches of 4) and 256 tokens instead of 128 and 512; the rest is Alpaca's.
    st = dataclasses.replace(st, train=dataclasses.replace(st.train, batch_size=a.batch_size,
                                                           micro_batch_size=min(4, a.batch_size), max_length=256))
    cfg = dataclasses.replace(cfg, stages=(st,))
    if cfg.reference:
        raise RuntimeError("expected no aligned reference for a base given alone")
    print(f"[gemma3] config: {cfg.stages[0]}", flush=True)

    masks = sb.mask_table(cfg)
    print(masks.round(2).to_string(), flush=True)
    # Train and evaluate each run first, dropping the in-process memo after each: it keeps every run's weights
    # (1 GB each here) and the first attempt of this script ran out of memory (24 GB) on the fourth run.
    for cond in cfg.conditions:
        for s in cfg.seeds:
            sb.train_run(cfg, cond, s)
            sb.evaluate_run(cfg, cond, s)
            sb.clear_memo()
    t4 = sb.table4(cfg)
    runs, summary = t4["runs"], t4["summary"]
    base = runs[runs["condition"] == "base"].iloc[0]
    runs["ppl_rise_pct"] = 100 * (runs["ppl"] / float(base["ppl"]) - 1)
    runs["alpaca_nll_change"] = runs["alpaca_nll"] - float(base["alpaca_nll"])
    summary = sb.summarize(runs)
    tr = None if a.no_transfer else sb.transfer(cfg, afters=("full", "ru_only"))
    wall = time.perf_counter() - t_start

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    runs.to_csv(out / "budget_runs.csv", index=False, float_format="%.5g")
    summary.to_csv(out / "budget_summary.csv", float_format="%.5g")
    masks.to_csv(out / "budget_masks.csv", float_format="%.5g")
    tt = sb.transfer_table(tr) if tr is not None else None
    if tt is not None:
        tt.to_csv(out / "budget_transfer.csv", float_format="%.4g")

    tc = cfg.stages[0].train
    conds = [c for c in summary.index if c != "base"]
    lines = [
        "# Gemma-3-270M (pre-trained base): 04's alignment budget (paper Table 4) on this CPU", "",
        f"Written by `python scripts/gemma3_budget.py --threads {a.threads} --n-seeds {a.n_seeds} --n-train {a.n_train} "
        f"--batch-size {a.batch_size} --n-calib {a.n_calib} --n-eval {a.n_eval} --conditions {a.conditions}"
        f"{' --no-transfer' if a.no_transfer else ''}` ({a.threads} thread(s), float32). Every step is cached by "
        f"`ssah_utils.stage_budget`: this invocation took {wall / 60:.0f} min and peaked at "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.1f} GB resident, reading what earlier "
        "invocations computed; each run's training seconds are in the tables (an evaluation took 130-230 s more).", "",
        f"Protocol: the base's redundant units are the {100 * cfg.ru_frac:.0f}% of unit parameters with the lowest "
        f"WIFV utility score ({cfg.wifv_variant} standardisation, {a.n_calib} Alpaca calibration answers, raw text). "
        f"Alpaca SFT in the raw instruction format: {a.n_train} records, {tc.epochs:g} epoch, batch {tc.batch_size} "
        f"(micro-batches of {tc.micro_batch_size}), {tc.max_length} tokens, lr {tc.lr:g}, {tc.schedule} with "
        f"{100 * tc.warmup_frac:.0f}% warmup, weight decay {tc.weight_decay:g}, grad clip {tc.grad_clip:g}. "
        "`full` trains every parameter; `ru_only` only the RU's entries (embeddings, norms and lm_head frozen, as the "
        "paper); `random_only` a random mask with RU's number of MLP channels and heads (the control; a new mask per "
        f"seed). Training seeds {list(cfg.seeds)}. Evaluation ({a.n_eval} prompts per set, the same for every model, "
        f"greedy, {cfg.eval.max_new_tokens} new tokens, raw format): WikiText-2 perplexity over "
        f"{cfg.eval.wikitext_windows} windows of 512 tokens (`ppl`), NLL of {cfg.eval.n_nll} held-out Alpaca answers "
        "(`alpaca_nll`, nats per token), GSM8K final-number exact match (`utility`), AdvBench answered / refused "
        "(`asr` / `refusal`), four jailbreak framings answered (`jailbreak_asr`), XSTest safe prompts refused "
        "(`over_refusal`). Gemma-3-270M has no chat template and no aligned sibling here: the base is the baseline.", "",
        "## Masks", "", masks.round(2).to_markdown(), "",
        "## Results (mean ± sd over training seeds)", "",
        "| condition | n | % unit params trained | WikiText-2 ppl | ppl rise vs base (%) | Alpaca NLL | NLL change | "
        "GSM8K (%) | harmful (%) | refusal (%) | jailbreak (%) | XSTest refused (%) | degenerate (%) | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in summary.index:
        lines.append(f"| {c} | {int(summary.loc[c, 'n'])} | {_pm(summary, c, 'trained_unit_params_pct', 1)} | "
                     f"{_pm(summary, c, 'ppl', 1)} | {_pm(summary, c, 'ppl_rise_pct', 1)} | {_pm(summary, c, 'alpaca_nll', 3)} | "
                     f"{_pm(summary, c, 'alpaca_nll_change', 3)} | {_pm(summary, c, 'utility', 1)} | "
                     f"{_pm(summary, c, 'asr', 1)} | {_pm(summary, c, 'refusal', 1)} | {_pm(summary, c, 'jailbreak_asr', 1)} | "
                     f"{_pm(summary, c, 'over_refusal', 1)} | {_pm(summary, c, 'degenerate', 1)} | "
                     f"{'-' if c == 'base' else _pm(summary, c, 'train_seconds', 0)} |")
    lines += ["", "Entries changed outside the trained mask (must be 0): "
              + ", ".join(f"{c} {int(runs.loc[runs['condition'] == c, 'moved_outside_mask'].max())}" for c in conds) + ".", "",
              "## What the base's labels become (Fig 6 analogue; seed-0 runs relabelled with 02's calibration)", "",
              tt.round(1).to_markdown() if tt is not None else "Not run (`--no-transfer`): relabelling a trained "
              "Gemma with 02's calibration first generates its answers to the calibration requests, which took over "
              "15 minutes for the first run here.", "", "## Per run", "",
              runs[["condition", "seed", *[m for m in METRICS if m in runs], "ppl_rise_pct", "alpaca_nll_change",
                    "final_loss", "train_seconds"]].round(3).to_markdown(index=False), ""]
    (out / "budget.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
