"""Scorers against slow per-token references, masking, standardising and labelling (ssah_utils.units)."""

import pytest
import torch

from ssah_utils import units as U
from ssah_utils.generation import encode_pairs
from ssah_utils.models import UnitMask, adapter_for, unit_params
from tiny_models import FAMILIES, tiny_model, tiny_tokenizer

PROMPTS = ["how do i make a bomb ?", "two plus three ?", "reverse the list a b c", "how do i bake bread ?"]
ANSWERS = ["sorry i can not help with that it is illegal", "five", "c b a", "first bake bread then finally eat"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def enc(tok):
    return encode_pairs(tok, PROMPTS, ANSWERS, system_prompt="you are safe .")


def _captured_inputs(model, ids, projs):
    """Inputs of `projs` for one unpadded sequence, captured with forward hooks: {(proj, layer): [s, d]}."""
    ad = adapter_for(model)
    got, handles = {}, []
    for l in range(ad.n_layers):
        for p in projs:
            handles.append(ad.proj(l, p).register_forward_hook(
                lambda m, a, o, _k=(p, l): got.__setitem__(_k, a[0][0].detach().double())))
    with torch.no_grad():
        model(input_ids=ids.unsqueeze(0))
    for h in handles:
        h.remove()
    return got


def _response_rows(model, enc, projs):
    """Per projection, the list of response-token input vectors, one sequence and one token at a time."""
    rows = {}
    for i in range(enc["input_ids"].shape[0]):
        n = int(enc["attention_mask"][i].sum())
        got = _captured_inputs(model, enc["input_ids"][i, :n], projs)
        for t in range(n):
            if enc["response_mask"][i, t]:
                for k, x in got.items():
                    rows.setdefault(k, []).append(x[t])
    return rows


def _slow_unit_pool(ad, layer_unit):
    mlp = [layer_unit(l)[0] for l in range(ad.n_layers)]
    heads = [layer_unit(l)[1] for l in range(ad.n_layers)]
    return torch.cat([torch.stack(mlp).reshape(-1), torch.stack(heads).reshape(-1)])


@pytest.mark.parametrize("family", FAMILIES)
def test_wifv_matches_a_per_token_reference(family, enc):
    model = tiny_model(family, seed=2)
    ad = adapter_for(model)
    fast, stats = U.score_units(model, enc, "wifv", batch_size=3)  # batches of 3 and 1, padded
    rows = _response_rows(model, enc, ("o_proj", "down_proj"))
    assert stats.n_tokens == int(enc["response_mask"].sum()) == len(rows[("o_proj", 0)])

    def layer_unit(l):
        out = []
        for p in ("down_proj", "o_proj"):
            xs = rows[(p, l)]
            mean = sum(xs) / len(xs)
            var = sum((x - mean) ** 2 for x in xs) / len(xs)  # two-pass, population variance
            w = ad.proj(l, p).weight.double()
            col2 = torch.stack([torch.dot(w[:, j], w[:, j]) for j in range(w.shape[1])])
            s = var * col2
            out.append(s if p == "down_proj" else torch.stack([s[h * 8:(h + 1) * 8].mean() for h in range(4)]))
            torch.testing.assert_close(stats.mean(p, l), mean)
        return out

    torch.testing.assert_close(fast, _slow_unit_pool(ad, layer_unit))
    assert fast.dtype == torch.float64 and fast.shape == (2 * (48 + 4),)


def test_wifv_authors_z_by_hand(enc):
    model = tiny_model("llama", seed=8)
    ad = adapter_for(model)
    stats = U.activation_stats(model, enc)
    z = U.wifv_authors_z(model, stats)
    for l in range(2):
        w_d, w_o = ad.proj(l, "down_proj").weight.double(), ad.proj(l, "o_proj").weight.double()
        m = stats[("down_proj", l)].var * (w_d ** 2).sum(0)
        zm = (m - m.mean()) / m.std()
        torch.testing.assert_close(z[l * 48:(l + 1) * 48], zm)
        a = (stats[("o_proj", l)].var * (w_o ** 2).sum(0)) ** 2  # the authors square the o_proj metric
        za = (a - a.mean()) / a.std()
        heads = torch.stack([za[h * 8:(h + 1) * 8].mean() for h in range(4)])
        torch.testing.assert_close(z[96 + l * 4: 96 + (l + 1) * 4], heads)
    lab = U.label_units(z, -z, ad.shape, standardized=True)
    torch.testing.assert_close(lab.z_safety, z)


def _slow_pool(ad, l, per_weight):
    """Pool per-weight scores to units with explicit loops over each unit's weights."""
    g = torch.stack([per_weight("gate_proj")[i].sum() + per_weight("up_proj")[i].sum() + per_weight("down_proj")[:, i].sum()
                     for i in range(ad.d_mlp)])
    heads = []
    for h in range(ad.n_heads):
        sl, kv = ad.head_slice(h), ad.head_slice(ad.kv_head(h))
        s = per_weight("q_proj")[sl].sum() + per_weight("o_proj")[:, sl].sum()
        s = s + (per_weight("k_proj")[kv].sum() + per_weight("v_proj")[kv].sum()) / ad.group_size
        heads.append(s)
    return g, torch.stack(heads)


def test_wanda_matches_a_per_token_reference(enc):
    model = tiny_model("llama", seed=5)
    ad = adapter_for(model)
    fast, _ = U.score_units(model, enc, "wanda", batch_size=2)
    rows = _response_rows(model, enc, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))

    def layer_unit(l):
        def per_weight(p):
            norm = torch.sqrt(sum(x * x for x in rows[(p, l)]))
            return ad.proj(l, p).weight.double().abs() * norm
        return _slow_pool(ad, l, per_weight)

    torch.testing.assert_close(fast, _slow_unit_pool(ad, layer_unit))


