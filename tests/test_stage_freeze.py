"""Stage 03_freeze end to end on the organism with a tiny config (ssah_utils.stage_freeze)."""

import dataclasses

import pytest
import torch

from ssah_utils import config, stage_classify as sc, stage_freeze as sf
from ssah_utils.models import unit_params
from ssah_utils.units import label_units


@pytest.fixture
def tiny_cfg(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "CACHE_DIR", tmp_path / "cache")
    torch.set_num_threads(1)
    cfg = sf.make_config("organism", n_seeds=1, datasets_=("ft_dolly",), conditions=("before", "full", "freeze_esu_topcu"),
                         n_train=24, epochs=0.5, n_eval=6)
    small_classify = sc.make_config("organism", n_calib=16, n_calib_seeds=1, n_eval=6)
    return dataclasses.replace(cfg, classify=small_classify)


def test_one_frozen_run_end_to_end(tiny_cfg):
    cfg = tiny_cfg
    model, _ = sf.load(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = sf.run(cfg, "ft_dolly", "freeze_esu_topcu", 0)
    m = res["metrics"]
    assert m["verify_changed"] == 0 and m["verify_max_abs_diff"] == 0.0 and m["frozen_entries"] > 0
    assert int(res["verify"]["frozen_entries"].sum()) == m["frozen_entries"]
    assert m["epochs"] == pytest.approx(1.0)  # frozen runs train epochs_mult_frozen x the full recipe
    assert m["steps"] == 2 and m["examples"] == 24  # batches of 16 and 8
    for k in ("asr", "asr_kw", "refusal", "jailbreak_asr", "over_refusal", "utility", "final_loss", "set_loss_after"):
        assert k in m and m[k] == m[k]  # present and not NaN
    # the aligned model the stage shares with 02_classify is untouched (runs fine-tune a copy)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # the run is cached: a second call hits the cache and returns the same numbers
    sf._MEMO.clear()
    again = sf.run(cfg, "ft_dolly", "freeze_esu_topcu", 0)
    assert again["metrics"] == m

    df = sf.runs(cfg)
    assert list(df["condition"]) == ["before", "full", "freeze_esu_topcu"]
    for col in ("dataset", "condition", "replicate", "asr", "asr_kw", "refusal", "utility", "verify_changed"):
        assert col in df.columns
    s = sf.summarize(df)
    paper = sf.vs_paper(s)
    assert paper.loc[("ft_dolly", "full"), "paper_keyword_asr (Llama-2-7B-chat)"] == pytest.approx(11.92)
    tr = sf.label_transfer(cfg, "ft_dolly")
    assert tr.shape == (4, 4)
    assert "Frozen entries: 0 of" in sf.summary_text(cfg)


def test_top_cu_takes_the_highest_cu_by_params():
    shape = sc.adapter_for(sc.load(sc.make_config())[0]).shape
    n = shape.n_layers * (shape.d_mlp + shape.n_heads)
    g = torch.Generator().manual_seed(0)
    lab = label_units(torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64),
                      shape, standardized=True)
    top = sf.top_cu(lab, 0.06, "safety")
    flat = top.flat()
    cu = torch.tensor([x == "CU" for x in lab.labels])
    assert not (flat & ~cu).any()  # only CU
    # by a slow reference: walk CU in z_S order, stop nearest 6% of all unit parameters
    params, budget = unit_params(shape), 0.06 * float(unit_params(shape).sum())
    order = [i for i in torch.argsort(lab.z_safety, descending=True, stable=True).tolist() if cu[i]]
    best, cum, best_k = abs(budget), 0.0, 0
    for k, i in enumerate(order, 1):
        cum += float(params[i])
        if abs(cum - budget) < best:
            best, best_k = abs(cum - budget), k
    assert sorted(flat.nonzero().squeeze(1).tolist()) == sorted(order[:best_k])


def test_bad_config():
    with pytest.raises(ValueError, match="unknown conditions"):
        sf.make_config(conditions=("full", "freeze_all"))
    with pytest.raises(ValueError, match="cu_rank_by must be one of"):
        sf.make_config(cu_rank_by="utility")
    with pytest.raises(ValueError, match="n_seeds"):
        sf.make_config(n_seeds=0)


def test_lr_rule_picks_the_smallest_lr_that_fits_every_set():
    import pandas as pd

    sweep = pd.DataFrame({"dataset": ["a", "a", "a", "b", "b", "b"], "lr": [1e-5, 1e-4, 1e-3] * 2,
                          "loss_ratio": [0.9, 0.45, 0.3, 0.4, 0.6, 0.2]})
    assert sf.rule_lr(sweep, 0.5) == (1e-3, True)  # 1e-4 fits a but not b
    assert sf.rule_lr(sweep, 0.7) == (1e-4, True)
    assert sf.rule_lr(sweep, 0.1) == (1e-3, False)  # none fits: the closest
    cfg = sf.make_config("organism")
    assert cfg.fit_ratio == sf.ORGANISM_FIT_RATIO
    assert sf.choose_lr(cfg, sweep).train.lr == 1e-3
    given = sf.make_config("organism", lr=3e-4)
    assert given.fit_ratio == 0.0 and sf.choose_lr(given, sweep).train.lr == 3e-4  # an explicit lr is kept
    real = sf.make_config("llama2-7b-chat")
    assert real.train.lr == 2e-5 and real.train.batch_size == 64 and real.fit_ratio == 0.0  # Qi et al.


def test_label_model_on_the_configs_own_model_equals_its_labels(tmp_path, monkeypatch):
    """03 relabels fine-tuned models with stage_classify.label_model: on the aligned model itself it must
    give exactly 02's cached labels (same pairs, scorer, h and rule)."""
    monkeypatch.setattr(config, "CACHE_DIR", tmp_path / "cache")
    torch.set_num_threads(1)
    for variant in ("authors", "plain", "flap"):
        c = dataclasses.replace(sc.make_config("organism", n_calib=16, n_calib_seeds=1, n_eval=6), wifv_variant=variant)
        model, tok = sc.load(c)
        want = sc.labels(c)
        got = sc.label_model(c, model, tok)
        assert got.labels == want.labels and torch.equal(got.z_safety, want.z_safety), variant
        with pytest.raises(ValueError, match="unknown calibration draw"):
            sc.label_model(c, model, tok, "seed_99")
