"""Tests of ssah_utils.probing: hooks, residual capture, the cosine-distance protocol, probes, directions."""

from __future__ import annotations

import math

import pytest
import torch

from ssah_utils import generation, probing
from tiny_models import FAMILIES, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# ---------------------------------------------------------------------------------------------- hooks

def test_hooks_are_removed_on_error():
    model = tiny_model("llama")
    calls = []
    before = probing.n_hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with probing.add_hooks([(m, lambda *a: calls.append(1)) for m in probing.residual_points(model)],
                               [(model.model.norm, lambda *a: None)]):
            assert probing.n_hooks(model) == before + 4  # embedding + 2 blocks + 1 pre-hook
            model(input_ids=torch.tensor([[2, 10, 11]]))
            raise RuntimeError("boom")
    assert calls == [1, 1, 1]
    assert probing.n_hooks(model) == before


def test_capture_removes_hooks_when_forward_fails():
    model = tiny_model("llama")
    before = probing.n_hooks(model)
    with pytest.raises(IndexError):
        probing.capture_residual(model, [[2, 10, 500]])  # token id beyond the vocabulary
    assert probing.n_hooks(model) == before


# ---------------------------------------------------------------------------------------------- capture

@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_capture_the_residual_stream_of_output_hidden_states(family, tok):
    model = tiny_model(family, vocab_size=len(tok))
    rows = probing.prompt_token_ids(tok, ["how do i bake bread ?", "steal money", "what is two plus three ?"])
    L = model.config.num_hidden_layers
    before = probing.n_hooks(model)
    got_last = probing.capture_residual(model, rows, position="last", batch_size=2, pad_id=tok.pad_token_id)
    got_mean = probing.capture_residual(model, rows, position="mean", batch_size=3, pad_id=tok.pad_token_id)
    assert probing.n_hooks(model) == before  # (transformers adds its own hooks for output_hidden_states below)
    assert got_last.shape == (3, L + 1, model.config.hidden_size)
    for i, r in enumerate(rows):  # reference: each sequence alone, unpadded, through output_hidden_states
        with torch.no_grad():
            hs = model(input_ids=torch.tensor([r]), output_hidden_states=True).hidden_states
        assert len(hs) == L + 1
        for p in range(L):
            torch.testing.assert_close(got_last[i, p], hs[p][0, -1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got_mean[i, p], hs[p][0].mean(0), rtol=1e-5, atol=1e-5)
        # transformers' last hidden state is the normed block output; ours is the block output itself
        torch.testing.assert_close(model.model.norm(got_last[i, L]), hs[L][0, -1], rtol=1e-5, atol=1e-5)


def test_prompt_token_ids_match_generation_encoding(tok):
    rows = probing.prompt_token_ids(tok, ["how do i bake bread ?"], system_prompt="you are helpful")
    enc = generation.encode_prompts(tok, ["how do i bake bread ?"], system_prompt="you are helpful")
    assert rows == [enc["input_ids"][0].tolist()]
    assert rows[0][0] == tok.bos_token_id and tok.convert_ids_to_tokens(rows[0][-1]) == "[/INST]"


# ---------------------------------------------------------------------------------------------- cosine distance

def test_cosine_distance_against_hand_computation():
    a = torch.tensor([1.0, 0.0, 0.0])
    b = torch.tensor([1.0, 1.0, 0.0])
    c = torch.tensor([-2.0, 0.0, 0.0])
    assert probing.cosine_distance(a, a).item() == pytest.approx(0.0, abs=1e-7)
    assert probing.cosine_distance(a, b).item() == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-7)
    assert probing.cosine_distance(a, c).item() == pytest.approx(2.0, abs=1e-7)
    x, y = torch.tensor([3.0, 4.0]), torch.tensor([4.0, -3.0])
    assert probing.cosine_distance(x, y).item() == pytest.approx(1.0, abs=1e-7)  # orthogonal
    x2, y2 = torch.tensor([1.0, 2.0, 2.0]), torch.tensor([2.0, 1.0, 2.0])
    assert probing.cosine_distance(x2, y2).item() == pytest.approx(1 - 8 / 9, abs=1e-7)  # (2+2+4)/(3*3)


def test_continuation_distances_are_those_of_the_captured_states(tok):
    model = tiny_model("qwen2", vocab_size=len(tok))
    prompts = ["how do i steal money ?", "how do i bake bread ?"]
    conts = {"refusal": ["sorry i can not help with that", "sorry i can not"],  # 2nd: only 4 tokens
             "compliance": ["sure here is step 1 first then", "sure here is step 1 first then"]}
    df = probing.continuation_distances(model, tok, prompts, conts, lengths=(2, 6), batch_size=3)
    L = model.config.num_hidden_layers
    assert set(df["point"]) == set(range(L + 1))
    # the 6-token refusal of prompt 1 does not exist: left out, not padded
    assert df.query("prompt_idx == 1 and continuation == 'refusal'")["n_tokens"].unique().tolist() == [2]
    base = probing.prompt_token_ids(tok, prompts)
    cont = probing.continuation_ids(tok, conts["compliance"][0])
    H = probing.capture_residual(model, [base[0], base[0] + cont[:6]], pad_id=tok.pad_token_id)
    want = probing.cosine_distance(H[0], H[1])
    got = df.query("prompt_idx == 0 and continuation == 'compliance' and n_tokens == 6").sort_values("point")
    torch.testing.assert_close(torch.tensor(got["distance"].to_numpy()), want, rtol=1e-5, atol=1e-6)
    gap = probing.distance_gap(df, n_tokens=2)
    assert list(gap.index) == list(range(L + 1)) and (gap["abs_gap"] >= 0).all()


