"""Benchmark of unit-masked fine-tuning (ssah_utils.training.finetune), run by `make bench`.

What exact freezing costs: the same SFT steps with every parameter trainable (`full`), with 80% of the
unit parameters frozen (03's setting ii: grads zeroed and frozen entries written back after every AdamW
step) and with only 20% of them trainable (04's RU budget). Prints seconds per optimizer step and the
ratio to `full`, on the same records, batch and seed; and checks that the frozen entries did not move.
Then the model in bfloat16, with float32 master weights (`TrainConfig.master_weights="auto"`, what a
real 7B run uses) and without: seconds per step and the memory the master copies add.

Model: a random Llama (4 layers, d 256, GQA 8/4) with the organism's tokenizer and instruction data, so
the cost of the masks is not hidden by a tiny model. Usage: python bench/bench_training.py [--steps N] [--threads N]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ssah_utils import config, datasets, training  # noqa: E402
from ssah_utils.models import UnitMask  # noqa: E402


def _model(vocab: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                               num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    return AutoModelForCausalLM.from_config(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per condition")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(config.ORGANISM_DIR / "aligned")
    records = datasets.load_world_set("sft_instruct")[: args.steps * args.batch]
    cfg = training.TrainConfig(epochs=1.0, lr=1e-4, batch_size=args.batch, weight_decay=0.1, seed=0)
    ref = _model(len(tok))
    frozen = UnitMask.random(ref, n_params=0.8 * UnitMask.full(ref).n_params, seed=1)
    budget = UnitMask.random(ref, n_params=0.2 * UnitMask.full(ref).n_params, seed=2)
    rows = []
    conditions = (("full", {}, torch.float32, "auto"), ("freeze 80% of units", {"freeze": frozen}, torch.float32, "auto"),
                  ("train only 20% of units", {"train_only": budget}, torch.float32, "auto"),
                  ("bf16, master weights", {}, torch.bfloat16, "auto"), ("bf16, no master weights", {}, torch.bfloat16, "off"))
    for name, kw, dtype, mw in conditions:
        model = _model(len(tok)).to(dtype)
        before = training.snapshot(model)
        out = training.finetune(model, tok, records, dataclasses.replace(cfg, master_weights=mw), **kw)
        moved = 0
        if "freeze" in kw:
            moved = int(training.verify_frozen(before, model, kw["freeze"])["changed"].sum())
        master_mb = 4 * out["trainable_params"] / 2**20 if out["master_weights"] else 0.0
        rows.append((name, out["steps"], out["seconds"] / out["steps"], out["trainable_params"], out["frozen_params"], moved,
                     master_mb))
    base = rows[0][2]
    print(f"random llama d256 x4 layers, batch {args.batch}, {args.threads} thread(s), AdamW weight decay 0.1")
    print(f"{'condition':26s} {'steps':>5s} {'s/step':>8s} {'x full':>7s} {'trainable':>10s} {'frozen':>10s} "
          f"{'frozen moved':>12s} {'master MB':>9s}")
    for name, steps, sps, tr, fr, moved, mb in rows:
        print(f"{name:26s} {steps:5d} {sps:8.3f} {sps / base:7.2f} {tr:10,d} {fr:10,d} {moved:12d} {mb:9.1f}")


if __name__ == "__main__":
    main()
