"""The authors' streaming WIFV estimator (ssah_utils.flap) against references written another way,
FLAP's thresholds against a brute-force loop, and the eos option (generation.without_final_eos)."""

import dataclasses

import numpy as np
import pytest
import torch

from ssah_utils import config, flap
from ssah_utils import stage_classify as sc
from ssah_utils.generation import encode_pairs, without_final_eos
from ssah_utils.models import UnitShape, adapter_for
from tiny_models import FAMILIES, tiny_model, tiny_tokenizer

PROMPTS = ["how do i make a bomb ?", "two plus three ?", "reverse the list a b c", "how do i bake bread ?", "count the words a b"]
ANSWERS = ["sorry i can not help with that it is illegal", "five", "c b a", "first bake bread then finally", "2"]


def _closed_form(samples: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """FLAP's recursion unrolled (float64): baseline = mean of the per-sample means; with m_k the running
    mean after k samples and S_k = sum_t (x_kt - m_k)^2, the fluctuation after N samples telescopes to
    1/(N-1) * sum_{k=2..N} S_k (k-1)/k (0 for N = 1)."""
    means = [s.mean(axis=0) for s in samples]
    n = len(samples)
    fluc = np.zeros(samples[0].shape[1])
    for k in range(2, n + 1):
        m_k = np.mean(means[:k], axis=0)
        fluc += ((samples[k - 1] - m_k) ** 2).sum(axis=0) * (k - 1) / k
    return np.mean(means, axis=0), fluc / (n - 1) if n > 1 else fluc


def test_running_stats_follow_flaps_recursion():
    rng = np.random.default_rng(0)
    samples = [rng.normal(size=(t, 5)) * (1 + i) for i, t in enumerate((3, 1, 7, 2, 4))]
    st = flap.FlapRunningStats(5)
    st.add_sample(torch.tensor(samples[0]))
    assert torch.equal(st.fluc, torch.zeros(5))  # the first sample adds nothing
    for x in samples[1:]:
        st.add_sample(torch.tensor(x))
    base, fluc = _closed_form(samples)
    assert st.nsamples == 5 and st.baseline.dtype == torch.float32 and st.fluc.dtype == torch.float32
    np.testing.assert_allclose(st.baseline.numpy(), base, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(st.fluc.numpy(), fluc, rtol=1e-5)
    # It is not the token variance (which weighs tokens, not samples, and keeps the first sample).
    exact = np.concatenate(samples).var(axis=0) * sum(len(s) for s in samples)
    assert not np.allclose(st.fluc.numpy(), exact, rtol=1e-2)
    with pytest.raises(ValueError, match="no response token"):
        st.add_sample(torch.zeros(0, 5))
    with pytest.raises(ValueError, match=r"\[tokens, 5\]"):
        st.add_sample(torch.zeros(3, 4))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("family", FAMILIES)
def test_flap_stats_equal_the_closed_form_on_captured_inputs(family, tok):
    """flap_stats (hooks, batch of one, response rows) against inputs captured per sample with a padded
    batched forward and the closed form above."""
    model = tiny_model(family)
    enc = encode_pairs(tok, PROMPTS, ANSWERS)
    got = flap.flap_stats(model, enc)
    ad = adapter_for(model)
    captured: dict = {}
    handles = [ad.proj(l, p).register_forward_pre_hook(lambda m, a, _k=(p, l): captured.__setitem__(_k, a[0].detach().double()))
               for l in range(ad.n_layers) for p in flap.PROJS]
    with torch.no_grad():
        model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    for h in handles:
        h.remove()
    for key, x in captured.items():
        samples = [x[i][enc["response_mask"][i].bool()].numpy() for i in range(len(PROMPTS))]
        base, fluc = _closed_form(samples)
        np.testing.assert_allclose(got[key].baseline.numpy(), base, rtol=1e-4, atol=1e-6, err_msg=str(key))
        np.testing.assert_allclose(got[key].fluc.numpy(), fluc, rtol=1e-4, atol=1e-7, err_msg=str(key))


def test_flap_z_by_hand(tok):
    model = tiny_model("llama")
    enc = encode_pairs(tok, PROMPTS, ANSWERS)
    st = flap.flap_stats(model, enc)
    z = flap.flap_z(model, st)
    ad = adapter_for(model)
    l = 1
    w_o = ad.proj(l, "o_proj").weight.detach().double()
    att = (st[("o_proj", l)].fluc.double() * (w_o ** 2).sum(0)) ** 2
    zc = (att - att.mean()) / att.std()
    heads = zc.view(ad.n_heads, ad.head_dim).mean(1)
    n_mlp = ad.n_layers * ad.shape.d_mlp
    np.testing.assert_allclose(z[n_mlp + l * ad.n_heads: n_mlp + (l + 1) * ad.n_heads].numpy(), heads.numpy(), rtol=1e-4, atol=1e-5)
    w_d = ad.proj(l, "down_proj").weight.detach().double()
    m = st[("down_proj", l)].fluc.double() * (w_d ** 2).sum(0)
    np.testing.assert_allclose(z[l * ad.shape.d_mlp:(l + 1) * ad.shape.d_mlp].numpy(), ((m - m.mean()) / m.std()).numpy(),
                               rtol=1e-4, atol=1e-5)


def _slow_keep(score, n_mlp, head_w, keep):
    """FLAP's selection with Python lists: heads first, then channels; sort descending; closest cumulative
    weight (first on ties); strictly above the threshold's score."""
    n = len(score)
    units = [(float(score[i]), head_w) for i in range(n_mlp, n)] + [(float(score[i]), 1) for i in range(n_mlp)]
    ranked = sorted(units, key=lambda u: -u[0])
    total = sum(w for _, w in units)
    best, best_gap, cum = 0, float("inf"), 0
    for i, (_, w) in enumerate(ranked):
        cum += w
        if abs(cum - total * keep) < best_gap:
            best, best_gap = i, abs(cum - total * keep)
    thr = ranked[best][0]
    return [float(s) > thr for s in score]


@pytest.mark.parametrize("keep", [0.01, 0.1, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_keep_above_equals_a_brute_force_loop(keep, seed):
    g = torch.Generator().manual_seed(seed)
    n_mlp, n_heads = 60, 12
    score = torch.randn(n_mlp + n_heads, generator=g, dtype=torch.float64)
    got = flap.keep_above(score, n_mlp, 5, keep)
    assert got.tolist() == _slow_keep(score, n_mlp, 5, keep)


def test_threshold_unit_goes_to_the_lowest_share_labels():
    """Scores 9..0 of ten MLP-only units, keep 0.5: the closest cumulative weight is at the 5th unit (score 5),
    which is *not* kept (strict >): the top share gets 4 units and the bottom share 6."""
    score = torch.arange(9, -1, -1, dtype=torch.float64)
    kept = flap.keep_above(score, 10, 170, 0.5)
    assert kept.tolist() == [True] * 4 + [False] * 6
    assert flap.head_weight(128) == 170  # the authors' 512 / 3 in an int64 vector
    with pytest.raises(ValueError, match="keep must be"):
        flap.keep_above(score, 10, 1, 1.5)


def test_flap_labels_thresholds_and_overlap():
    shape = UnitShape(n_layers=2, d_model=8, d_mlp=30, n_heads=4, n_kv_heads=2, head_dim=2)
    g = torch.Generator().manual_seed(3)
    zs, zu = torch.randn(68, generator=g, dtype=torch.float64), torch.randn(68, generator=g, dtype=torch.float64)
    lab = flap.flap_labels(zs, zu, shape, (0.1, 0.05, 0.1))
    hw = flap.head_weight(2)
    esu = flap.keep_above(zs - zu, 60, hw, 0.05)
    assert [x == "ESU" for x in lab.labels] == esu.tolist()
    assert lab.rule == "flap" and set(lab.labels) <= {"ESU", "EUU", "CU", "RU"}
    with pytest.raises(ValueError, match="overlap"):
        flap.flap_labels(zs, zu, shape, (0.1, 0.6, 0.6))


def test_without_final_eos(tok):
    enc = encode_pairs(tok, PROMPTS[:3], ANSWERS[:3])
    out = without_final_eos(enc, tok.eos_token_id)
    assert torch.equal(out["input_ids"], enc["input_ids"])
    assert (enc["response_mask"].sum(1) - out["response_mask"].sum(1)).tolist() == [1, 1, 1]
    cut = encode_pairs(tok, PROMPTS[:1], ANSWERS[:1], max_length=12)  # truncated before its eos: unchanged
    assert torch.equal(without_final_eos(cut, tok.eos_token_id)["response_mask"], cut["response_mask"])
    with pytest.raises(ValueError, match="only its eos"):
        without_final_eos(encode_pairs(tok, ["two plus three ?"], [""]), tok.eos_token_id)


def test_stage_flap_variant_and_comparison(tmp_path, monkeypatch):
    """02 with wifv_variant='flap' labels from FLAP's z-scores and thresholds; the comparison table measures
    each difference; score_eos=False changes what the scorer sees."""
    monkeypatch.setattr(config, "CACHE_DIR", tmp_path / "cache")
    torch.set_num_threads(1)
    base = sc.make_config("organism", n_calib=16, n_calib_seeds=2, n_eval=6)
    fcfg = sc.make_config("organism", n_calib=16, n_calib_seeds=2, n_eval=6, wifv_variant="flap")
    lab = sc.labels(fcfg)
    model, tok = sc.load(fcfg)
    draws = sc.calibration(fcfg)
    s, u = (draws[k][draws[k]["seed_0"]] for k in ("safety", "utility"))
    z = {t: flap.flap_z(model, flap.flap_stats(model, sc._encode(tok, df, fcfg.calib))) for t, df in (("S", s), ("U", u))}
    assert lab.labels == flap.flap_labels(z["S"], z["U"], lab.shape, fcfg.h).labels
    comp = sc.estimator_comparison(base)
    df = comp["jaccard"]
    assert set(df["comparison"]) == set(sc.ESTIMATOR_COMPARISONS) and len(df) == 2 * len(sc.ESTIMATOR_COMPARISONS)
    assert ((df[["ESU", "EUU", "RU", "CU"]] >= 0) & (df[["ESU", "EUU", "RU", "CU"]] <= 1)).all().all()
    # the default's labels are the cached ones
    row = df[(df["comparison"] == "flap_vs_authors") & (df["draw"] == "seed_0")].iloc[0]
    mine, theirs = sc.labels(base), lab
    want = sum(a != b for a, b in zip(mine.labels, theirs.labels)) / len(mine.labels) * 100
    assert row["units_relabelled_pct"] == pytest.approx(want)
    table = sc.estimator_table(comp)
    assert list(table["draws"]) == [2] * len(sc.ESTIMATOR_COMPARISONS)
    no_eos = dataclasses.replace(base, calib=dataclasses.replace(base.calib, score_eos=False))
    assert int(sc._encode(tok, s, no_eos.calib)["response_mask"].sum()) == int(sc._encode(tok, s, base.calib)["response_mask"].sum()) - len(s)
    with pytest.raises(ValueError, match="scorer='wifv'"):
        sc.make_config("organism", wifv_variant="flap", scorer="wanda")
    with pytest.raises(ValueError, match="score_eos"):
        sc.make_config("organism", score_eos="no")