# ---------------------------------------------------------------------------------------------- probes, directions

def test_group_split_shares_no_group():
    groups = [f"activity{i % 7}" for i in range(40)]
    train, test = probing.group_split(groups, test_frac=0.3, seed=1)
    assert sorted(train + test) == list(range(40))
    assert not {groups[i] for i in train} & {groups[i] for i in test}
    with pytest.raises(ValueError, match="two distinct groups"):
        probing.group_split(["a"] * 5)


def test_logistic_probe_separates_and_reports_chance_on_noise():
    g = torch.Generator().manual_seed(0)
    n, d = 120, 8
    y = (torch.arange(n) % 2).float()
    X = torch.randn(n, 2, d, generator=g)
    X[:, 1, 0] += 3.0 * (2 * y - 1)  # point 1 carries the label, point 0 is noise
    groups = [f"g{i // 4}" for i in range(n)]
    df = probing.probe_layers(X, y, groups, seed=0)
    assert df.loc[1, "test_acc"] > 0.95
    assert abs(df.loc[0, "test_acc"] - 0.5) < 0.25
    assert probing.balanced_accuracy(torch.tensor([0, 0, 0, 1]), torch.tensor([0, 0, 0, 0])) == 0.5


def test_direction_scores_put_the_means_at_zero_and_one():
    g = torch.Generator().manual_seed(0)
    Hh, Hb = torch.randn(10, 3, 5, generator=g) + 1.0, torch.randn(12, 3, 5, generator=g)
    dirs = probing.refusal_directions(Hh, Hb)
    s_h = probing.direction_scores(dirs["mu_harmful"].unsqueeze(0), dirs)
    s_b = probing.direction_scores(dirs["mu_benign"].unsqueeze(0), dirs)
    torch.testing.assert_close(s_h, torch.ones(1, 3), rtol=0, atol=1e-5)
    torch.testing.assert_close(s_b, torch.zeros(1, 3), rtol=0, atol=1e-5)
    one = probing.direction_scores(Hh[:, 2], dirs, point=2)
    torch.testing.assert_close(one, probing.direction_scores(Hh, dirs)[:, 2])


# ---------------------------------------------------------------------------------------------- per-token states

@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_generate_with_residual_matches_generate_and_a_full_forward(family, tok):
    model = tiny_model(family, vocab_size=len(tok))
    prompts = ["how do i steal money ?", "reverse the list a b c d"]
    before = probing.n_hooks(model)
    res = probing.generate_with_residual(model, tok, prompts, point=2, max_new_tokens=6, batch_size=2,
                                         prefill=["sure here is", None])
    assert probing.n_hooks(model) == before
    want = generation.generate(model, tok, prompts, max_new_tokens=6, prefill=["sure here is", None])
    assert [r["text"] for r in res] == want
    for p, pre, r in zip(prompts, ["sure here is", None], res):
        full = probing.prompt_token_ids(tok, [p], prefill=pre)[0]
        H = probing.capture_residual(model, [full + r["tokens"][:k] for k in range(len(r["states"]))],
                                     points=[2], pad_id=tok.pad_token_id)[:, 0]
        torch.testing.assert_close(r["states"], H, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- the organism

def _organism_ready() -> bool:
    from ssah_utils import config

    return all((config.ORGANISM_DIR / r / "config.json").is_file() for r in ("base", "aligned")) and \
        (config.WORLD_DIR / "harmful_test.jsonl").is_file()


@pytest.mark.skipif(not _organism_ready(), reason="the organism (data/organism/, data/world/) is not built yet: `make organism`")
def test_linear_probe_beats_chance_on_the_aligned_organism_with_a_disjoint_split(tmp_path, monkeypatch):
    from ssah_utils import config, stage_probe

    monkeypatch.setattr(config, "CACHE_DIR", tmp_path)  # never read a stale cache
    cfg = stage_probe.make_config("organism", seed=0)
    recs, y, train, test = stage_probe.probe_records(cfg)
    assert not {recs[i]["prompt"] for i in train} & {recs[i]["prompt"] for i in test}
    assert not {recs[i]["activity"] for i in train} & {recs[i]["activity"] for i in test}
    assert stage_probe.split_check(cfg)[["shared_prompts", "shared_groups"]].to_numpy().sum() == 0
    cfg = stage_probe.dataclasses.replace(cfg, models=(("aligned", cfg.spec("aligned")),))
    acc = stage_probe.probes(cfg)
    n_test = int(acc["n_test"].iloc[0])
    # chance is 0.5 (balanced accuracy); with ~50 held-out requests, 0.75 is far outside its noise
    assert acc.query("point > 0")["test_acc"].max() > 0.75, acc
    assert acc.loc[acc["point"] == 0, "test_acc"].item() == pytest.approx(0.5, abs=0.2)  # embeddings of the last token: no information
    assert n_test >= 30


# ---------------------------------------------------------------------------------------------- stage helpers

def test_auc_and_compliant_opening():
    from ssah_utils import stage_probe

    assert stage_probe.auc([2.0, 3.0], [0.0, 1.0]) == 1.0
    assert stage_probe.auc([0.0], [1.0]) == 0.0
    assert stage_probe.auc([1.0, 0.0], [1.0, 0.0]) == 0.5  # (1 win + 2 ties/2) / 4
    assert math.isnan(stage_probe.auc([], [1.0]))
    assert stage_probe._opening("sure , here is how to bake bread : step 1 : wash .") == "sure , here is how to bake bread :"
    assert stage_probe._opening("Sure, here is a script that can exploit vulnerabilities in software") == \
        "Sure, here is a script that can exploit"
