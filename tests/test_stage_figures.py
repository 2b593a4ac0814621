"""05_figures (ssah_utils.stage_figures): notebook parameters, configs, the verdict rule, read-only sections."""

import ast
import inspect
import dataclasses
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import nbformat
import numpy as np
import pandas as pd
import pytest
import torch

from ssah_utils import cache, config
from ssah_utils import stage_budget as sb
from ssah_utils import stage_classify as sc
from ssah_utils import stage_figures as sfig
from ssah_utils import stage_freeze as sf
from ssah_utils import stage_probe as sp
from ssah_utils.paper import reported
from ssah_utils.units import LABELS

NOTEBOOKS = config.REPO_ROOT / "notebooks"


def _write_nb(path: Path, params: str, injected: str | None = None, extra_params_cell: bool = False) -> Path:
    nb = nbformat.v4.new_notebook()
    cells = [nbformat.v4.new_markdown_cell("# title"), nbformat.v4.new_code_cell(params)]
    cells[1].metadata["tags"] = ["parameters"]
    if extra_params_cell:
        cells.append(nbformat.v4.new_code_cell("x = 1"))
        cells[-1].metadata["tags"] = ["parameters"]
    if injected is not None:
        cells.append(nbformat.v4.new_code_cell(injected))
        cells[-1].metadata["tags"] = ["injected-parameters"]
    cells.append(nbformat.v4.new_code_cell("cfg = make(preset)"))
    nb.cells = cells
    nbformat.write(nb, path)
    return path


# ---------------------------------------------------------------- notebook parameters

def test_notebook_params_reads_literals_injected_values_and_overrides(tmp_path):
    _write_nb(tmp_path / "07_x.ipynb", 'preset = "organism"  # a preset\nmodel = ""  # a model\n\nseed = 0  # seed\n'
              'lr = -1e-4  # negative\nsets = ("a", "b")  # tuple\nflag = True  # bool\nnone = None  # none\n',
              injected='# Parameters\nseed = 5\n')
    p = sfig.notebook_params("07_x", folder=tmp_path)
    assert p == {"preset": "organism", "model": "", "seed": 5, "lr": -1e-4, "sets": ("a", "b"), "flag": True,
                 "none": None}
    assert list(p) == ["preset", "model", "seed", "lr", "sets", "flag", "none"]  # the cell's order
    p = sfig.notebook_params("07_x.ipynb", {"seed": 2, "model": "org/m"}, tmp_path)
    assert p["seed"] == 2 and p["model"] == "org/m" and p["lr"] == -1e-4
    assert [src for k, _, src in sfig.read_parameters(tmp_path / "07_x.ipynb") if k == "seed"] == \
        ["parameters cell", "injected (papermill -p)"]
    with pytest.raises(ValueError, match=r"07_x.ipynb has no parameter 'sed'"):
        sfig.notebook_params("07_x", {"sed": 1}, tmp_path)


@pytest.mark.parametrize("source, match", [
    ("n = 2 * 3  # computed", r"parameter 'n' must be a literal .*'2 \* 3'"),
    ("n = 4\nm = n  # a name", r"line 2: parameter 'm' must be a literal"),
    ("import os", r"line 1: a parameters cell holds only `name = literal` lines"),
    ("a = b = 1", r"only `name = literal` lines"),
    ("x = (", r"not valid Python"),
])
def test_notebook_params_rejects_non_literals_clearly(tmp_path, source, match):
    _write_nb(tmp_path / "07_x.ipynb", source)
    with pytest.raises(ValueError, match=match) as err:
        sfig.notebook_params("07_x", folder=tmp_path)
    assert "07_x.ipynb" in str(err.value)


def test_notebook_params_needs_one_parameters_cell_and_the_file(tmp_path):
    _write_nb(tmp_path / "07_x.ipynb", "a = 1", extra_params_cell=True)
    with pytest.raises(ValueError, match="exactly one cell tagged 'parameters', found 2"):
        sfig.notebook_params("07_x", folder=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"notebooks in .*\['07_x'\]"):
        sfig.notebook_params("08_y", folder=tmp_path)


def test_committed_notebooks_parameters_are_literals_with_preset_model_seed():
    for nb in sfig.NOTEBOOKS.values():
        p = sfig.notebook_params(nb)
        assert {"preset", "model", "seed"} <= set(p), nb
        assert (p["preset"], p["model"], p["seed"]) == ("organism", "", 0), nb


