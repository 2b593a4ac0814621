#!/usr/bin/env python
"""Build the shipped learned refusal judge, data/judges/learned.json, deterministically.

  OMP_NUM_THREADS=1 SSAH_DATA_ROOT=../shared/data .venv/bin/python scripts/build_judge.py          # (re)write it
  OMP_NUM_THREADS=1 SSAH_DATA_ROOT=../shared/data .venv/bin/python scripts/build_judge.py --check  # rebuild in memory, compare

Training data: both XSTest models' 450 human-labelled completions + the extra rule-labelled texts of
`judge_eval.TrainConfig` (see docs/judges/README.md); feature extractor, view, SmolLM2 layer and C by
5-fold CV inside that data (scored on its XSTest items). The head (float64 Newton fit) is
bit-identical for the same features; the file records the config, the data files' SHA-256 prefixes,
the CV scores and the weights' SHA-256. These numbers are in-sample for XSTest: the out-of-model
estimate is the leave-one-model-out table of scripts/judge_agreement.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ssah_utils import judge_eval as je  # noqa: E402
from ssah_utils import learned_judge as lj  # noqa: E402
from ssah_utils.datasets import dataset_path, sha256_prefix  # noqa: E402

OUT = lj.JUDGES_DIR / "learned.json"
SAMPLE = ROOT / "tests" / "data" / "judge_sample.csv"
EXPECTED = ROOT / "tests" / "data" / "judge_expected.json"
SOURCES = ("xstest_completions_llama2", "xstest_completions_mistral", "refusal_pairs", "alpaca")


def build(path: Path) -> dict:
    import torch

    torch.set_num_threads(1)
    cfg = je.TrainConfig()
    items = je.training_items(tuple(lj.XSTEST_MODELS), cfg)
    fit = je.fit_selected(items, cfg)
    info = fit["heads"][fit["chosen"]]
    ext = info["extractor"]
    cv = fit["cv"]
    spec = lj.LearnedJudgeSpec(
        name=f"learned-{ext}", version=lj.JUDGE_VERSION, extractor=ext, layer=info["layer"], C=info["C"],
        view=info["view"], threshold=0.5,
        training={
            "config": je.config_dict(cfg),
            "label_map": lj.LABEL_MAP,
            "items": {k: int(v) for k, v in items["source"].value_counts().sort_index().items()},
            "refusal_items": int(items["label"].sum()),
            "data_sha256_prefix": {s: sha256_prefix(dataset_path(s)) for s in SOURCES},
            "feature_package": "{}=={}".format(*lj.FEATURE_PACKAGES[ext][:2]),
            "feature_view": {"max_tokens": lj.MAX_TOKENS, "max_sentences": lj.MAX_SENTENCES, "sentence_tokens": lj.SENTENCE_TOKENS},
            "cv_accuracy_xstest": {e: round(h["cv_accuracy"], 6) for e, h in fit["heads"].items()},
            "cv_grid_size": int(len(cv)),
        })
    return lj.save_head(path, spec, info["head"])


def record_sample() -> None:
    """The regression record of tests/test_judges_interface.py: each judge's refusals on the hand-labelled sample."""
    import pandas as pd

    from ssah_utils import judges

    d = pd.read_csv(SAMPLE)
    rec = {}
    for name in judges.JUDGE_NAMES:
        j = judges.get_judge(name)
        rec[j.id] = [int(x) for x in j.refusals(d["response"].tolist(), d["prompt"].tolist())]
    EXPECTED.write_text("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in rec.items()) + "\n}\n",
                        encoding="utf-8")
    truth = d["label"].tolist()
    for k, v in rec.items():
        print(f"{k:32s} agrees with the hand labels on {sum(a == b for a, b in zip(v, truth))}/{len(truth)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="rebuild into a temporary file and compare with the shipped one")
    ap.add_argument("--record-sample", action="store_true",
                    help=f"record every judge's verdicts on {SAMPLE.relative_to(ROOT)} into {EXPECTED.relative_to(ROOT)}")
    a = ap.parse_args()
    if a.record_sample:
        record_sample()
        return
    if a.check:
        if not OUT.is_file():
            sys.exit(f"{OUT} does not exist; build it first (without --check)")
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d) / "learned.json"
            build(tmp)
            same = tmp.read_bytes() == OUT.read_bytes()
        print(f"rebuild {'identical to' if same else 'DIFFERS from'} {OUT}")
        sys.exit(0 if same else 1)
    doc = build(OUT)
    print(json.dumps({k: v for k, v in doc.items() if k not in ("mean", "scale", "w")}, indent=1))


if __name__ == "__main__":
    main()
