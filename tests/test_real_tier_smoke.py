"""02_classify's pipeline on the real SmolLM2 weights, with tiny counts: calibration answers, WIFV scores,
labels, and Table 1's ablations with their random controls, end to end on a real chat model.

Needs the models `make smollm2` builds ($SSAH_MODELS_DIR); skipped with that reason where they are absent
(as in CI, which does not build them). Measured 388 s on a 2-core CPU beside another job, hence `slow`."""

import dataclasses

import pytest

from ssah_utils import config, real_models
from ssah_utils import stage_classify as sc

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (real_models.is_built(real_models.instruct_dir()) and real_models.is_built(real_models.aligned_dir())),
                       reason=f"the SmolLM2 models are not built in {real_models.models_dir()}: run `make smollm2` "
                              f"(or set ${real_models.MODELS_ENV})"),
]


def test_classify_runs_end_to_end_on_the_real_models(monkeypatch, tmp_path, shared_data):
    monkeypatch.setattr(config, "CACHE_DIR", tmp_path / "cache")
    cfg = sc.make_config("smollm2-135m", n_calib=4, n_calib_seeds=1, n_random_seeds=1, n_eval=2, n_dose=2,
                         batch_size=4, dose_fractions=(0.05,))
    cfg = dataclasses.replace(cfg, calib=dataclasses.replace(cfg.calib, max_new_tokens=8),
                              eval=dataclasses.replace(cfg.eval, max_new_tokens=8, wikitext_windows=1, n_nll=2))
    lab = sc.labels(cfg)
    frac = lab.fractions()
    assert set(frac.index) == {"ESU", "EUU", "CU", "RU"}
    assert abs(float(frac["pct_units"].sum()) - 100.0) < 1e-6
    assert 0 < float(frac.loc["ESU", "pct_units"]) < 10  # h1 = 1% of unit parameters, in units of either kind
    t = sc.table1(cfg)["summary"]
    assert {"none", "ESU", "random≈ESU", "EUU", "RU"} <= set(t.index)
    for col in ("asr", "refusal", "over_refusal", "utility", "ppl", "alpaca_nll"):
        assert col in t.columns, col
    assert t["ppl"].notna().all() and (t["ppl"] > 1).all()
    assert t.loc["EUU", "ppl"] > t.loc["none", "ppl"]  # removing the units utility needs most costs perplexity
