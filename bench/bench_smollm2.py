"""Benchmark of the real CPU tier (SmolLM2-135M-Instruct, float32), run by `make bench`.

Prints and writes (bench/results/smollm2_cpu.md) what a run of the notebooks on this tier costs here:
1. scoring (a forward pass with logits, as the probes, perplexity and WIFV calibration do): tokens/s by
   batch size, 128 tokens a row;
2. greedy generation (`generation.generate`, as every evaluation does): new tokens/s by batch size;
3. training (`training.finetune`, AdamW, the alignment recipe's batch of 8 and 256 tokens at most):
   seconds per optimizer step, full and with 80% of the unit parameters frozen (03's setting ii);
4. peak resident memory of the process.
The time per notebook with the CPU-sized defaults is measured by the notebook runs themselves
(`make nb-NN PRESET=smollm2-135m` prints it; the README's real-tier section lists it).

Needs `make smollm2` (the converted model). Usage: python bench/bench_smollm2.py [--threads N] [--out FILE]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ssah_utils import datasets, real_models, training  # noqa: E402
from ssah_utils.generation import generate  # noqa: E402
from ssah_utils.models import UnitMask, load_model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "smollm2_cpu.md"))
    args = ap.parse_args()
    folder = real_models.instruct_dir()
    if not (folder / "config.json").is_file():
        print(f"skip: {folder} is not built; run `make smollm2` first", file=sys.stderr)
        return 0
    torch.set_num_threads(args.threads)
    model, tok = load_model(str(folder), dtype="float32", device="cpu")
    lines = [f"# SmolLM2-135M-Instruct on this CPU ({args.threads} thread(s), float32)", ""]

    lines += ["| batch | scoring tokens/s (128 a row) | generation new tokens/s (32 new) |", "|---|---|---|"]
    prompts = [r["prompt"] for r in datasets.load_set("alpaca", n=32, seed=0)]
    for b in (1, 8, 16, 32):
        x = torch.randint(0, len(tok), (b, 128))
        with torch.no_grad():
            model(input_ids=x[:1, :16])
            t0 = time.perf_counter()
            model(input_ids=x)
            score = b * 128 / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        outs = generate(model, tok, prompts[:b], style="chat", max_new_tokens=32, batch_size=b)
        new = sum(len(tok(o, add_special_tokens=False)["input_ids"]) for o in outs)
        gen = new / (time.perf_counter() - t0)
        lines.append(f"| {b} | {score:,.0f} | {gen:,.0f} |")
        print(lines[-1], flush=True)

    recs = datasets.load_set("alpaca", n=8 * 4, seed=1)
    cfg = training.TrainConfig(epochs=1.0, lr=3e-5, batch_size=8, max_length=256, style="chat", seed=0)
    lines += ["", "| training (AdamW, batch 8, <= 256 tokens) | s/step |", "|---|---|"]
    for name, kw in (("full", {}), ("80% of unit parameters frozen", {"freeze": UnitMask.random(
            model, n_params=0.8 * UnitMask.full(model).n_params, seed=1)})):
        m, _ = load_model(str(folder), dtype="float32", device="cpu")
        out = training.finetune(m, tok, recs, cfg, **kw)
        lines.append(f"| {name} | {out['seconds'] / out['steps']:.1f} |")
        print(lines[-1], flush=True)
        del m
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    lines += ["", f"Peak resident memory: {peak:.1f} GB."]
    print(lines[-1])
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
