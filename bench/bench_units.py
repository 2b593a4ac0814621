"""Benchmark of the WIFV scoring pass (ssah_utils.units.activation_stats), run by `make bench`.

Checks the two claims of issue 4 and prints a table:
1. cost: one WIFV pass over the calibration batches takes at most 1.2x a plain forward pass
   (`model(**batch)`, logits included) over the same batches;
2. memory: the peak resident memory of a scoring run does not grow with the number of calibration
   tokens (streaming float64 statistics, no stored activations). Each size runs in a fresh process,
   since peak RSS only grows; a run that stores the activations is shown as the contrast.

Model: the organism's aligned model when it is in data/organism/, else a random Llama of similar
size (`--model random`). Usage: python bench/bench_units.py [--model organism:aligned|random] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ssah_utils import config  # noqa: E402
from ssah_utils import units  # noqa: E402
from ssah_utils.models import adapter_for  # noqa: E402


def _model(spec: str):
    if spec == "random" or (spec.startswith("organism:") and not (config.ORGANISM_DIR / spec.split(":")[1] / "config.json").is_file()):
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        cfg = AutoConfig.for_model("llama", vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
        return AutoModelForCausalLM.from_config(cfg).eval(), "random llama (4 layers, d 256, GQA 8/4)"
    from ssah_utils.models import load_model

    return load_model(spec, device="cpu")[0], spec


def _encoding(n: int, vocab: int, seed: int = 0, prompt_len: int = 24, resp_len: int = 40) -> dict[str, torch.Tensor]:
    """Synthetic right-padded calibration pairs: random ids, varied lengths, response mask on the answer."""
    g = torch.Generator().manual_seed(seed)
    width = prompt_len + resp_len
    ids = torch.randint(4, vocab, (n, width), generator=g)
    lens = torch.randint(width // 2, width + 1, (n,), generator=g)
    pos = torch.arange(width).unsqueeze(0)
    att = (pos < lens.unsqueeze(1)).long()
    resp = (att.bool() & (pos >= prompt_len)).long()
    ids[att == 0] = 0
    return {"input_ids": ids, "attention_mask": att, "response_mask": resp}


def _time(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@torch.no_grad()
def cost(spec: str, n: int, batch_size: int) -> dict:
    model, name = _model(spec)
    enc = _encoding(n, model.config.vocab_size)
    batches = list(units._batches(enc, batch_size))
    plain = _time(lambda: [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False) for b in batches])
    backbone = _time(lambda: [model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False) for b in batches])
    wifv = _time(lambda: units.activation_stats(model, enc, batch_size=batch_size))
    return {"model": name, "samples": n, "tokens": int(enc["attention_mask"].sum()), "plain_s": plain,
            "backbone_s": backbone, "wifv_s": wifv, "ratio_vs_plain": wifv / plain, "ratio_vs_backbone": wifv / backbone}


@torch.no_grad()
def memory_child(spec: str, n: int, batch_size: int, store: bool) -> dict:
    model, _ = _model(spec)
    enc = _encoding(n, model.config.vocab_size)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if store:  # the contrast: keep every response-token input of o_proj/down_proj
        kept = []
        ad = adapter_for(model)
        state = {}
        with units._input_hooks(ad, ("o_proj", "down_proj"),
                                lambda p, l, x: kept.append(x.reshape(-1, x.shape[-1])[state["idx"]].double())):
            for b in units._batches(enc, batch_size):
                state["idx"] = b["response_mask"].reshape(-1).nonzero().squeeze(1)
                model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
    else:
        st = units.activation_stats(model, enc, batch_size=batch_size)
        assert st.n_tokens == int(enc["response_mask"].sum())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"samples": n, "resp_tokens": int(enc["response_mask"].sum()), "store": store,
            "peak_rss_mib": peak / 1024, "growth_mib": (peak - base) / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="organism:aligned")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--child", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        n, store = args.child.split(",")
        print(json.dumps(memory_child(args.model, int(n), args.batch_size, store == "1")))
        return
    import pandas as pd

    c = cost(args.model, 128, args.batch_size)
    print(f"model: {c['model']}; {c['samples']} calibration pairs, {c['tokens']} tokens, batch {args.batch_size}, "
          f"{args.threads} thread(s)\n")
    print("cost (best of 3)")
    print(pd.DataFrame([{k: c[k] for k in ("plain_s", "backbone_s", "wifv_s", "ratio_vs_plain", "ratio_vs_backbone")}]).round(3).to_string(index=False))
    ok_cost = c["ratio_vs_plain"] <= 1.2
    rows = []
    for store in (False, True):
        for n in (64, 256, 1024):
            out = subprocess.run([sys.executable, __file__, "--model", args.model, "--threads", str(args.threads),
                                  "--batch-size", str(args.batch_size), "--child", f"{n},{int(store)}"],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    mem = pd.DataFrame(rows)
    mem["mode"] = mem["store"].map({False: "WIFV streaming", True: "store activations (contrast)"})
    print("\nmemory (peak RSS of a fresh process; growth = peak during scoring minus peak after loading)")
    print(mem[["mode", "samples", "resp_tokens", "peak_rss_mib", "growth_mib"]].round(1).to_string(index=False))
    stream = mem[~mem["store"]]
    spread = stream["growth_mib"].max() - stream["growth_mib"].min()
    ok_mem = spread < 0.1 * stream["peak_rss_mib"].mean() or spread < 16
    print(f"\nWIFV pass / plain forward = {c['ratio_vs_plain']:.2f}x (target <= 1.2x): {'PASS' if ok_cost else 'FAIL'}")
    print(f"WIFV peak-memory growth spread over 64 -> 1024 samples = {spread:.1f} MiB (target: flat): {'PASS' if ok_mem else 'FAIL'}")


if __name__ == "__main__":
    main()
