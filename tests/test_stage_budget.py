"""The alignment-budget stage (ssah_utils.stage_budget): RU selection by parameter share, config
validation, the GSM8K answer rule, the paper table, and one tiny RU-only alignment run."""

import dataclasses

import pandas as pd
import pytest
import torch

from ssah_utils import evaluation
from ssah_utils import stage_budget as B
from ssah_utils import training as T
from ssah_utils.models import adapter_for, unit_params
from tiny_models import RECORDS, tiny_model, tiny_tokenizer



def _nearest_prefix_reference(z: torch.Tensor, params: torch.Tensor, fraction: float, lowest: bool) -> set[int]:
    """A slow loop: walk the units from the lowest (or highest) z, and keep the prefix whose parameter
    total is closest to the target (the shorter one on ties)."""
    idx = sorted(range(len(z)), key=lambda i: (float(z[i]) if lowest else -float(z[i]), i))
    target = fraction * float(params.sum())
    best_n, best_gap, total = 0, target, 0.0
    for n, i in enumerate(idx, start=1):
        total += float(params[i])
        if abs(total - target) < best_gap - 1e-9:
            best_n, best_gap = n, abs(total - target)
    return set(idx[:best_n])


@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.5])
@pytest.mark.parametrize("lowest", [True, False])
def test_budget_is_the_lowest_utility_share_of_parameters(fraction, lowest):
    model = tiny_model("llama")
    shape = adapter_for(model).shape
    z = torch.randn(shape.n_layers * (shape.d_mlp + shape.n_heads), generator=torch.Generator().manual_seed(3),
                    dtype=torch.float64)
    mask = B.select_budget(z, shape, fraction, lowest=lowest)
    chosen = set(mask.flat().nonzero().squeeze(1).tolist())
    assert chosen == _nearest_prefix_reference(z, unit_params(shape), fraction, lowest)
    inside, outside = z[mask.flat()], z[~mask.flat()]
    if lowest:
        assert inside.max() <= outside.min()
    else:
        assert inside.min() >= outside.max()
    # the share of parameters is within one unit's weight of the target
    assert abs(mask.fraction("params") - fraction) * shape.total_params <= shape.params_per_head / 2 + 1e-6


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_ru_frac_outside_the_open_unit_interval_raises(bad):
    with pytest.raises(ValueError, match=r"ru_frac must be a share of parameters in \(0, 1\)"):
        B.make_config("organism", ru_frac=bad)
    shape = adapter_for(tiny_model("llama")).shape
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        B.select_budget(torch.zeros(shape.n_layers * (shape.d_mlp + shape.n_heads)), shape, bad)


def test_config_errors_name_the_valid_choices():
    with pytest.raises(ValueError, match="subset of"):
        B.make_config("organism", conditions="full,everything")
    with pytest.raises(ValueError, match="give that many epochs"):
        B.make_config("organism", epochs="1,1,1")
    with pytest.raises(ValueError, match="alignment must be one of"):
        B.make_config("organism", alignment="rlhf")
    with pytest.raises(ValueError, match="Valid presets"):
        B.make_config("no-such-preset")


def test_organism_stages_follow_the_recipe():
    from ssah_utils.organism import Recipe

    r = Recipe()
    cfg = B.make_config("organism")
    assert [s.data for s in cfg.stages] == ["sft_instruct", "sft_safety"]
    assert [(s.train.epochs, s.train.lr) for s in cfg.stages] == [(r.instruct_epochs, r.instruct_lr),
                                                                  (r.safety_epochs, r.safety_lr)]
    assert all(s.train.batch_size == r.sft_batch and s.train.style == "chat" for s in cfg.stages)
    short = B.make_config("organism", alignment="instruct", epochs="0.5")
    assert [(s.data, s.train.epochs) for s in short.stages] == [("sft_instruct", 0.5)]
    assert cfg.seeds == (0, 1, 2) and B.make_config("organism", seed=5, n_seeds=2).seeds == (5, 6)


def test_gsm8k_rule_reads_the_last_number():
    rec = {"prompt": "q", "reference": "1,234", "kind": "benign"}
    assert evaluation.task_correct(rec, "so 3 + 4 = 7 and the answer is 1234", "correct")
    assert not evaluation.task_correct(rec, "the answer is 1234 . no wait , 12", "correct")
    assert not evaluation.task_correct(rec, "i do not know", "correct")
    world = {"prompt": "q", "reference": "the answer is 6 .", "oracle": "task", "answer": "6"}
    assert evaluation.task_correct(world, "whatever", "correct") and not evaluation.task_correct(world, "6", "wrong")


