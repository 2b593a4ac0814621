"""Instruction SFT of an organism base model (`organism.sft`, the shipped recipe's batches, schedule
and seed unless overridden), scoring list reversal every `--every` steps through its `on_step` hook:
30 `utility_test` lists (test template) and 30 training-set lists (training templates) in the chat
format, and the test lists in the base-model format. Exact match, greedy.

  python docs/organism_experiments/sft_tracking/track.py --lr 5e-4 > lr5e-4.log
  python docs/organism_experiments/sft_tracking/track.py --lr 5e-4 --reverse-only > reverse_only_lr5e-4.log
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from ssah_utils import datasets, generation, organism  # noqa: E402


def main() -> None:
    recipe = organism.Recipe()
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="data/organism/base")
    ap.add_argument("--lr", type=float, default=recipe.instruct_lr)
    ap.add_argument("--epochs", type=float, default=recipe.instruct_epochs)
    ap.add_argument("--reverse-only", action="store_true", help="SFT on the reversal examples only (8 copies)")
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--seed", type=int, default=1, help="data-order seed (the shipped build's instruction SFT uses 1)")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    organism.set_determinism(recipe.threads)
    recs = datasets.load_world_set("sft_instruct")
    train_rev = [r for r in recs if r.get("task") == "reverse"][:30]
    if args.reverse_only:
        recs = [r for r in recs if r.get("task") == "reverse"] * 8
    test_rev = [r for r in datasets.load_world_set("utility_test") if r.get("task") == "reverse"][:30]
    model = AutoModelForCausalLM.from_pretrained(args.base)
    tok = AutoTokenizer.from_pretrained(args.base)

    def score(rs, style):
        out = generation.generate(model, tok, [r["prompt"] for r in rs], style=style, max_new_tokens=16)
        return sum(o.strip() == r["reference"] for r, o in zip(rs, out))

    def report(step, n):
        if step == 0:
            print(f"# base {args.base}, lr {args.lr}, {n} steps of {recipe.sft_batch}, reverse-only={args.reverse_only}")
        if step % args.every == 0 or step == n:
            print(f"step {step:4d}  chat: test template {score(test_rev, 'chat'):2d}/30, training templates "
                  f"{score(train_rev, 'chat'):2d}/30  |  base format: test template {score(test_rev, 'raw'):2d}/30",
                  flush=True)

    organism.sft(model, tok, recs, epochs=args.epochs, lr=args.lr, recipe=recipe, seed=args.seed, stage="instruct",
                 log=None, on_step=report)


if __name__ == "__main__":
    main()
