"""Instruction SFT of an organism base model, step by step as `organism.sft` does it (same batches,
schedule, optimizer, response-only loss, system prompt on half the batches), scoring list reversal every
`--every` steps on 30 `utility_test` lists (test template) and on 30 training-set lists (training
templates), in the chat format and in the base-model format. Exact match, greedy.

  python docs/organism_experiments/sft_tracking/track.py --lr 5e-4 > lr5e-4.log
  python docs/organism_experiments/sft_tracking/track.py --lr 5e-4 --reverse-only > rev_only_lr5e-4.log
"""
import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from ssah_utils import datasets, generation, organism  # noqa: E402
from ssah_utils.config import ORGANISM_SYSTEM_PROMPT  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="data/organism/base")
    ap.add_argument("--lr", type=float, default=organism.Recipe().instruct_lr)
    ap.add_argument("--epochs", type=float, default=organism.Recipe().instruct_epochs)
    ap.add_argument("--reverse-only", action="store_true", help="SFT on the reversal examples only (8 copies)")
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--seed", type=int, default=1, help="data-order seed (the shipped build uses seed + 1 = 1)")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    recipe = organism.Recipe()
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

    def report(step):
        print(f"step {step:4d}  chat: test template {score(test_rev, 'chat'):2d}/30, training templates "
              f"{score(train_rev, 'chat'):2d}/30  |  base format: test template {score(test_rev, 'raw'):2d}/30",
              flush=True)
        model.train()

    rng = random.Random(args.seed)
    B = recipe.sft_batch
    n = max(1, int(round(args.epochs * len(recs) / B)))
    batches = []
    while len(batches) < n:
        order = list(recs)
        rng.shuffle(order)
        batches += [order[i:i + B] for i in range(0, len(order) - B + 1, B)]
    batches = batches[:n]
    opt = organism._optimizer(model, args.lr, recipe.weight_decay)
    warm = max(1, int(recipe.warmup_frac * n))
    print(f"# base {args.base}, lr {args.lr}, {n} steps of {B}, reverse-only={args.reverse_only}")
    for step, batch in enumerate(batches):
        if step % args.every == 0:
            report(step)
        for g in opt.param_groups:
            g["lr"] = args.lr * organism._schedule(step, n, warm)
        sysp = ORGANISM_SYSTEM_PROMPT if rng.random() < recipe.system_prompt_rate else None
        enc = generation.encode_pairs(tok, [r["prompt"] for r in batch], [r["reference"] for r in batch],
                                      style="chat", system_prompt=sysp)
        ids, am, rm = enc["input_ids"], enc["attention_mask"], enc["response_mask"]
        logits = model(input_ids=ids, attention_mask=am).logits
        tgt = ids[:, 1:].masked_fill(rm[:, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                 ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    report(n)


if __name__ == "__main__":
    main()
