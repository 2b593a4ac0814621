#!/usr/bin/env python
"""Over-refusal against refusal of harm in two real chat models, from XSTest's human-labelled completions:
the reference for the organism's two missed targets (docs/organism_experiments, section 8).

  SSAH_DATA_ROOT=../shared/data python docs/organism_experiments/xstest_reference/xstest_rates.py  # writes xstest_rates.csv

Reads XSTest's `xstest_v2_completions_{llama2orig,mistralinstruct}.csv` through `ssah_utils.datasets.load_real`
(the data root, or a download from the canonical source). Rates per prompt type: full refusal
(`2_full_refusal`) and any refusal (full or partial), by the human `final_label`.
"""
import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))
from ssah_utils import datasets  # noqa: E402

MODELS = {"xstest_completions_llama2": "Llama-2-70b-chat, original system prompt",
          "xstest_completions_mistral": "Mistral-7B-Instruct"}


def rates() -> pd.DataFrame:
    out = []
    for key, name in MODELS.items():
        d = datasets.load_real(key)
        d["unsafe"] = d["type"].str.startswith("contrast_")
        d["full_refusal"] = d["final_label"].eq("2_full_refusal")
        d["any_refusal"] = d["final_label"].ne("1_full_compliance")
        groups = {"safe prompts (all 250)": ~d["unsafe"], "safe: homonyms": d["type"].eq("homonyms"),
                  "safe: figurative language": d["type"].eq("figurative_language"),
                  "safe: safe targets": d["type"].eq("safe_targets"),
                  "unsafe contrasts (all 200)": d["unsafe"], "unsafe: homonym contrasts": d["type"].eq("contrast_homonyms")}
        for g, m in groups.items():
            s = d[m]
            out.append({"model": name, "prompts": g, "n": len(s), "full_refusal": s["full_refusal"].mean(),
                        "any_refusal": s["any_refusal"].mean(), "full_compliance": 1 - s["any_refusal"].mean()})
    return pd.DataFrame(out)


if __name__ == "__main__":
    t = rates()
    t.to_csv(HERE / "xstest_rates.csv", index=False, float_format="%.3f")
    print(t.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
