"""The family suite's own checks: supported = tested, heads and MLP channels are separable units in every
supported family (removing one leaves the others' outputs unchanged), and a family whose attention norms
span all heads (OLMo-2) is refused by its structure, with the isolation failure that justifies it measured.

The rest of the suite is every test parametrized over `tiny_models.FAMILIES`: WIFV against a per-token
reference (test_units), ablation by hand and GQA groups (test_ablation, test_models), bit-exact freezing and
training inside a mask (test_training), batched generation equal to one by one (test_generation)."""

import pytest
import torch

from ssah_utils import ablation as A
from ssah_utils import models as M
from ssah_utils.models import UnitMask, adapter_for
from tiny_models import FAMILIES, tiny_model

IDS = torch.tensor([[2, 10, 11, 12, 13, 14, 15], [2, 20, 21, 22, 23, 24, 25]])


def test_supported_families_are_the_tested_families():
    assert tuple(M.SUPPORTED_FAMILIES) == FAMILIES
    for family in FAMILIES:
        assert adapter_for(tiny_model(family)).family == family


def _unit_inputs(model, layer: int = 0) -> dict[str, torch.Tensor]:
    """The inputs of o_proj (heads' outputs) and down_proj (MLP channels) at `layer`."""
    ad, seen, hs = adapter_for(model), {}, []
    for proj in ("o_proj", "down_proj"):
        hs.append(ad.proj(layer, proj).register_forward_pre_hook(
            lambda mod, args, _p=proj: seen.__setitem__(_p, args[0].detach().clone())))
    with torch.no_grad():
        model(input_ids=IDS)
    for h in hs:
        h.remove()
    return seen


def _head_isolation(model, heads: list[int]) -> float:
    """Largest relative change of the surviving heads' outputs at layer 0 when `heads` are removed."""
    ad = adapter_for(model)
    before = _unit_inputs(model)["o_proj"]
    mask = UnitMask.empty(model)
    mask.heads[0, heads] = True
    with A.ablate(model, mask, None):
        after = _unit_inputs(model)["o_proj"]
    keep = ~ad.head_channels(mask.heads[0])
    return float((after[..., keep] - before[..., keep]).abs().max() / before[..., keep].abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_a_head_or_channel_leaves_the_others_unchanged(family):
    model = tiny_model(family, seed=5)
    assert _head_isolation(model, [1]) == 0.0  # one head of a GQA group: its k/v group stays
    assert _head_isolation(model, [2, 3]) == 0.0  # a whole k/v group goes
    before = _unit_inputs(model)["down_proj"]
    mask = UnitMask.empty(model)
    mask.mlp[0, [0, 5, 17]] = True
    with A.ablate(model, mask, None):
        after = _unit_inputs(model)["down_proj"]
    assert torch.equal(after[..., ~mask.mlp[0]], before[..., ~mask.mlp[0]])
    assert float(after[..., mask.mlp[0]].abs().max()) == 0.0


def test_olmo2_is_refused_by_its_structure_and_would_be_wrong():
    olmo = tiny_model("olmo2", seed=5)
    with pytest.raises(M.UnsupportedArchitectureError, match=r"'olmo2'.*self_attn.q_norm has 32 weights, not "
                                                             r"head_dim=8: it normalises across heads"):
        adapter_for(olmo)
    # Why: with the norm over all heads, zeroing one head's q_proj rows (what ablation does) moves the other
    # heads' outputs; the same edit on Qwen3 (per-head norms) leaves them exactly as they were.
    for model, moves in ((olmo, True), (tiny_model("qwen3", seed=5), False)):
        attn, hd = model.model.layers[0].self_attn, 8
        seen = {}
        h = attn.o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach().clone()))
        with torch.no_grad():
            model(input_ids=IDS)
            before = seen["x"]
            attn.q_proj.weight[hd:2 * hd] = 0.0  # head 1
            model(input_ids=IDS)
        h.remove()
        others = torch.cat([seen["x"][..., :hd], seen["x"][..., 2 * hd:]], -1)
        ref = torch.cat([before[..., :hd], before[..., 2 * hd:]], -1)
        change = float((others - ref).abs().max() / ref.abs().max())
        assert (change > 1e-3) if moves else (change == 0.0), (model.config.model_type, change)


def test_an_untested_family_with_the_same_module_names_is_refused():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("granite", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(M.UnsupportedArchitectureError, match="'granite'.*not a tested family"):
        adapter_for(AutoModelForCausalLM.from_config(cfg))
