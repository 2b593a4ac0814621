"""Fine-tuning with exactly frozen units or only some units trainable (ssah_utils.training)."""

import dataclasses

import pytest
import torch

from ssah_utils import ablation as A
from ssah_utils import training as T
from ssah_utils.models import UnitMask, adapter_for
from tiny_models import FAMILIES, RECORDS, sample_mask, tiny_model, tiny_tokenizer

FAST = T.TrainConfig(epochs=2.0, lr=1e-2, batch_size=4, weight_decay=0.1, seed=0)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


_mask = sample_mask


def _n_weight_entries(masks: dict[str, torch.Tensor]) -> int:
    return sum(int(m.sum()) for n, m in masks.items() if n.endswith("weight"))


@pytest.mark.parametrize("family", FAMILIES)
def test_mask_entry_counts_equal_unit_params(family):
    model = tiny_model(family)
    ad = adapter_for(model)
    s = ad.shape
    mlp_only = UnitMask.empty(model)
    mlp_only.mlp[0, [3, 5]] = True
    mlp_only.mlp[1, 9] = True
    assert _n_weight_entries(T.unit_param_masks(model, mlp_only)) == mlp_only.n_params == 3 * 3 * s.d_model
    # whole GQA groups: q, o of each head and the group's k/v rows = the units' parameters exactly
    groups = UnitMask.empty(model)
    groups.heads[0, 0:2] = True
    groups.heads[1, 2:4] = True
    for kv in ("any", "all"):
        assert _n_weight_entries(T.unit_param_masks(model, groups, kv=kv)) == groups.n_params
    # one head of a group: 'any' takes the group's k/v rows, 'all' does not
    one = UnitMask.empty(model)
    one.heads[1, 1] = True
    dh = s.d_model * s.head_dim
    assert _n_weight_entries(T.unit_param_masks(model, one, kv="any")) == 2 * dh + 2 * dh
    assert _n_weight_entries(T.unit_param_masks(model, one, kv="all")) == 2 * dh
    assert one.n_params == 2 * dh + 2 * dh / s.group_size  # the unit's share lies between the two rules
    # the whole model: every projection entry, exactly the units' total
    full = UnitMask.full(model)
    assert _n_weight_entries(T.unit_param_masks(model, full)) == pytest.approx(s.total_params)
    names = set(T.unit_param_masks(model, full))
    assert not any("embed" in n or "norm" in n or "lm_head" in n for n in names)


@pytest.mark.parametrize("family", FAMILIES)
def test_masks_equal_the_entries_ablation_zeroes(family):
    """Another route to the same entries: ablation (kv='all', no compensation) zeroes exactly them."""
    model = tiny_model(family)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    mask = _mask(model)
    expected = T.unit_param_masks(model, mask, kv="all")
    with A.ablate(model, mask, None):
        zeroed = {n: p.detach() == 0 for n, p in model.named_parameters()}
    for n, z in zeroed.items():
        assert torch.equal(z, expected.get(n, torch.zeros_like(z))), n
    if family == "qwen2":  # q/k/v biases belong to their rows' units
        assert int(expected["model.layers.1.self_attn.q_proj.bias"].sum()) == adapter_for(model).head_dim


@pytest.mark.parametrize("family", FAMILIES)
def test_freeze_is_exact_under_weight_decay(family, tok):
    model = tiny_model(family, seed=3)
    mask = _mask(model)
    before = T.snapshot(model)
    out = T.finetune(model, tok, RECORDS, FAST, freeze=mask)
    assert out["steps"] == 3 and out["examples"] == 12
    ver = T.verify_frozen(before, model, mask)
    assert len(ver) == 2 * 7 + (2 * 3 if family == "qwen2" else 0)  # every projection (a lone head freezes its k/v group)
    assert int(ver["changed"].sum()) == 0 and float(ver["max_abs_diff"].max()) == 0.0
    assert int(ver["frozen_entries"].sum()) == out["frozen_params"]
    # every other entry trains: unit entries outside the mask, embeddings, norms, lm_head all moved
    frozen = T.unit_param_masks(model, mask)
    for n, p in model.named_parameters():
        free = ~frozen[n] if n in frozen else torch.ones_like(p, dtype=torch.bool)
        if free.any():
            moved = (p.detach() != before[n])[free].float().mean()
            assert moved > 0.9, (n, float(moved))