# ---------------------------------------------------------------- one mapping from parameters to config

def _config_cell_cfg(nb_name: str, params: dict):
    """`cfg` as the notebook's own config cell builds it (its `cfg = ...` statement, run on `params`)."""
    nb = nbformat.read(NOTEBOOKS / f"{nb_name}.ipynb", as_version=4)
    # executed copies carry papermill's injected-parameters cell right after the parameters cell
    code = [c for c in nb.cells if c.cell_type == "code" and "injected-parameters" not in c.metadata.get("tags", [])]
    i = next(k for k, c in enumerate(code) if "parameters" in c.metadata.get("tags", []))
    tree = ast.parse(code[i + 1].source)
    stmt = next(n for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "cfg")
    ns = {**params, "sp": sp, "sc": sc, "sf": sf, "sb": sb}
    exec(compile(ast.Module([stmt], type_ignores=[]), nb_name, "exec"), ns)
    return ns["cfg"]


VARIANTS = {
    "01_probe": dict(model="org/custom-chat", seed=2, n_prompts=16, lengths="2,4", position="mean",
                     use_system_prompt=True, layer=2, direction_layer=3),
    "02_classify": dict(seed=1, batch_size=0, h1=0.02, scorer="snip", n_calib_seeds=2, bias_from="none"),
    "03_freeze_finetune": dict(finetune_sets="ft_dolly", conditions="before,full", lr=1e-4, epochs=2.0, batch_size=8,
                               n_seeds=2, relabel=False, cu_rank_by="safety_minus_utility"),
    "04_alignment_budget": dict(seed=1, conditions="full,ru_only", epochs="", n_seeds=1, ru_frac=0.1,
                                model="org/custom-chat", alignment="instruct"),
}
MODULES = {"01_probe": sp, "02_classify": sc, "03_freeze_finetune": sf, "04_alignment_budget": sb}


@pytest.mark.parametrize("nb_name", list(VARIANTS))
@pytest.mark.parametrize("variant", [False, True])
def test_config_from_params_builds_exactly_the_notebooks_config(nb_name, variant):
    params = sfig.notebook_params(nb_name, VARIANTS[nb_name] if variant else None)
    ours = MODULES[nb_name].config_from_params(params)
    assert ours == _config_cell_cfg(nb_name, params)
    if variant:  # the variant really changes the config (the comparison above is not vacuous)
        assert ours != MODULES[nb_name].config_from_params(sfig.notebook_params(nb_name))


def test_freeze_fit_ratio_and_lr_grid_follow_the_notebook():
    params = sfig.notebook_params("03_freeze_finetune", {"seed": 0})
    assert sf.config_from_params({**params, "fit_ratio": 0.3}).fit_ratio == 0.3  # lr = 0: the loss rule picks it
    assert sf.config_from_params({**params, "lr": 1e-4, "fit_ratio": 0.3}).fit_ratio == 0.0  # an lr given wins
    assert sf.parse_lr_grid("3e-5, 1e-4") == (3e-5, 1e-4) and sf.parse_lr_grid("") == ()
    with pytest.raises(ValueError, match="comma-separated learning rates"):
        sf.parse_lr_grid("fast")


@pytest.mark.parametrize("module, name", [(sp, "01_probe"), (sc, "02_classify"), (sf, "03_freeze_finetune"),
                                          (sb, "04_alignment_budget")])
def test_config_from_params_rejects_unknown_parameters(module, name):
    with pytest.raises(ValueError, match=rf"unknown {name} parameters \['n_evals'\]; valid: .*'seed'"):
        module.config_from_params({"preset": "organism", "n_evals": 3})


# ---------------------------------------------------------------- 05 redraws what 01-04 save

def _saved_names_in_notebooks() -> set[tuple[str, str]]:
    out = set()
    for nb_name in sfig.NOTEBOOKS.values():
        for cell in nbformat.read(NOTEBOOKS / f"{nb_name}.ipynb", as_version=4).cells:
            if cell.cell_type != "code":
                continue
            for node in ast.walk(ast.parse(cell.source)):
                if isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("save_figure", "save_table"):
                    out.add(("figure" if node.func.attr == "save_figure" else "table", node.args[1].value))
    return out


