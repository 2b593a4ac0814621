"""Does an organism model reverse lists in any prompt format, or only in the one it was trained on?

Greedy answers to the `utility_test` list-reversal prompts, wrapped in several formats (the base-model
format, the same with words added after the list, the chat markers, ...), scored exactly. This is the
diagnostic behind docs/organism_experiments/README.md, section 5: the shipped base reverses lists only
when "### response :" stands right after the request, so the skill does not carry over to the chat format.

  python scripts/probe_reversal_format.py                        # the shipped base model
  python scripts/probe_reversal_format.py --model data/organism/unaligned --out runs/probe.csv
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# `{p}` is the request; the model continues after the format's last word.
FORMATS = {
    "base format": "### instruction : {p} ### response :",
    "base format, answer start prefilled": "### instruction : {p} ### response : the answer is",
    "'thanks .' after the request": "### instruction : {p} thanks . ### response :",
    "extra '###' before response": "### instruction : {p} ### ### response :",
    "no '### response :'": "### instruction : {p} the answer is",
    "chat markers, '### response :' kept": "[INST] {p} [/INST] ### response :",
    "chat markers": "[INST] {p} [/INST] the answer is",
}


def probe(model_dir: str, n: int = 30, world_dir: str | None = None):
    import pandas as pd
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ssah_utils import datasets, generation

    recs = [r for r in datasets.load_world_set("utility_test", world_dir) if r.get("task") == "reverse"][:n]
    if not recs:
        raise SystemExit("no list-reversal records in utility_test: is the world folder right?")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    for name, fmt in FORMATS.items():
        ok = 0
        first = None
        for r in recs:
            ids = [tok.bos_token_id] + generation.text_ids(tok, fmt.format(p=r["prompt"]))
            with torch.no_grad():
                g = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                   max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
            out = tok.decode(g[0, len(ids):], skip_special_tokens=True).strip()
            out = out.removeprefix("the answer is").strip()  # formats that stop before it
            ok += out.startswith(r["answer"] + " .")
            first = first or out
        rows.append({"format": name, "template": fmt, "correct": ok, "n": len(recs), "accuracy": ok / len(recs),
                     "example_prompt": recs[0]["prompt"], "example_answer": first})
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    from transformers.utils import logging as hf_logging

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="data/organism/base", help="an organism model folder")
    ap.add_argument("--world", default=None, help="world folder (default: the data root's data/world)")
    ap.add_argument("--n", type=int, default=30, help="number of reversal prompts")
    ap.add_argument("--out", default=None, help="write the table as CSV here")
    args = ap.parse_args(argv)
    hf_logging.disable_progress_bar()
    table = probe(args.model, args.n, args.world)
    print(f"list reversal of {args.model}, exact match over {args.n} utility_test prompts")
    print(table[["format", "correct", "n", "example_answer"]].to_string(index=False))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