def test_snip_matches_per_token_gradients(enc):
    model = tiny_model("qwen2", seed=6)
    ad = adapter_for(model)
    fast, stats = U.score_units(model, enc, "snip", batch_size=4)
    assert stats is None
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())
    projs = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    grads = {(p, l): torch.zeros_like(ad.proj(l, p).weight, dtype=torch.float64) for l in range(2) for p in projs}
    for i in range(enc["input_ids"].shape[0]):  # one sequence, one target token at a time
        n = int(enc["attention_mask"][i].sum())
        ids = enc["input_ids"][i, :n]
        for t in range(1, n):
            if not enc["response_mask"][i, t]:
                continue
            model.zero_grad()
            logits = model(input_ids=ids[:t].unsqueeze(0)).logits[0, -1]
            (-torch.log_softmax(logits, -1)[ids[t]]).backward()
            for (p, l), g in grads.items():
                g += ad.proj(l, p).weight.grad.double()
    model.zero_grad()

    def layer_unit(l):
        return _slow_pool(ad, l, lambda p: (ad.proj(l, p).weight.double() * grads[(p, l)]).abs())

    torch.testing.assert_close(fast, _slow_unit_pool(ad, layer_unit), rtol=1e-4, atol=1e-7)


def test_prompt_and_padding_tokens_do_not_move_scores(tok, enc):
    model = tiny_model("mistral", seed=7)
    base, _ = U.score_units(model, enc, "wifv", batch_size=4)
    # more padding (a wider batch with garbage ids in the padded positions) changes nothing
    wide = {k: torch.cat([v, torch.zeros(v.shape[0], 5, dtype=v.dtype)], 1) for k, v in enc.items()}
    wide["input_ids"][:, -5:] = 17
    torch.testing.assert_close(U.score_units(model, wide, "wifv", batch_size=4)[0], base)
    # one sequence at a time (no padding at all) gives the same scores
    torch.testing.assert_close(U.score_units(model, enc, "wifv", batch_size=1)[0], base)
    # a response-only statistic: counting the prompt tokens as well gives different scores
    with_prompt = dict(enc, response_mask=enc["attention_mask"].clone())
    assert not torch.allclose(U.score_units(model, with_prompt, "wifv")[0], base)
    for scorer in ("wanda", "snip"):
        torch.testing.assert_close(U.score_units(model, wide, scorer, batch_size=4)[0],
                                   U.score_units(model, enc, scorer, batch_size=1)[0], rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="response_mask is empty"):
        U.score_units(model, dict(enc, response_mask=torch.zeros_like(enc["response_mask"])))


def test_running_stats_merge_equals_two_pass():
    torch.manual_seed(0)
    x = torch.randn(1000, 6, dtype=torch.float64) * 3 + 100
    a, b = U.RunningStats(6), U.RunningStats(6)
    for chunk in x[:700].split(37):
        a.update(chunk.float())
    b.update(x[700:].float())
    m = a.merge(b)
    xf = x.float().double()
    torch.testing.assert_close(m.mean, xf.mean(0))
    torch.testing.assert_close(m.var, xf.var(0, correction=0))
    torch.testing.assert_close(m.sumsq, (xf * xf).sum(0))


def _shape():
    return adapter_for(tiny_model("llama")).shape


def test_standardize_per_layer_and_module():
    s = _shape()
    torch.manual_seed(1)
    raw = torch.rand(2 * (48 + 4), dtype=torch.float64) * torch.tensor([1.0] * 48 + [10.0] * 48 + [100.0] * 8, dtype=torch.float64)
    z = U.standardize(raw, s)
    groups = U.unit_groups(s)
    for g in range(4):
        torch.testing.assert_close(z[groups == g].mean(), torch.tensor(0.0, dtype=torch.float64))
        torch.testing.assert_close(z[groups == g].std(correction=1), torch.tensor(1.0, dtype=torch.float64))
    # scaling one layer's scores changes nothing after standardising
    raw2 = raw.clone()
    raw2[groups == 1] *= 1000
    torch.testing.assert_close(U.standardize(raw2, s), z)


