"""Loading, the family adapter and the whole-model unit mask (ssah_utils.models)."""

import pytest
from safetensors import SafetensorError
import torch

from ssah_utils import models as M
from tiny_models import FAMILIES, tiny_model, tiny_tokenizer


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_reads_gqa_shapes(family):
    model = tiny_model(family)
    ad = M.adapter_for(model)
    assert ad is M.adapter_for(model)  # cached on the model
    s = ad.shape
    assert (s.n_layers, s.d_model, s.d_mlp, s.n_heads, s.n_kv_heads, s.head_dim) == (2, 32, 48, 4, 2, 8)
    assert ad.group_size == 2 and ad.family == family
    # transformers' repeat_kv: query head h reads k/v head h // group_size
    assert [ad.kv_head(h) for h in range(4)] == [0, 0, 1, 1]
    assert list(ad.group_heads(1)) == [2, 3]
    assert ad.full_kv_groups(torch.tensor([True, True, True, False])).tolist() == [True, False]
    assert ad.head_channels(torch.tensor([False, True, False, False])).nonzero().squeeze(1).tolist() == list(range(8, 16))
    assert ad.out_proj(1, "mlp") is model.model.layers[1].mlp.down_proj
    # unit parameters add up to every attention and MLP weight (biases excluded)
    weights = sum(ad.proj(l, p).weight.numel() for l in range(2)
                  for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    assert s.total_params == pytest.approx(weights)
    assert float(M.unit_params(s).sum()) == pytest.approx(weights)


def test_unsupported_architecture_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(M.UnsupportedArchitectureError, match=r"unsupported architecture 'gpt2'.*Supported families.*llama, mistral, qwen2, qwen3, gemma2, gemma3_text"):
        M.adapter_for(gpt2)


def test_load_model_from_a_saved_folder(tmp_path):
    model = tiny_model("qwen2", seed=3)
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    loaded, tok = M.load_model(str(tmp_path / "m"), device="cpu")
    assert not loaded.training and tok.pad_token is not None
    ids = torch.tensor([[2, 10, 11, 12]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    rev = M.model_revision(loaded)
    assert rev == M.model_revision(str(tmp_path / "m")) and len(rev) == 16
    with pytest.raises(FileNotFoundError, match="does not exist"):
        M.load_model(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="unknown organism model"):
        M.resolve_spec("organism:chat")


def _shape():
    return M.adapter_for(tiny_model("llama")).shape


def test_mask_set_algebra_and_counts():
    s = _shape()
    a = M.UnitMask.empty(s)
    a.mlp[0, :5] = True
    a.heads[1, 2] = True
    b = M.UnitMask.empty(s)
    b.mlp[0, 3:8] = True
    assert (a | b).n_mlp == 8 and (a & b).n_mlp == 2 and (a - b).n_units == 4
    assert (~a).n_units == 2 * (48 + 4) - 6 and (a | ~a) == M.UnitMask.full(s)
    assert a.n_params == 5 * 3 * 32 + (2 * 32 * 8 + 2 * 32 * 8 / 2)
    assert a.fraction("units") == pytest.approx(6 / 104)
    summ = a.summary()
    assert summ.loc[0, "mlp_channels"] == 5 and summ.loc[1, "heads"] == 1 and summ["params"].sum() == pytest.approx(a.n_params)
    assert M.UnitMask.from_flat(s, a.flat()) == a
    with pytest.raises(ValueError, match="mlp mask shape"):
        M.UnitMask(s, torch.zeros(3, 48, dtype=torch.bool), torch.zeros(2, 4, dtype=torch.bool))


def test_random_masks_match_size():
    s = _shape()
    ref = M.UnitMask.empty(s)
    ref.mlp[1, :7] = True
    ref.heads[0, 0] = True
    comp = ref.random_like(seed=1)
    assert (comp.n_mlp, comp.n_heads) == (7, 1) and comp.n_params == ref.n_params and comp != ref
    assert comp == ref.random_like(seed=1)  # seeded
    p = M.UnitMask.random(s, n_params=2000.0, seed=0)
    assert p.n_params <= 2000 and p.n_params > 2000 - s.params_per_head
    assert M.UnitMask.random(s, n_units=9, seed=0).n_units == 9
    with pytest.raises(ValueError, match="exactly one"):
        M.UnitMask.random(s, n_units=3, n_params=10.0)


def test_mask_round_trips_through_safetensors(tmp_path):
    s = _shape()
    m = M.UnitMask.random(s, n_units=20, seed=4)
    path = m.save(tmp_path / "esu.safetensors")
    back = M.UnitMask.load(path, expect=s)
    assert back == m and back.shape == s
    other = M.adapter_for(tiny_model("llama", num_hidden_layers=3)).shape
    with pytest.raises(ValueError, match="not UnitShape"):
        M.UnitMask.load(path, expect=other)
    (tmp_path / "bad.safetensors").write_bytes(b"")
    with pytest.raises(SafetensorError):
        M.UnitMask.load(tmp_path / "bad.safetensors")
