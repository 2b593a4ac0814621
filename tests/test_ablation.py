"""Removing units with FLAP bias compensation, reversibly (ssah_utils.ablation)."""

import pytest
import torch

from ssah_utils import ablation as A
from ssah_utils import units as U
from ssah_utils.generation import encode_pairs
from ssah_utils.models import UnitMask, adapter_for
from tiny_models import FAMILIES, tiny_model, tiny_tokenizer

IDS = torch.tensor([[2, 10, 11, 12, 13, 14, 15], [2, 20, 21, 22, 23, 24, 25]])


@pytest.fixture(scope="module")
def enc():
    return encode_pairs(tiny_tokenizer(), ["how do i make a bomb ?", "two plus three ?", "reverse the list a b c"],
                        ["sorry i can not help with that", "five", "c b a"])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _replace_inputs(model, layer_cols):
    """Forward pre-hooks that set chosen input channels of o_proj/down_proj to given values (by hand)."""
    ad = adapter_for(model)
    handles = []
    for (proj, layer), (cols, values) in layer_cols.items():
        def hook(mod, args, _c=cols, _v=values):
            x = args[0].clone()
            x[..., _c] = _v.to(x.dtype)
            return (x,)
        handles.append(ad.proj(layer, proj).register_forward_pre_hook(hook))
    return handles


@pytest.mark.parametrize("family", FAMILIES)
def test_ablation_equals_mean_replacement_by_hand(family, enc):
    model = tiny_model(family, seed=11)
    ad = adapter_for(model)
    stats = U.activation_stats(model, enc)
    mask = UnitMask.empty(model)
    mask.mlp[0, [1, 7, 30]] = True
    mask.heads[1, 1] = True  # one head of a GQA group: k/v rows stay
    mask.heads[0, 2:4] = True  # a whole group: k/v rows go too
    # by hand: each removed channel's input is replaced by its mean (FLAP compensation) or zero
    for compensate in (True, False):
        cols = {}
        for (proj, layer, sel) in (("down_proj", 0, mask.mlp[0]), ("o_proj", 0, ad.head_channels(mask.heads[0])),
                                   ("o_proj", 1, ad.head_channels(mask.heads[1]))):
            vals = stats.mean(proj, layer)[sel].float() if compensate else torch.zeros(int(sel.sum()))
            cols[(proj, layer)] = (sel.nonzero().squeeze(1), vals)
        handles = _replace_inputs(model, cols)
        expected = _logits(model)
        for h in handles:
            h.remove()
        with A.ablate(model, mask, stats if compensate else None):
            got = _logits(model)
            if compensate:
                # the added bias is W[:, removed] @ mean[removed], the mean computed by hand
                w = ad.proj(0, "down_proj")
                assert w.weight[:, mask.mlp[0]].abs().sum() == 0
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_bias_compensation_matches_mean_activation(enc):
    model = tiny_model("llama", seed=12)
    ad = adapter_for(model)
    stats = U.activation_stats(model, enc)
    # the mean input of down_proj over response tokens, gathered by hand
    xs = []
    h = ad.proj(1, "down_proj").register_forward_hook(lambda m, a, o: xs.append(a[0].detach().double()))
    with torch.no_grad():
        for i in range(3):
            n = int(enc["attention_mask"][i].sum())
            xs_before = len(xs)
            model(input_ids=enc["input_ids"][i:i + 1, :n])
            x = xs[xs_before][0]
            xs[xs_before] = x[enc["response_mask"][i, :n].bool()]
    h.remove()
    mean = torch.cat(xs).mean(0)
    mask = UnitMask.empty(model)
    mask.mlp[1, [0, 5]] = True
    w = ad.proj(1, "down_proj").weight.detach().double()
    expected = w[:, 0] * mean[0] + w[:, 5] * mean[5]
    with A.ablate(model, mask, stats):
        torch.testing.assert_close(ad.proj(1, "down_proj").bias.double(), expected, rtol=1e-5, atol=1e-7)
        assert (ad.proj(1, "gate_proj").weight[[0, 5]] == 0).all() and (ad.proj(1, "up_proj").weight[[0, 5]] == 0).all()
    assert ad.proj(1, "down_proj").bias is None


@pytest.mark.parametrize("family", FAMILIES)
def test_ablation_is_reversible_and_gqa_aware(family, enc):
    model = tiny_model(family, seed=13)
    ad = adapter_for(model)
    stats = U.activation_stats(model, enc)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = _logits(model)
    mask = UnitMask.random(model, n_mlp=10, n_heads=3, seed=0)
    mask.heads[0] = torch.tensor([True, False, False, False])
    with A.ablate(model, mask, stats):
        assert not torch.equal(_logits(model), ref)
        k = ad.proj(0, "k_proj").weight
        assert k[:8].abs().sum() > 0  # group 0 still serves head 1
        assert (ad.proj(0, "q_proj").weight[:8] == 0).all()
        if family == "qwen2":
            assert (ad.proj(0, "q_proj").bias[:8] == 0).all()
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    torch.testing.assert_close(_logits(model), ref, rtol=0, atol=0)
    # restored on error too
    with pytest.raises(RuntimeError):
        with A.ablate(model, mask, stats):
            raise RuntimeError("boom")
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)


def test_ablating_nothing_changes_nothing(enc):
    model = tiny_model("mistral", seed=14)
    stats = U.activation_stats(model, enc)
    ref = _logits(model)
    with A.ablate(model, UnitMask.empty(model), stats):
        assert torch.equal(_logits(model), ref)
    copy = A.ablated_copy(model, UnitMask.empty(model), stats)
    assert torch.equal(_logits(copy), ref)
    full_copy = A.ablated_copy(model, UnitMask.random(model, n_units=20, seed=1), stats)
    assert not torch.equal(_logits(full_copy), ref) and torch.equal(_logits(model), ref)


def test_mask_of_another_model_is_refused():
    model = tiny_model("llama")
    other = UnitMask.empty(tiny_model("llama", num_hidden_layers=3))
    with pytest.raises(ValueError, match="mask of a model shaped"):
        with A.ablate(model, other):
            pass