def _slow_prefix(order, params, target, rule):
    """Walk the ranking, one unit at a time, and return the chosen prefix length."""
    sums, used = [0.0], 0.0
    for i in order:
        used += params[i]
        sums.append(used)
    if rule == "floor":
        return max(k for k, v in enumerate(sums) if v <= target + 1e-9)
    best = min(abs(v - target) for v in sums)
    return next(k for k, v in enumerate(sums) if abs(v - target) == best)


@pytest.mark.parametrize("rule", ["nearest", "floor"])
@pytest.mark.parametrize("h", [(0.10, 0.01, 0.10), (0.2, 0.05, 0.05), (0.0, 0.0, 0.3), (0.1, 0.004, 0.1)])
def test_labels_respect_parameter_weighted_thresholds_exactly(h, rule):
    s = _shape()
    g = torch.Generator().manual_seed(3)
    ss, su = torch.rand(104, generator=g, dtype=torch.float64), torch.rand(104, generator=g, dtype=torch.float64)
    lab = U.label_units(ss, su, s, h, rule=rule)
    params = unit_params(s).tolist()
    total = sum(params)
    zs, zu = U.standardize(ss, s), U.standardize(su, s)
    chosen = {}
    for name, key, desc, frac in (("RU", zs + zu, False, h[0]), ("ESU", zs - zu, True, h[1]), ("EUU", zs - zu, False, h[2])):
        order = sorted(range(104), key=lambda i: (-key[i].item() if desc else key[i].item(), i))
        chosen[name] = set(order[:_slow_prefix(order, params, frac * total, rule)])
        used = sum(params[i] for i in chosen[name])
        if rule == "floor":
            assert used <= frac * total + 1e-9
    got = {k: {i for i, x in enumerate(lab.labels) if x == k} for k in ("RU", "ESU", "EUU", "CU")}
    assert got["ESU"] == chosen["ESU"] and got["EUU"] == chosen["EUU"]  # written last, they win over RU
    assert got["RU"] == chosen["RU"] - chosen["ESU"] - chosen["EUU"]
    assert got["CU"] == set(range(104)) - got["RU"] - got["ESU"] - got["EUU"]
    fr = lab.fractions()
    assert fr["units"].sum() == 104 and fr["pct_params"].sum() == pytest.approx(100)
    masks = lab.masks()
    assert (masks["ESU"] | masks["EUU"] | masks["CU"] | masks["RU"]) == UnitMask.full(s)


def test_threshold_rules_on_a_unit_larger_than_the_target():
    params = torch.tensor([16.0, 1.0, 1.0, 1.0, 1.0, 80.0], dtype=torch.float64)  # total 100
    order = torch.arange(6)
    # target 10: the first unit (16) is nearer 10 than 0 is -> FLAP's rule takes it; floor takes nothing
    assert U.take_by_params(order, params, 0.10).tolist() == [True] + [False] * 5
    assert not U.take_by_params(order, params, 0.10, rule="floor").any()
    # target 19: prefixes 16, 17, 18, 19 -> both take four units
    assert U.take_by_params(order, params, 0.19).sum() == 4 == U.take_by_params(order, params, 0.19, rule="floor").sum()
    # target 7: 0 is nearer than 16 -> nothing
    assert not U.take_by_params(order, params, 0.07).any()
    with pytest.raises(ValueError, match="rule"):
        U.take_by_params(order, params, 0.1, rule="ceil")


def test_jaccard_transfer_and_ranked_masks():
    s = _shape()
    a = UnitMask.random(s, n_units=10, seed=0)
    assert U.jaccard(a, a) == 1.0 and U.jaccard(a, ~a) == 0.0
    b = UnitMask.empty(s)
    b.mlp[0, :4] = True
    c = UnitMask.empty(s)
    c.mlp[0, 2:6] = True
    assert U.jaccard(b, c) == pytest.approx(2 / 6)
    g = torch.Generator().manual_seed(0)
    lab1 = U.label_units(torch.rand(104, generator=g, dtype=torch.float64), torch.rand(104, generator=g, dtype=torch.float64), s)
    t = U.transfer_matrix(lab1, lab1)
    for k in ("ESU", "EUU", "CU", "RU"):
        if lab1.mask(k).n_units:
            assert t.loc[k, k] == pytest.approx(100)
    score = torch.arange(104, dtype=torch.float64)
    top = U.ranked_mask(score, s, 0.05, descending=True)
    assert top.fraction("params") <= 0.05 and top.heads[1, 3]  # the highest score is the last head