def _saved_names_in_stage_figures() -> set[tuple[str, str]]:
    """What 05's sections write: the `figure` / `table` calls of the four stages' `report` functions."""
    out = set()
    for fn in sfig.SECTIONS.values():
        tree = ast.parse(Path(inspect.getsourcefile(fn)).read_text())
        out |= {(n.func.id, n.args[2].value) for n in ast.walk(tree)
                if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("figure", "table")}
    return out


def test_05_redraws_every_figure_and_table_the_notebooks_save():
    nb, ours = _saved_names_in_notebooks(), _saved_names_in_stage_figures()
    assert len(nb) >= 30  # the four notebooks save dozens of files: the parse found them
    assert ours == nb, f"only in notebooks: {sorted(nb - ours)}; only in 05: {sorted(ours - nb)}"
    assert not {n for _, n in nb} & set(sfig.OWN_OUTPUTS)


# ---------------------------------------------------------------- the verdict rule

def _summary(rows: dict[str, tuple[float, float, int]], metric: str = "asr") -> pd.DataFrame:
    return pd.DataFrame({metric: {k: v[0] for k, v in rows.items()}, f"{metric}_sd": {k: v[1] for k, v in rows.items()},
                         "n": {k: v[2] for k, v in rows.items()}})


def test_contrast_holds_fails_and_missing_on_hand_made_frames():
    s = _summary({"ESU": (60.0, 5.0, 3), "random": (12.0, 2.0, 3), "close": (19.0, 4.0, 3), "flat": (12.5, 0.0, 3)})
    r = sfig.contrast(s, "ESU", "random", "asr", expect="higher")
    assert r["verdict"] == sfig.HOLDS and r["effect"] == pytest.approx(48.0) and r["margin"] == pytest.approx(10.0)
    assert (r["run_mean"], r["run_sd"], r["run_n"], r["control_mean"]) == (60.0, 5.0, 3, 12.0)
    # 7 points higher, but the larger sd is 4: 7 <= 2 x 4, so it does not hold
    assert sfig.contrast(s, "close", "random", "asr", expect="higher")["verdict"] == sfig.FAILS
    # the 1-point sd floor: 0.5 points apart with sd 0 and 2 is not a difference ...
    assert sfig.contrast(s, "flat", "random", "asr", expect="same")["verdict"] == sfig.HOLDS
    assert sfig.contrast(s, "flat", "random", "asr", expect="higher", floor=0.0)["verdict"] == sfig.FAILS
    # ... and the wrong direction never holds
    assert sfig.contrast(s, "ESU", "random", "asr", expect="lower")["verdict"] == sfig.FAILS
    for args in ((None, "ESU", "random", "asr"), (s, "ESU", "absent", "asr"), (s, "ESU", "random", "utility")):
        assert sfig.contrast(*args, expect="higher")["verdict"] == sfig.MISSING
    nan = _summary({"a": (np.nan, 0.0, 1), "b": (1.0, 0.0, 1)})
    assert sfig.contrast(nan, "a", "b", "asr", expect="higher")["verdict"] == sfig.MISSING


def test_judge_versus_value_and_all_of():
    assert sfig.judge(3.0, 2.0, "higher") == sfig.HOLDS and sfig.judge(2.0, 2.0, "higher") == sfig.FAILS
    assert sfig.judge(-3.0, 2.0, "lower") == sfig.HOLDS and sfig.judge(-2.0, 2.0, "same") == sfig.HOLDS
    assert sfig.judge(float("nan"), 2.0, "same") == sfig.MISSING
    with pytest.raises(ValueError, match="expect must be 'higher', 'lower' or 'same'"):
        sfig.judge(1.0, 1.0, "bigger")
    assert sfig.versus_value(0.62, 0.05, 0.5, expect="higher")["verdict"] == sfig.HOLDS  # 0.12 > 2 x 0.05
    assert sfig.versus_value(0.58, 0.05, 0.5, expect="higher")["verdict"] == sfig.FAILS
    assert sfig.all_of(sfig.HOLDS, sfig.HOLDS) == sfig.HOLDS and sfig.all_of(sfig.HOLDS, sfig.FAILS) == sfig.FAILS
    assert sfig.all_of(sfig.FAILS, sfig.MISSING) == sfig.MISSING