def test_gradient_mask_alone_would_not_freeze(tok):
    """The reason for the restore: with weight decay, an entry with zero gradient still moves."""
    model = tiny_model("llama", seed=3)
    w = model.model.layers[0].mlp.gate_proj.weight
    w0 = w.detach().clone()
    opt = torch.optim.AdamW([w], lr=1e-2, weight_decay=0.1)
    w.grad = torch.zeros_like(w)
    opt.step()
    assert (w.detach() != w0).any()


@pytest.mark.parametrize("family", FAMILIES)
def test_train_only_changes_nothing_outside(family, tok):
    model = tiny_model(family, seed=4)
    mask = _mask(model)
    before = T.snapshot(model)
    out = T.finetune(model, tok, RECORDS, FAST, train_only=mask)
    ver = T.verify_frozen(before, model, ~mask, kv="any", include_other=True)
    assert int(ver["changed"].sum()) == 0
    assert int(ver["frozen_entries"].sum()) == out["frozen_params"]
    assert any("embed" in n for n in ver["param"])
    trained = T.unit_param_masks(model, mask, kv="all")
    assert out["trainable_params"] == sum(int(m.sum()) for m in trained.values())
    w = dict(model.named_parameters())["model.layers.0.mlp.gate_proj.weight"]
    assert (w.detach() != before["model.layers.0.mlp.gate_proj.weight"])[[1, 7, 30]].all()
    # train_other=True: embeddings and norms train too, unit entries outside the mask still do not
    model2 = tiny_model(family, seed=4)
    T.finetune(model2, tok, RECORDS, FAST, train_only=mask, train_other=True)
    emb = model2.get_input_embeddings().weight
    assert (emb.detach() != before[[n for n in before if "embed" in n][0]]).any()
    ver2 = T.verify_frozen(before, model2, ~mask, kv="any")
    assert int(ver2["changed"].sum()) == 0


def test_loss_decreases_on_a_repeated_set(tok):
    model = tiny_model("llama", seed=5)
    cfg = T.TrainConfig(epochs=30, lr=1e-2, batch_size=6, grad_clip=1.0, schedule="cosine", warmup_frac=0.1)
    out = T.finetune(model, tok, RECORDS, cfg)
    assert out["final_loss"] < 0.25 * out["initial_loss"]
    assert list(out["losses"].columns) == ["step", "loss"] and len(out["losses"]) == out["steps"] == 30
    assert out["frozen_params"] == 0 and out["trainable_params"] == sum(p.numel() for p in model.parameters())


def test_same_seed_same_weights_and_micro_batches(tok):
    def run(**kw):
        model = tiny_model("mistral", seed=6)
        T.finetune(model, tok, RECORDS, dataclasses.replace(FAST, **kw), freeze=_mask(model))
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    a, b = run(), run()
    assert torch.equal(a, b)
    assert not torch.equal(a, run(seed=1))  # another data order
    torch.testing.assert_close(run(micro_batch_size=1), a, rtol=1e-4, atol=1e-5)  # accumulation = one batch


def test_batches_cover_each_record_once_per_epoch():
    cfg = T.TrainConfig(epochs=2.5, batch_size=4, seed=3)
    batches = T._batches(6, cfg)
    flat = [i for b in batches for i in b]
    assert len(flat) == 15 and sorted(flat[:6]) == list(range(6)) and sorted(flat[6:12]) == list(range(6))
    assert [len(b) for b in batches] == [4, 4, 4, 3]


