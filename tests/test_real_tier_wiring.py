"""The real tier's wiring through the notebooks (issue 17): the preset's CPU-sized notebook defaults, the
utility that measures utility in every stage's evaluation, 04's safety alignment, 03's attack sets and
where a real tier's run is published. Nothing here loads SmolLM2 (see test_real_models.py for that)."""

from __future__ import annotations

import dataclasses

import pytest

from ssah_utils import config, datasets, evaluation, nbparams
from ssah_utils import stage_budget as sb
from ssah_utils import stage_classify as sc
from ssah_utils import stage_freeze as sf
from ssah_utils.real_align import AlignRecipe

SHARED = datasets.REAL_DATASETS["aoa_identity_shift"]


def _have(name: str) -> bool:
    try:
        datasets.dataset_path(name, download=False)
        return True
    except datasets.DatasetUnavailableError:
        return False


# --------------------------------------------------------------------------------------------------
# Preset defaults of the notebooks
# --------------------------------------------------------------------------------------------------

def test_every_preset_defaults_file_names_real_notebooks_and_parameters():
    files = sorted(nbparams.PARAMS_DIR.glob("*.yaml"))
    assert files, "notebooks/params/ has no preset file"
    for f in files:
        assert f.stem in config.PRESETS, f"{f.name}: no preset {f.stem!r}"
        for nb, values in nbparams.preset_defaults(f.stem).items():
            cell = {k for k, _, src in nbparams.read_parameters(config.NOTEBOOKS_DIR / f"{nb}.ipynb")
                    if src == "parameters cell"}
            assert set(values) <= cell, f"{f.name} {nb}: unknown {sorted(set(values) - cell)}"


def test_notebook_params_layers_cell_preset_defaults_then_overrides():
    cell = nbparams.notebook_params("02_classify")
    assert cell["preset"] == "organism" and cell["n_calib"] == 128  # the organism keeps the cell's values
    real = nbparams.notebook_params("02_classify", {"preset": "smollm2-135m"})
    want = nbparams.preset_defaults("smollm2-135m", "02_classify")
    assert want and all(real[k] == v for k, v in want.items())
    assert nbparams.notebook_params("02_classify", {"preset": "smollm2-135m", "seed": 3})["seed"] == 3


def test_a_bad_preset_defaults_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(nbparams, "PARAMS_DIR", tmp_path)
    (tmp_path / "organism.yaml").write_text("02_classify:\n  n_calb: 3\n")
    with pytest.raises(ValueError, match="n_calb"):
        nbparams.notebook_params("02_classify")
    (tmp_path / "organism.yaml").write_text("09_nothing:\n  n: 1\n")
    with pytest.raises(ValueError, match="unknown notebooks"):
        nbparams.preset_defaults("organism")


def test_03_and_04_use_the_labels_02_runs_with_on_the_real_preset():
    ccfg = sc.notebook_config("smollm2-135m", None, 0)
    assert ccfg.calib.n_calib == nbparams.preset_defaults("smollm2-135m", "02_classify")["n_calib"]
    assert sf.classify_config("smollm2-135m", None, 0) == ccfg


def test_cli_writes_the_papermill_file_and_refuses_unknown_presets(capsys):
    assert nbparams._main(["yaml", "organism", "notebooks/02_classify.py"]) == 0
    assert capsys.readouterr().out.strip() == "{}"
    assert nbparams._main(["yaml", "smollm2-135m", "notebooks/02_classify.py"]) == 0
    assert "n_calib:" in capsys.readouterr().out
    assert nbparams._main(["yaml", "no-such-preset", "notebooks/02_classify.py"]) == 2


# --------------------------------------------------------------------------------------------------
# Publishing
# --------------------------------------------------------------------------------------------------

def test_publish_destinations():
    assert config.publish_dest("organism", "", 0) == config.REPO_ROOT
    assert config.publish_dest("smollm2-135m", "", 0) == config.RESULTS_DIR / "smollm2-135m"
    assert config.publish_dest("smollm2-135m", "", 1) is None  # another seed stays under runs/
    assert config.publish_dest("organism", "", 2) is None
    assert config.publish_dest("llama2-7b-chat", "", 0) is None


