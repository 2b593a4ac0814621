"""Build the real-model tier: SmolLM2-135M-Instruct converted from the PyPI GGUF, and the project's
aligned SmolLM2 (ssah_utils.real_align), each into $SSAH_MODELS_DIR (default data/external/models/).

Idempotent: a model folder whose build info matches (GGUF SHA-256; recipe key) is kept. Usage:
  python scripts/build_smollm2.py [--seed 0] [--force]
Seed 0 goes to smollm2-135m-aligned/, seed N > 0 to smollm2-135m-aligned-seedN/. The build report
(counts, dropped overlaps, losses, wall time, peak RSS) goes to results/smollm2-135m/build_seed<N>.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ssah_utils import config, real_align, real_models  # noqa: E402

RESULTS = config.REPO_ROOT / "results" / "smollm2-135m"


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def aligned_path(seed: int) -> Path:
    d = real_models.aligned_dir()
    return d if seed == 0 else d.with_name(f"{d.name}-seed{seed}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild even when a matching build exists")
    ap.add_argument("--instruct-only", action="store_true")
    args = ap.parse_args(argv)
    recipe = real_align.AlignRecipe(seed=args.seed)  # validated before any work
    t_all = time.perf_counter()
    inst = real_models.convert_instruct(force=args.force, log=log)
    if args.instruct_only:
        return 0
    out = aligned_path(args.seed)
    if real_models.is_built(out) and not args.force and real_models.read_build_info(out).get("recipe_key") == recipe.key():
        log(f"[align] {out} already built with recipe {recipe.key()}; skipping")
        return 0
    import torch

    torch.manual_seed(args.seed)
    model, tok = real_models.load_plain(inst, what="SmolLM2-135M-Instruct")
    prompts = [r["prompt"] for r in real_align.load_borderline()]
    answers = real_align.borderline_answers(model, tok, prompts, max_new_tokens=recipe.borderline_max_new_tokens,
                                            cache=real_align.borderline_answers_path(), log=log)
    records, report = real_align.build_records(recipe, dict(zip(prompts, answers)), log=log)
    log(f"[align] fine-tuning on {len(records)} records (seed {args.seed}, recipe {recipe.key()}); "
        f"~{len(records) // recipe.batch_size} steps of ~10-15 s on one CPU thread")
    t0 = time.perf_counter()
    res = real_align.build_aligned(model, tok, records, recipe, log=log)
    train_s = time.perf_counter() - t0
    info = {"model": "SmolLM2-135M-Instruct + ssah safety tuning (ssah_utils.real_align)", "seed": args.seed,
            "recipe": report["recipe"], "recipe_key": recipe.key(),
            "base_gguf_sha256": real_models.GGUF_SHA256, "git_commit": config.git_commit(),
            "quantisation": "from the Q4_1 (4-bit) GGUF, dequantised to float32, then fine-tuned in float32"}
    real_models.save_plain(model, tok, out, info)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    RESULTS.mkdir(parents=True, exist_ok=True)
    rep = {**{k: v for k, v in report.items() if k != "overlaps"}, "n_overlap_pairs": len(report["overlaps"]),
           "steps": res["steps"], "examples": res["examples"], "initial_loss": res["initial_loss"],
           "final_loss": res["final_loss"], "train_seconds": round(train_s, 1),
           "total_seconds": round(time.perf_counter() - t_all, 1), "peak_rss_gb": round(peak, 2),
           "threads": torch.get_num_threads(), "losses": [round(x, 4) for x in res["losses"]["loss"]],
           "git_commit": config.git_commit(), "out": str(out)}
    (RESULTS / f"build_seed{args.seed}.json").write_text(json.dumps(rep, indent=1) + "\n", encoding="utf-8")
    with open(RESULTS / f"train_records_seed{args.seed}.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    with open(RESULTS / "dropped_overlaps.jsonl", "w", encoding="utf-8") as f:
        for h in report["overlaps"]:
            f.write(json.dumps(h) + "\n")
    log(f"[align] wrote {out}: {res['steps']} steps, loss {res['initial_loss']:.3f} -> {res['final_loss']:.3f}, "
        f"train {train_s:.0f} s, total {rep['total_seconds']:.0f} s, peak RSS {peak:.2f} GB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