# ---------------------------------------------------------------- the scorecard on hand-made sections

def _sections() -> dict[str, sfig.Section]:
    rng = np.random.default_rng(0)
    rows = []
    for role, shift in (("aligned", -0.10), ("unaligned", -0.05)):
        for i in range(40):
            d = 0.5 + 0.02 * rng.standard_normal()
            rows += [{"role": role, "prompt_idx": i, "continuation": "refusal", "n_tokens": 10, "point": 4,
                      "distance": d + shift}, {"role": role, "prompt_idx": i, "continuation": "compliance",
                                               "n_tokens": 10, "point": 4, "distance": d}]
    acc = pd.DataFrame({"role": ["aligned", "aligned"], "point": [3, 4], "test_acc": [0.99, 0.55], "n_test": [100, 100]})
    dist = pd.DataFrame(rows)
    probe = sfig.Section("probe", "01_probe", cfg=object(),
                         results={"dist": dist, "point": 4, "k_max": 10, "acc": acc, "t2": sp.fig2_table(dist, 4)})
    t1 = pd.DataFrame({"asr": {"none": 10.0, "ESU": 60.0, "random≈ESU": 12.0, "EUU": 11.0, "random≈EUU": 10.0,
                               "RU": 30.0, "random≈RU": 10.0},
                       "utility": {"none": 70.0, "ESU": 68.0, "random≈ESU": 69.0, "EUU": 50.0, "random≈EUU": 52.0,
                                   "RU": 69.0, "random≈RU": 69.5}})
    t1 = t1.assign(asr_sd=[0.0, 5.0, 2.0, 1.0, 1.0, 1.0, 1.0], utility_sd=[0.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5],
                   n=[1, 3, 3, 3, 3, 3, 3])
    fractions = pd.DataFrame({"pct_units": [1.0, 9.0, 80.0, 10.0], "pct_units_sd": [0.5, 1.0, 1.0, 0.5]}, index=LABELS)
    classify = sfig.Section("classify", "02_classify", cfg=SimpleNamespace(calib=SimpleNamespace(seeds=(0, 1, 2))),
                            results={"summary": t1, "fractions": fractions})
    freeze = sfig.Section("freeze", "03_freeze_finetune", message="No cached result for stage 'freeze' (...)")
    tax = pd.DataFrame({"alignment_tax": {"base": 0.0, "full": 10.0, "ru_only": 2.0, "random_only": 3.0},
                        "alignment_tax_sd": {"base": 0.0, "full": 1.0, "ru_only": 1.0, "random_only": 1.0},
                        "n": {"base": 1, "full": 3, "ru_only": 3, "random_only": 3}})
    mat = pd.DataFrame([[70.0, 0.0, 20.0, 10.0], [5.0, 10.0, 80.0, 5.0]], index=["RU", "EUU"], columns=["RU", "ESU", "CU", "EUU"])
    shares = pd.DataFrame({"reference": {"ESU": 1.0, "EUU": 10.0, "CU": 79.0, "RU": 10.0}})
    budget = sfig.Section("budget", "04_alignment_budget", cfg=SimpleNamespace(conditions=("full", "ru_only", "random_only")),
                          results={"summary": tax, "transfer": {"matrices": {"reference": mat[list(LABELS)]},
                                                                "shares": shares},
                                   "base_fractions": pd.DataFrame({"pct_units": {"RU": 20.0, "EUU": 80.0}})})
    return {"probe": probe, "classify": classify, "freeze": freeze, "budget": budget}