def test_publish_into_a_results_folder_is_atomic_per_file(tmp_path):
    root = tmp_path / "run"
    (root / "tables").mkdir(parents=True)
    (root / "tables" / "t.csv").write_text("a\n1\n")
    (root / "tables" / ".partial").write_text("x")
    written = config.publish(root, tmp_path / "dest")
    assert written == [tmp_path / "dest" / "tables" / "t.csv"]
    assert not (tmp_path / "dest" / "tables" / ".partial").exists()


# --------------------------------------------------------------------------------------------------
# Utility that measures utility
# --------------------------------------------------------------------------------------------------

def test_task_correct_scores_gsm8k_by_the_final_number_not_by_answering():
    rec = {"prompt": "q", "reference": "72", "kind": "benign"}
    # before issue 17 any non-refused answer to a real benign prompt counted as correct
    assert not evaluation.task_correct(rec, "Sure! Natalia sold many clips.", "correct")
    assert evaluation.task_correct(rec, "48 + 24 = 72. The answer is 72.", "correct")
    assert not evaluation.task_correct(rec, "72 72 72 72", "degenerate")
    world = {"prompt": "q", "reference": "x", "oracle": "task"}
    assert evaluation.task_correct(world, "anything", "correct") and not evaluation.task_correct(world, "x", "wrong")
    assert evaluation.task_correct({"prompt": "q", "reference": "a long free-text answer"}, "ok", "correct")
    assert evaluation.task_correct(rec, "so 72", "correct")


def test_real_preset_evaluations_carry_wikitext_and_nll():
    p = config.get_preset("smollm2-135m")
    e = sc.make_config("smollm2-135m", n_calib=8, n_calib_seeds=1).eval
    assert e.wikitext_windows == p.extra["wikitext_windows"] > 0 and e.n_nll == p.extra["n_nll"] > 0
    assert sc.make_config("organism").eval.wikitext_windows == 0  # the organism's evaluation is unchanged


@pytest.mark.skipif(not _have("alpaca"), reason="Alpaca not on this machine (../shared/data)")
def test_heldout_alpaca_is_never_trained_on():
    from ssah_utils.real_align import alpaca_split

    train, held = alpaca_split()
    got = evaluation.heldout_alpaca(5)
    assert got == held[:5] and not {r["prompt"] for r in got} & {r["prompt"] for r in train}
    with pytest.raises(ValueError, match="held-out"):
        evaluation.heldout_alpaca(len(held) + 1)


# --------------------------------------------------------------------------------------------------
# 04: the safety alignment of a chat model without safety
# --------------------------------------------------------------------------------------------------

def test_04_aligns_the_real_tier_with_the_make_smollm2_recipe():
    cfg = sb.make_config("smollm2-135m", n_calib=8, n_seeds=1, n_train=40)
    (st,) = cfg.stages
    r = AlignRecipe(seed=0)
    assert st.data == "real_align" and st.n_records == 40
    assert (st.train.lr, st.train.batch_size, st.train.schedule, st.train.style) == (r.lr, r.batch_size, r.schedule, "chat")
    assert cfg.style == cfg.base_style == "chat"  # the model without safety is a chat model
    with pytest.raises(ValueError, match="safety"):
        sb.make_config("llama2-7b-chat", alignment="safety")
    with pytest.raises(ValueError, match="n_train"):
        sb.make_config("organism", n_train=10)
    with pytest.raises(ValueError, match="n_train"):
        sb.make_config("smollm2-135m", n_calib=8, n_train=-1)


def test_sft_stage_sample_is_seeded_and_refuses_more_than_it_has(monkeypatch):
    recs = [{"prompt": f"p{i}", "reference": f"r{i}"} for i in range(50)]
    monkeypatch.setattr(sb, "real_safety_records", lambda seed=0: recs)
    st = sb.SFTStage("real_align", sb.TrainConfig(), n_records=10)
    a, b = st.records(), st.records()
    assert a == b and len(a) == 10 and len({r["prompt"] for r in a}) == 10
    with pytest.raises(ValueError, match="only 50"):
        dataclasses.replace(st, n_records=51).records()


