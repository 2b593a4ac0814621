"""Replay the organism's two SFT stages (instruct from the shipped base, safety from the shipped unaligned model)
with the package of a given source tree, save the weights, and compare two such replays bit for bit.

Used to show that the one training loop (`training.finetune` with `organism.sft_config`) trains the organism
exactly as the dedicated loop it replaced did: replay once with a checkout of the old commit and once with this
tree, on the same machine and thread count, then compare.

    git worktree add /tmp/ssah-old 5d30257
    python scripts/compare_sft_loops.py replay /tmp/ssah-old old.pt
    python scripts/compare_sft_loops.py replay . new.pt
    python scripts/compare_sft_loops.py compare old.pt new.pt
"""

from __future__ import annotations

import sys
import time


def replay(tree: str, out: str) -> None:
    sys.path.insert(0, tree)
    import torch
    from transformers import AutoModelForCausalLM

    from ssah_utils import config, organism, world

    recipe = organism.Recipe()
    organism.set_determinism(recipe.threads)
    sets = world.build_world(recipe.world_seed)
    tok = organism.build_tokenizer(world.all_texts(sets))
    weights = {}
    for src, dst, fn in (("base", "unaligned", organism.instruct_sft), ("unaligned", "aligned", organism.safety_sft)):
        model = AutoModelForCausalLM.from_pretrained(str(config.ORGANISM_DIR / src), dtype=torch.float32)
        t0 = time.perf_counter()
        r = fn(model, tok, sets, recipe, 0, log=None)
        print(f"{dst}: {r['steps']} steps, {r['examples']} examples, final loss {r['final_loss']:.6f}, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        weights[dst] = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(weights, out)


def compare(a_path: str, b_path: str) -> int:
    import torch

    a, b = torch.load(a_path), torch.load(b_path)
    same = True
    for stage in a:
        bad = [k for k in a[stage] if not torch.equal(a[stage][k], b[stage][k])]
        print(f"{stage}: {len(a[stage])} tensors, " + ("bit-identical" if not bad else f"{len(bad)} differ"))
        same &= not bad
    return 0 if same else 1


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "replay":
        replay(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        raise SystemExit(compare(sys.argv[2], sys.argv[3]))
    else:
        raise SystemExit(__doc__)
