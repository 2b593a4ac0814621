"""02_classify's pipeline on the real SmolLM2 weights, with tiny counts: calibration answers, WIFV scores,
labels, and Table 1's ablations with their random controls, end to end on a real chat model; then 03's
fine-tuning (full and frozen, checked bit for bit) and 04's alignment (full and RU-only) the same way.

Needs the models `make smollm2` builds ($SSAH_MODELS_DIR); skipped with that reason where they are absent
(as in CI, which does not build them). Measured 388 s on a 2-core CPU beside another job, hence `slow`; the
03 and 04 tests below, 1704 s together on a slower 2-core CPU shared with two other jobs."""

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


def _tiny_classify(cfg):
    """02's config with tiny counts, the labels 03 and 04 read in these tests."""
    c = sc.make_config("smollm2-135m", n_calib=4, n_calib_seeds=1, n_random_seeds=1, n_eval=2, n_dose=2, batch_size=4,
                       dose_fractions=(0.05,))
    return dataclasses.replace(c, calib=dataclasses.replace(c.calib, max_new_tokens=8))


def _tiny_eval(e):
    return dataclasses.replace(e, max_new_tokens=8, wikitext_windows=1, n_nll=2, batch_size=4)


def test_freeze_finetune_runs_end_to_end_on_the_real_models(monkeypatch, tmp_path, shared_data):
    """03 on the aligned build: Alpaca fine-tuning, full and with the ESU + all CU frozen (checked bit for bit)."""
    from ssah_utils import stage_freeze as sf

    monkeypatch.setattr(config, "CACHE_DIR", tmp_path / "cache")
    cfg = sf.make_config("smollm2-135m", n_seeds=1, datasets_=("alpaca",), conditions=("before", "full", "freeze_esu_cu"),
                         n_train=4, n_eval=2, relabel=False)
    cfg = dataclasses.replace(cfg, classify=_tiny_classify(cfg.classify), eval=_tiny_eval(cfg.eval),
                              train=dataclasses.replace(cfg.train, batch_size=4, micro_batch_size=2, max_length=96))
    df = sf.runs(cfg)
    assert list(df["condition"]) == ["before", "full", "freeze_esu_cu"]
    trained = df[df["condition"] != "before"]
    assert (trained["verify_changed"] == 0).all() and (trained["steps"] >= 1).all()
    assert float(df.loc[df["condition"] == "freeze_esu_cu", "frozen_unit_params_pct"].iloc[0]) > 50
    assert df[["asr", "refusal", "ppl", "alpaca_nll"]].notna().all().all()
    sf.clear_memo()


def test_alignment_budget_runs_end_to_end_on_the_real_models(monkeypatch, tmp_path, shared_data):
    """04 on the instruct model: the project's safety tuning, all parameters and the RU only (0 entries moved
    outside the RU), evaluated beside the base and the aligned reference."""
    from ssah_utils import stage_budget as sb

    monkeypatch.setattr(config, "CACHE_DIR", tmp_path / "cache")
    cfg = sb.make_config("smollm2-135m", n_seeds=1, conditions="full,ru_only", n_train=4, n_calib=4, n_eval=2,
                         batch_size=4)
    cfg = dataclasses.replace(cfg, eval=_tiny_eval(cfg.eval))
    t = sb.table4(cfg, log=None)
    runs = t["runs"].set_index("condition")
    assert {"base", "reference", "full", "ru_only"} <= set(runs.index)
    assert int(runs.loc["ru_only", "moved_outside_mask"]) == 0
    assert 0 < float(runs.loc["ru_only", "trained_unit_params_pct"]) < 50
    assert runs["ppl"].notna().all() and (runs["ppl"] > 1).all()
    sb.clear_memo()