def test_table4_vs_paper_maps_gsm8k_to_utility_and_computes_the_tax():
    from ssah_utils.paper import reported

    runs = pd.DataFrame({"condition": ["base", "full", "full", "ru_only", "ru_only"], "seed": [-1, 0, 1, 0, 1],
                         "utility": [60.0, 50.0, 54.0, 58.0, 62.0]})
    runs["alignment_tax"] = 60.0 - runs["utility"]
    s = B.summarize(runs)
    assert s.loc["full", "utility"] == 52.0
    assert s.loc["base", "utility_sd"] == 0.0  # one run: no spread measured
    assert s.loc["full", "utility_sd"] == pytest.approx(torch.tensor([50.0, 54.0]).std().item())  # ddof 1
    t = B.table4_vs_paper(s)
    g = t[(t["paper_metric"] == "gsm8k")].set_index("paper_setting")
    rep = reported("table4").query("metric == 'gsm8k'").set_index("setting")["value"]
    assert g.loc["RU-only SFT (20%)", "ours"] == 60.0 and g.loc["RU-only SFT (20%)", "paper"] == rep["RU-only SFT (20%)"]
    tax = t[t["our_metric"] == "alignment_tax"].set_index("our_condition")
    assert tax.loc["full", "paper"] == pytest.approx(rep["base"] - rep["full SFT (Alpaca)"])
    assert tax.loc["full", "ours"] == 8.0
    assert t.loc[t["paper_metric"] == "mmlu", "ours"].isna().all()  # no analogue: never filled in


def _stage(epochs: float = 2.0) -> B.SFTStage:
    return B.SFTStage("tiny", T.TrainConfig(epochs=epochs, lr=1e-2, batch_size=3, weight_decay=0.1, seed=0))


def test_ru_only_alignment_changes_only_the_ru_entries(monkeypatch):
    """One tiny end-to-end condition: only the budget's entries move (bit for bit elsewhere, embeddings,
    norms and lm_head included), every budget unit moves, and a lone head of a GQA group leaves the
    group's shared k/v rows alone."""
    monkeypatch.setattr(B.datasets, "load_set", lambda name, **kw: RECORDS)
    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok))
    shape = adapter_for(model).shape
    z = torch.randn(shape.n_layers * (shape.d_mlp + shape.n_heads), generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    z[shape.n_layers * shape.d_mlp + 1] = -100.0  # head 1 of layer 0 (GQA group 0) surely in the budget
    z[shape.n_layers * shape.d_mlp + 0] = 100.0  # its group partner surely not
    ru = B.select_budget(z, shape, 0.2)
    assert ru.heads[0, 1] and not ru.heads[0, 0]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = B.align(model, tok, (_stage(),), mask=ru, run_seed=0)
    assert out["moved_outside_mask"] == 0
    allowed = T.unit_param_masks(model, ru, kv="all")
    for n, p in model.named_parameters():
        changed = p.detach() != before[n]
        if n in allowed:
            assert not bool(changed[~allowed[n]].any()), f"{n}: entries outside the budget changed"
        else:
            assert not bool(changed.any()), f"{n} (no unit) changed"
    k0 = model.model.layers[0].self_attn.k_proj.weight
    torch.testing.assert_close(k0, before["model.layers.0.self_attn.k_proj.weight"], rtol=0, atol=0)
    moved = out["unit_change"] > 0
    torch.testing.assert_close(moved, ru.flat())  # every budget unit moved, no other unit did
    assert (out["info"]["trainable_params"] < sum(p.numel() for p in model.parameters())).all()


def test_full_alignment_moves_everything_and_unit_change_matches_a_direct_difference(monkeypatch):
    monkeypatch.setattr(B.datasets, "load_set", lambda name, **kw: RECORDS)
    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = B.align(model, tok, (_stage(1.0), dataclasses.replace(_stage(1.0), data="tiny2")), mask=None, run_seed=1)
    assert list(out["info"]["stage"]) == ["tiny", "tiny2"] and out["moved_outside_mask"] == 0
    assert not torch.equal(model.model.embed_tokens.weight, before["model.embed_tokens.weight"])
    # reference for one MLP channel and one head, computed directly from the weights
    ad = adapter_for(model)
    l, c, h = 1, 5, 2
    d = {p: ad.proj(l, p).weight.detach().double() - before[f"model.layers.{l}.{'mlp' if 'proj' in p and p in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{p}.weight"].double()
         for p in ("gate_proj", "up_proj", "down_proj", "q_proj", "o_proj")}
    ch = (d["gate_proj"][c].square().sum() + d["up_proj"][c].square().sum() + d["down_proj"][:, c].square().sum()).sqrt()
    sl = ad.head_slice(h)
    hd = (d["q_proj"][sl].square().sum() + d["o_proj"][:, sl].square().sum()).sqrt()
    s = ad.shape
    torch.testing.assert_close(out["unit_change"][l * s.d_mlp + c], ch)
    torch.testing.assert_close(out["unit_change"][s.n_layers * s.d_mlp + l * s.n_heads + h], hd)


def test_organism_stages_use_the_recipe_sft_mixes():
    """04's full SFT repeats the shipped aligned model's recipe, its SFT data-mixture weights included."""
    from ssah_utils import datasets, organism

    cfg = B.make_config("organism")
    r = organism.Recipe()
    assert [s.upsample for s in cfg.stages] == [r.instruct_upsample, r.safety_upsample]
    table = B.stages_table(cfg)
    plain = len(datasets.load_set("sft_instruct"))
    assert table.loc["sft_instruct", "records"] == len(cfg.stages[0].records())
    assert (table.loc["sft_instruct", "records"] > plain) == bool(r.instruct_upsample)


def _fake_table4(ppl_full: float):
    rows = {"base": dict(utility=0.0, asr=75.0, ppl=25.0), "reference": dict(utility=0.0, asr=0.0, ppl=25.5),
            "full": dict(utility=0.0, asr=20.0, ppl=ppl_full), "ru_only": dict(utility=0.0, asr=60.0, ppl=30.0),
            "random_only": dict(utility=0.0, asr=70.0, ppl=25.2)}
    s = pd.DataFrame(rows).T
    for c in ("refusal", "jailbreak_asr", "over_refusal", "final_loss", "alpaca_nll", "trained_unit_params_pct", "alignment_tax"):
        s[c] = 1.0
    for c in list(s.columns):
        s[f"{c}_sd"] = 0.1
    s["n"] = 2
    return {"summary": s, "runs": pd.DataFrame({"moved_outside_mask": [0, 0]})}


def test_summary_reads_the_tax_from_perplexity_where_wikitext_is_measured(monkeypatch):
    """On the real tier GSM8K is 0 for every condition, so a tax in task-accuracy points would always be 0
    and RU-only would look as good as anything: the summary must read the tax from the perplexity rise."""
    cfg = B.make_config("organism", conditions="full,ru_only,random_only")
    real = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, ppl_set=None, wikitext_windows=8))
    monkeypatch.setattr(B, "table4", lambda c, log=None: _fake_table4(27.5))
    text = B.summary_text(real)
    assert "alignment tax 10.0 ± 0.4% over the base" in text  # full: 27.5 / 25 - 1
    assert "RU-only vs random units of the same size: perplexity rise lower by -19.2" in text and "worse than the null" in text
    assert "Alignment tax, full SFT +10.0% vs RU-only +20.0%" in text
    organism = B.summary_text(cfg)  # no WikiText: task-accuracy points, as before
    assert "alignment tax 1.0 ± 0.1 points" in organism and "perplexity rise" not in organism