def test_scorecard_verdicts_on_hand_made_results():
    card = sfig.claims_scorecard(_sections())
    v = card["verdict"]
    assert v["probe_aligned"] == sfig.HOLDS  # 0.10 closer to refusal over 40 prompts
    assert v["probe_unaligned"] == sfig.FAILS  # also closer to refusal: not the reverse
    assert v["probe_binary"] == sfig.FAILS  # 0.55 at the Fig 2 point (4) is within 2 binomial sd (0.1) of chance
    assert card.loc["probe_binary", "run_mean"] == 0.55
    assert (v["esu_asr"], v["euu_utility"], v["ru_utility"], v["ru_asr"]) == (sfig.HOLDS, sfig.FAILS, sfig.HOLDS,
                                                                                sfig.FAILS)
    assert (v["budget_full"], v["budget_random"]) == (sfig.HOLDS, sfig.FAILS)  # 2 vs 10 holds; 2 vs 3 within 2 sd
    # RU -> RU 70% vs 10% chance holds; EUU -> CU 80% is "most" but only 1 point above the 79% chance share
    assert (v["fig6_ru"], v["fig6_euu"]) == (sfig.HOLDS, sfig.FAILS)
    assert card.loc["freeze", "verdict"] == sfig.MISSING  # no config without the notebook
    assert card.loc["esu_asr", "run"].startswith("oracle ASR 60.0 ± 5.0% (n=3)")
    # the paper's side is formatted from data/paper/reported.csv, never typed
    rep = reported("table1").query("model == 'Llama-2-7B-chat' and metric == 'avg_asr'")["value"]
    assert all(f"{x:.1f}" in card.loc["esu_asr", "paper"] for x in rep)
    text = sfig.summary_text(_sections(), card)
    assert "not found (run them first): 03_freeze_finetune" in text and "Removing the ESU raises ASR" in text


def test_scorecard_with_nothing_cached_is_all_missing_and_says_what_to_run(tmp_path, monkeypatch):
    secs = {k: sfig.Section(k, nb, cfg=None, message=f"No cached result; run {nb}") for k, nb in sfig.NOTEBOOKS.items()}
    secs["freeze"].cfg = SimpleNamespace(datasets=("ft_alpaca", "ft_dolly"), relabel=True,
                                         conditions=sf.DEFAULT_CONDITIONS)
    card = sfig.claims_scorecard(secs)
    assert set(card["verdict"]) == {sfig.MISSING}
    assert card.loc["freeze_i_vs_random:ft_dolly", "note"] == "run notebooks/03_freeze_finetune.ipynb first"
    assert card.loc["esu_asr", "run"] == "-"


def test_paper_tables_are_written_and_byte_stable(tmp_path, monkeypatch):
    for attr in ("FIGURES_DIR", "TABLES_DIR"):
        monkeypatch.setattr(config, attr, tmp_path / attr)
    sfig.write_paper_tables(_sections())
    first = {p.name: p.read_bytes() for p in tmp_path.rglob("*.*")}
    assert {"claims_scorecard.csv", "fig_claims_scorecard.png", "fig_claims_scorecard.pdf",
            "paper_vs_run_table1.csv", "paper_vs_run_table4.tex"} <= set(first)
    sfig.write_paper_tables(_sections())
    assert {p.name: p.read_bytes() for p in tmp_path.rglob("*.*")} == first
    t1 = pd.read_csv(tmp_path / "TABLES_DIR" / "paper_vs_run_table1.csv")
    row = t1[(t1["setting"] == "dense") & (t1["metric"] == "avg_utility") & (t1["model"] == "Llama-2-7B-chat")].iloc[0]
    assert (row["our_condition"], row["ours"], row["sd_over"]) == ("none", 70.0, "calibration seeds")
    drop = t1[t1["metric"] == "utility_drop"].iloc[0]
    assert drop["ours"] == pytest.approx(20.0)  # none 70 − EUU 50
    fr = pd.read_csv(tmp_path / "TABLES_DIR" / "paper_vs_run_unit_fractions.csv").set_index(["model", "setting"])
    assert fr.loc[("Llama-2-7B-chat", "ESU"), "ours"] == 1.0 and fr.loc[("Llama-2-7B-chat", "ESU"), "ours_n"] == 3
    pr = pd.read_csv(tmp_path / "TABLES_DIR" / "paper_vs_run_probe_distance.csv").set_index("setting")
    assert np.isnan(pr.loc["+refusal 2 tokens", "ours"])  # this run has 10 tokens only
    assert pr.loc["+refusal 10 tokens", "ours"] < pr.loc["+compliance 10 tokens", "ours"]


# ---------------------------------------------------------------- read-only: nothing is computed

