"""Measure a SmolLM2 model of the real tier: refusal of held-out harmful requests and of XSTest's safe
prompts (keyword judges), WikiText-2 perplexity, held-out Alpaca response NLL and GSM8K by final number.

  python scripts/measure_smollm2.py --model instruct|aligned|aligned-seedN [--what harmful,xstest,...]

Every prompt/response pair is saved as CSV under results/smollm2-135m/<model>/ (to be re-judged later);
the numbers go to results/smollm2-135m/<model>/metrics.json with the settings, wall time per part and
the model's build info. A part whose CSV/JSON exists for the same model build and settings is reused.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ssah_utils import config, datasets, real_align, real_models, utility  # noqa: E402

RESULTS = config.REPO_ROOT / "results" / "smollm2-135m"
# CPU-sized settings (the counts shrink, the protocol does not).
SETTINGS = {"harmful_n": 100, "harmful_set": "refusal_direction_harmful_test", "sample_seed": 0,
            "max_new_tokens": 64, "gen_batch": 16, "xstest": "xstest_safe (all 250)",
            "wikitext_window": 512, "wikitext_windows": 40, "alpaca_heldout": real_align.ALPACA_HELDOUT,
            "gsm8k_n": 50, "gsm8k_max_new_tokens": 256}
PARTS = ("harmful", "xstest", "wikitext", "alpaca_nll", "gsm8k")


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def model_dir(name: str) -> Path:
    if name == "instruct":
        return real_models.instruct_dir()
    if name == "aligned":
        return real_models.aligned_dir()
    if name.startswith("aligned-seed"):
        d = real_models.aligned_dir()
        return d.with_name(f"{d.name}-{name.removeprefix('aligned-')}")
    raise SystemExit(f"--model must be instruct, aligned or aligned-seedN, got {name!r}")


def harmful_records() -> list[dict]:
    df = datasets.load_real(SETTINGS["harmful_set"])
    recs = [{"id": f"rdt-{i:04d}", "kind": "harmful", "category": str(c or ""), "prompt": str(p)}
            for i, (p, c) in enumerate(zip(df["instruction"], df["category"]))]
    import random

    return random.Random(SETTINGS["sample_seed"]).sample(recs, SETTINGS["harmful_n"])


def judged(df):
    from ssah_utils import judges

    df = df.copy()
    df["refused_project"] = df["verdict"].eq("refusal")  # evaluation._keyword_verdict (JailbreakBench list, lenient)
    df["refused_wei2024"] = df["response"].map(judges.PAPER_JUDGE.matches_refusal)
    return df


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--what", default=",".join(PARTS))
    args = ap.parse_args(argv)
    parts = args.what.split(",")
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise SystemExit(f"unknown parts {bad}; choose from {PARTS}")
    folder = model_dir(args.model)
    build = real_models.read_build_info(folder) if real_models.is_built(folder) else None
    if build is None:
        raise SystemExit(f"{folder} is not built; run `make smollm2` first")
    out = RESULTS / args.model
    out.mkdir(parents=True, exist_ok=True)
    mpath = out / "metrics.json"
    metrics = json.loads(mpath.read_text()) if mpath.is_file() else {}
    if metrics.get("build") != build or metrics.get("settings") != SETTINGS:
        metrics = {"model": args.model, "path": str(folder), "build": build, "settings": SETTINGS, "parts": {}}
    import torch

    from ssah_utils.evaluation import evaluate_behaviour

    model, tok = real_models.load_plain(folder, what=args.model)
    log(f"[measure] {args.model} from {folder}; threads {torch.get_num_threads()}")

    def save():
        metrics["git_commit"] = config.git_commit()
        metrics["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2, 2)
        mpath.write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")

    for part in parts:
        if part in metrics["parts"]:
            log(f"[measure] {part}: cached {metrics['parts'][part]}")
            continue
        t0 = time.perf_counter()
        if part in ("harmful", "xstest"):
            recs = harmful_records() if part == "harmful" else datasets.load_set("xstest_safe")
            df = judged(evaluate_behaviour(model, tok, recs, style="chat", max_new_tokens=SETTINGS["max_new_tokens"],
                                           batch_size=SETTINGS["gen_batch"]))
            df.to_csv(out / f"{part}.csv", index=False)
            res = {"n": len(df), "refusal_project_judge": float(df["refused_project"].mean()),
                   "refusal_wei2024_judge": float(df["refused_wei2024"].mean()), "csv": f"{args.model}/{part}.csv"}
        elif part == "wikitext":
            res = utility.wikitext2_perplexity(model, tok, window=SETTINGS["wikitext_window"],
                                               n_windows=SETTINGS["wikitext_windows"])
        elif part == "alpaca_nll":
            _, held = real_align.alpaca_split()
            res = {"nll": utility.response_nll(model, tok, held), "n": len(held)}
        else:
            recs = datasets.load_set("gsm8k", n=SETTINGS["gsm8k_n"], take="first")
            df = utility.gsm8k_score(model, tok, recs, max_new_tokens=SETTINGS["gsm8k_max_new_tokens"],
                                     batch_size=SETTINGS["gen_batch"])
            df.to_csv(out / "gsm8k.csv", index=False)
            res = {"n": len(df), "accuracy": float(df["correct"].mean()), "csv": f"{args.model}/gsm8k.csv"}
        res["seconds"] = round(time.perf_counter() - t0, 1)
        metrics["parts"][part] = res
        save()
        log(f"[measure] {part}: {res}")
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