def test_a_model_given_alone_has_no_reference_and_says_so():
    """MODEL=<a base> (a custom preset: aligned = base, e.g. Gemma-3-270M for `scripts/gemma3_budget.py`):
    04 aligns it in the raw format with no separate aligned reference; asking for one is a clear error,
    while a preset's own aligned model stays the reference."""
    cfg = B.make_config("smollm2-135m", model="org/some-base", alignment="instruct", n_seeds=1)
    assert cfg.reference == "" and cfg.base == "org/some-base" and cfg.style == "raw"
    with pytest.raises(ValueError, match="no aligned reference"):
        B.evaluate_reference(cfg, "reference")
    assert B.make_config("organism").reference == "organism:aligned"


def test_a_model_with_one_refusal_falls_back_to_the_reference_refusals(monkeypatch):
    """02's calibration cuts each draw into two disjoint halves, so a model that refused a single calibration
    request has too few refusals to calibrate on: that is the same clear error as refusing none (found by running
    the classroom 04 whole, where a briefly trained RU-only model refused one), and 04's relabelling then falls
    back to the set's reference refusals instead of failing inside `encode_pairs`."""
    import pandas as pd

    from ssah_utils import evaluation
    from ssah_utils import stage_classify as sc

    cfg = sc.make_config("organism", n_calib=4, n_calib_seeds=1, safety_responses="model")
    one = {"n": 0}

    def behaviour(model, tok, recs, **kw):
        one["n"] = len(recs)
        return pd.DataFrame({"id": [r["id"] for r in recs], "prompt": [r["prompt"] for r in recs],
                             "response": ["sorry i can not"] + ["sure"] * (len(recs) - 1),
                             "verdict": ["refusal"] + ["harmful"] * (len(recs) - 1)})

    monkeypatch.setattr(evaluation, "evaluate_behaviour", behaviour)
    monkeypatch.setattr(sc, "_cached", lambda stage, key, compute, cfg: compute())
    with pytest.raises(ValueError, match="refused only one .* no refusal to calibrate on"):
        sc.calibration(cfg)
    assert one["n"] > 1