def test_stage_function_without_cache_raises_cachemiss_and_computes_nothing(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setattr(config, "CACHE_DIR", tmp_path / "cache")

    def no_compute():
        raise AssertionError("read-only mode computed something")

    monkeypatch.setattr(sc.evaluation, "evaluate_behaviour", lambda *a, **k: no_compute())  # calibration's first compute step
    cfg = sc.make_config("organism", n_calib=8, n_calib_seeds=1, n_eval=4)
    with cache.read_only():
        with pytest.raises(cache.CacheMiss, match=r"stage 'classify_calib'.*notebooks/02_classify.ipynb"):
            sc.calibration(cfg)
    fcfg = dataclasses.replace(sf.make_config("organism", n_seeds=1, n_eval=4), classify=cfg)
    with cache.read_only(notebook="03_freeze_finetune"):
        with pytest.raises(cache.CacheMiss, match=r"notebooks/03_freeze_finetune.ipynb"):
            sf.runs(fcfg)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*"))


def test_run_section_reports_the_miss_and_writes_nothing(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    for attr in ("CACHE_DIR", "FIGURES_DIR", "TABLES_DIR"):
        monkeypatch.setattr(config, attr, tmp_path / attr)
    monkeypatch.setattr(sc.evaluation, "evaluate_behaviour", lambda *a, **k: (_ for _ in ()).throw(AssertionError("computed")))
    sec = sfig.run_section("classify", sfig.make_config(require_all=False))
    assert not sec.ok and sec.written == [] and sec.results == {}
    assert "notebooks/02_classify.ipynb" in sec.message and "02_classify: not shown" in repr(sec)
    assert isinstance(sec.cfg, sc.ClassifyConfig) and sec.cfg == sc.config_from_params(sfig.notebook_params("02_classify"))
    assert not any(tmp_path.rglob("*.*"))
    assert sfig.show_figure(sec, "fig_classify_dose").data.startswith("fig_classify_dose: not drawn. No cached result")
    with pytest.raises(ValueError, match="unknown section 'figures'; choose from probe, classify"):
        sfig.run_section("figures", sfig.make_config(require_all=False))


def test_make_config_checks_its_parameters(tmp_path):
    with pytest.raises(ValueError, match="Unknown preset 'llama-99b'"):
        sfig.make_config("llama-99b")
    with pytest.raises(ValueError, match="no notebook of .* set notebooks_dir"):
        sfig.make_config(notebooks_dir=str(tmp_path))
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        sfig.make_config(seed=-1)
    cfg = sfig.make_config("organism", "", 3, require_all=False)
    assert cfg.overrides() == {"preset": "organism", "model": "", "seed": 3}
    tab = sfig.params_table(cfg)
    assert tab.loc[("02_classify", "seed"), "from"] == "05 parameter" and tab.loc[("02_classify", "seed"), "value"] == "3"
    assert tab.loc[("02_classify", "h1"), "from"] == "parameters cell"


def test_judge_agreement_table_reads_the_committed_measurement_and_fails_clearly(tmp_path):
    t = sfig.judge_agreement()
    d = pd.read_csv(sfig.JUDGE_AGREEMENT_CSV)
    assert set(t.index.get_level_values(0)) == set(d["test_model"])
    assert len(t) == len(sfig._JUDGE_ROWS) * d["test_model"].nunique()
    # The cell shows the CSV's own numbers (value [lo, hi]), not a copy typed elsewhere.
    row = d[(d["test_model"] == "Llama-2-70b-chat") & (d["judge"] == "paper-asr")].iloc[0]
    assert t.loc[("Llama-2-70b-chat", "paper-asr", "-"), "kappa"] == \
        f"{row['kappa']:.2f} [{row['kappa_lo']:.2f}, {row['kappa_hi']:.2f}]"
    with pytest.raises(FileNotFoundError, match="judge_agreement.py"):
        sfig.judge_agreement(str(tmp_path / "none.csv"))
    d[d["judge"] != "paper-asr"].to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(ValueError, match="expected one row for judge 'paper-asr'"):
        sfig.judge_agreement(str(tmp_path / "short.csv"))


def test_real_tier_scorecard_measures_utility_by_perplexity_and_names_the_judge():
    """On a real tier GSM8K is ~0 everywhere, so the utility claims read WikiText-2 perplexity (rise over the
    unablated model or the base, %) and the ASR is the learned judge's; the organism keeps task accuracy."""
    real = SimpleNamespace(preset="smollm2-135m")
    rows = ["none", "ESU", "random≈ESU", "EUU", "random≈EUU", "RU"]
    s = pd.DataFrame({"n": [1, 2, 2, 2, 2, 2], "asr": [3.0, 50.0, 0.0, 10.0, 5.0, 8.0], "asr_sd": 0.0,
                      "utility": 0.0, "utility_sd": 0.0,  # GSM8K: 0 everywhere, as on SmolLM2-135M
                      "ppl": [25.0, 40.0, 28.0, 5000.0, 200.0, 25.1], "ppl_sd": 0.1}, index=rows)
    sec = sfig.Section("classify", "02_classify", cfg=real, results={"summary": s})
    card = pd.DataFrame(sfig._classify_claims(sec, sfig._paper_texts())).set_index("id")
    assert card.loc["euu_utility", "verdict"] == sfig.HOLDS  # 5000 vs 200: a cost GSM8K (0 vs 0) cannot show
    assert card.loc["ru_utility", "verdict"] == sfig.HOLDS  # +0.4% of perplexity, within the 2-point margin
    assert card.loc["euu_utility", "run"].startswith("WikiText-2 perplexity rise 19900.0")
    assert card.loc["esu_asr", "run"].startswith("judged ASR 50.0")
    s2 = s.copy()
    s2.loc["RU", "ppl"] = 38.0  # +52%: the RU are not free on this tier
    card2 = pd.DataFrame(sfig._classify_claims(sfig.Section("classify", "02_classify", cfg=real,
                                                            results={"summary": s2}), sfig._paper_texts())).set_index("id")
    assert card2.loc["ru_utility", "verdict"] == sfig.FAILS
    org = pd.DataFrame(sfig._classify_claims(sfig.Section("classify", "02_classify", cfg=SimpleNamespace(
        preset="organism"), results={"summary": s}), sfig._paper_texts())).set_index("id")
    assert org.loc["euu_utility", "run"].startswith("task accuracy") and org.loc["esu_asr", "run"].startswith("oracle")


def test_a_gpu_real_preset_names_the_judged_asr_and_keeps_task_accuracy():
    """llama2-7b-chat measures no WikiText windows here: its utility stays task accuracy, but it has no oracle."""
    s = pd.DataFrame({"n": [1, 2, 2, 2, 2], "asr": [3.0, 50.0, 0.0, 1.0, 2.0], "asr_sd": 0.0,
                      "utility": [40.0, 38.0, 39.0, 5.0, 35.0], "utility_sd": 0.0},
                     index=["none", "ESU", "random≈ESU", "EUU", "random≈EUU"])
    card = pd.DataFrame(sfig._classify_claims(sfig.Section("classify", "02_classify", cfg=SimpleNamespace(
        preset="llama2-7b-chat"), results={"summary": s}), sfig._paper_texts())).set_index("id")
    assert card.loc["esu_asr", "run"].startswith("judged ASR")
    assert card.loc["euu_utility", "run"].startswith("task accuracy")


def test_params_table_reads_the_runs_fresh_notebooks_before_they_are_published(tmp_path, monkeypatch):
    """make reproduce executes 01-04 into its staging folder and publishes over notebooks/ only at the end,
    so 05 (run before publishing) must read the fresh copies: a parameter added to 02 showed up in CI's
    rerun but not in the committed 05 (its table had read the old committed 02)."""
    import json
    import shutil

    staged = tmp_path / "notebooks"
    staged.mkdir()
    nb = json.loads((sfig.notebook_folder() / "02_classify.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    cell["source"] = "".join(cell["source"]).replace("n_eval = 192", "n_eval = 7")
    (staged / "02_classify.ipynb").write_text(json.dumps(nb))
    monkeypatch.setenv("SSAH_OUTPUT_DIR", str(tmp_path))
    cfg = sfig.make_config("organism", "", 0, require_all=False)
    tab = sfig.params_table(cfg)
    assert tab.loc[("02_classify", "n_eval"), "value"] == "7"  # the staged copy
    assert tab.loc[("01_probe", "n_prompts"), "value"] == "128"  # no staged 01: the committed one
    assert sfig.notebook_dir("", "02_classify") == str(staged) and sfig.notebook_dir("", "01_probe") == ""
    assert sfig.notebook_dir("elsewhere", "02_classify") == "elsewhere"
    shutil.rmtree(staged)
    assert sfig.params_table(cfg).loc[("02_classify", "n_eval"), "value"] == "192"