def test_bad_inputs(tok):
    model = tiny_model("llama")
    other = tiny_model("llama", intermediate_size=40)
    with pytest.raises(ValueError, match="not both"):
        T.finetune(model, tok, RECORDS, FAST, freeze=_mask(model), train_only=_mask(model))
    with pytest.raises(ValueError, match="shaped"):
        T.finetune(model, tok, RECORDS, FAST, freeze=UnitMask.empty(other))
    with pytest.raises(ValueError, match="shaped"):
        T.unit_param_masks(model, UnitMask.empty(other))
    with pytest.raises(ValueError, match="epochs must be a positive"):
        T.TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="schedule must be one of"):
        T.TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="style must be one of"):
        T.TrainConfig(style="alpaca")
    with pytest.raises(ValueError, match="kv must be one of"):
        T.unit_param_masks(model, _mask(model), kv="some")
    with pytest.raises(ValueError, match="at least one record"):
        T.finetune(model, tok, [], FAST)
    with pytest.raises(ValueError, match="'prompt' and 'reference'"):
        T.finetune(model, tok, [{"prompt": "a"}], FAST)
    with pytest.raises(ValueError, match="nothing to train"):
        T.finetune(model, tok, RECORDS, FAST, train_only=UnitMask.empty(model))


def test_response_loss_matches_hf_loss_on_response_tokens(tok):
    from ssah_utils.generation import encode_pairs

    model = tiny_model("qwen2", seed=7)
    enc = encode_pairs(tok, [r["prompt"] for r in RECORDS], [r["reference"] for r in RECORDS])
    labels = enc["input_ids"].masked_fill(enc["response_mask"] == 0, -100)
    with torch.no_grad():
        ref = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss
    got = T.response_loss(model, tok, RECORDS, T.TrainConfig(), batch_size=4)  # two batches of unequal size
    assert got == pytest.approx(float(ref), rel=1e-5)


def _changed_fraction(before, model) -> float:
    n = sum(p.numel() for p in model.parameters())
    return sum(int((p.detach() != before[k]).sum()) for k, p in model.named_parameters()) / n


def test_bf16_trains_through_float32_master_weights(tok):
    """A bf16 model at a real recipe's lr (40 steps): without master weights most AdamW updates are
    smaller than half a bf16 step of the weight and round away, every step again. Measured: 86% of the
    entries moved and the result lies 0.10 update-lengths from the float32 run's, against 27% and 0.87
    without master weights."""
    cfg = T.TrainConfig(epochs=40 * 4 / len(RECORDS), lr=2e-5, batch_size=4, seed=0)
    ref = tiny_model("llama", seed=3).to(torch.bfloat16).float()  # same start, trained in float32
    start = T.snapshot(ref)
    T.finetune(ref, tok, RECORDS, cfg)
    ref_p = dict(ref.named_parameters())
    update = sum(float((ref_p[k].detach() - start[k]).norm() ** 2) for k in start) ** 0.5
    frac, dist = {}, {}
    for mw in T.MASTER_WEIGHTS:
        model = tiny_model("llama", seed=3).to(torch.bfloat16)
        before = T.snapshot(model)
        out = T.finetune(model, tok, RECORDS, dataclasses.replace(cfg, master_weights=mw))
        assert out["master_weights"] is (mw == "auto") and out["steps"] == 40
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        frac[mw] = _changed_fraction(before, model)
        dist[mw] = sum(float((p.detach().float() - ref_p[k].detach()).norm() ** 2)
                       for k, p in model.named_parameters()) ** 0.5 / update
    assert frac["auto"] > 0.8 and frac["off"] < 0.5, frac
    assert dist["auto"] < 0.3 and dist["off"] > 0.6, dist


def test_bf16_freeze_is_exact_with_master_weights(tok):
    model = tiny_model("mistral", seed=3).to(torch.bfloat16)
    mask = _mask(model)
    before = T.snapshot(model)
    out = T.finetune(model, tok, RECORDS, FAST, freeze=mask)
    assert out["master_weights"]
    ver = T.verify_frozen(before, model, mask)
    assert int(ver["changed"].sum()) == 0 and float(ver["max_abs_diff"].max()) == 0.0
    assert _changed_fraction(before, model) > 0.5


def test_fp32_model_uses_no_master_copy(tok):
    model = tiny_model("llama", seed=3)
    assert T.finetune(model, tok, RECORDS[:4], dataclasses.replace(FAST, epochs=1.0))["master_weights"] is False
    with pytest.raises(ValueError, match="master_weights"):
        T.TrainConfig(master_weights="on")