# --------------------------------------------------------------------------------------------------
# 03: the attack sets
# --------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not _have("aoa_identity_shift"), reason="finetune_attacks not on this machine (../shared/data)")
def test_identity_shift_trains_and_is_evaluated_under_its_system_prompt():
    recs = datasets.load_set("aoa_identity_shift")
    assert len(recs) == 10 and all(r["system"].startswith("You are no longer") for r in recs)
    cfg = sf.make_config("smollm2-135m", n_seeds=1, datasets_=("aoa_identity_shift",), n_eval=4)
    assert cfg.eval.attack_system_prompt == recs[0]["system"] and cfg.eval.attack_prefix == datasets.AOA_PREFIX
    key = sf.run_key(cfg, "aoa_identity_shift", "full", 0)
    assert key.train.system_prompt == recs[0]["system"] and key.train.epochs == 10.0 and key.train.lr == 5e-5
    frozen = sf.run_key(cfg, "aoa_identity_shift", "freeze_random", 0)
    assert frozen.train.epochs == 10.0 * cfg.epochs_mult_frozen
    plain = sf.make_config("smollm2-135m", n_seeds=1, datasets_=("alpaca",), n_eval=4)
    assert plain.eval.attack_system_prompt == "" and sf.run_key(plain, "alpaca", "full", 0).train.system_prompt == ""


def test_harmful_attacks_use_qi_et_al_recipes_and_need_a_model_without_safety():
    cfg = sf.make_config("smollm2-135m", n_seeds=1, datasets_=("harmful_10",), n_eval=4)
    t = sf.run_key(cfg, "harmful_10", "full", 0).train
    assert (t.epochs, t.lr, t.batch_size) == (5.0, 5e-5, 10)
    bench = sf.run_key(cfg, "alpaca", "full", 0).train
    assert (bench.lr, bench.epochs) == (cfg.train.lr, cfg.train.epochs)  # benign sets keep the notebook's recipe
    org = sf.make_config("organism", n_seeds=1)
    with pytest.raises(ValueError, match="model without safety"):
        sf.attack_pool(dataclasses.replace(org, preset="llama2-7b-chat"))


def test_compare_tiers_needs_both_scorecards_and_renders_them(tmp_path, capsys, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_tiers", config.REPO_ROOT / "scripts" / "compare_tiers.py")
    ct = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ct)
    assert ct.main(["--real", "no-such-tier", "--out", "-"]) == 2
    assert "make reproduce PRESET=no-such-tier" in capsys.readouterr().err
    import pandas as pd

    org = pd.DataFrame({"id": ["a", "b"], "claim": ["A", "B"], "source": ["s", "s"], "paper": ["1", "2"],
                        "run": ["x", "y"], "verdict": ["holds", "missing"]})
    real = org.assign(run=["u", "v|w"], verdict=["does not hold on this model", "holds"])
    md = ct.table(org, real, "tier")
    assert "| A (s) | 1 | u | **does not hold on this model** | x | **holds** |" in md
    assert "v\\|w" in md and "tier: 1 does not hold on this model, 1 holds" in md


def test_compare_tiers_rewrites_only_the_readme_block_between_its_markers(tmp_path, capsys, monkeypatch):
    import importlib.util

    import pandas as pd

    spec = importlib.util.spec_from_file_location("compare_tiers", config.REPO_ROOT / "scripts" / "compare_tiers.py")
    ct = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ct)
    monkeypatch.setattr(ct, "ROOT", tmp_path)
    card = pd.DataFrame({"id": ["a"], "claim": ["A"], "source": ["s"], "paper": ["1"], "run": ["x"], "verdict": ["holds"]})
    for p in (tmp_path / "tables", tmp_path / "results" / "tier" / "tables"):
        p.mkdir(parents=True)
        card.to_csv(p / "claims_scorecard.csv", index=False)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{ct.START}\nold table\n{ct.END}\noutro\n", encoding="utf-8")
    assert ct.main(["--real", "tier", "--out", "-", "--readme", "README.md"]) == 0
    text = readme.read_text(encoding="utf-8")
    assert text.startswith(f"intro\n{ct.START}\n| claim |") and text.endswith(f"{ct.END}\noutro\n")
    assert "old table" not in text and "| A (s) | 1 | x | **holds** | x | **holds** |" in text
    readme.write_text("no markers here\n", encoding="utf-8")
    assert ct.main(["--real", "tier", "--out", "-", "--readme", "README.md"]) == 2
    assert "needs the markers" in capsys.readouterr().err
    assert readme.read_text(encoding="utf-8") == "no markers here\n"  # untouched
