"""Stage 05_figures: every figure and table of notebooks 01-04 from cached results only, plus the
paper-vs-run tables and a scorecard of the paper's claims.

Nothing is computed here: each section rebuilds the exact config its notebook used (the notebook's
`parameters` cell, read with `ast` by `notebook_params`, and the stage's `config_from_params`), calls
the stage's own functions inside `cache.read_only()` (so they return cached results or raise
`cache.CacheMiss`) and redraws every figure and table the notebook saves, with the same code and names,
so the files are byte for byte those of the notebook. A section whose results are not cached reports
the `CacheMiss` (which notebook to run); the notebook's `make_config` first checks every section
without writing and stops with `MissingResults` (naming the notebooks to run) when one is missing, so a
05 run never writes a half scorecard.

The scorecard states each claim of the paper, the paper's number (`paper.reported`), this run's
(mean ± sd over the stage's seeds) and a verdict from one stated rule (`judge`), never typed by hand.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from . import cache, plots
from . import config as _config
from .nbparams import notebook_folder, notebook_params, read_parameters  # noqa: F401 (re-exported)
from .paper import reported
from . import stage_budget, stage_classify, stage_freeze, stage_probe
from . import report_budget, report_classify, report_freeze, report_probe
from .report import DRY, FAILS, HOLDS, MISSING, UNTESTABLE, VERDICT_COLORS, Section, close_figures, plot_scorecard, save_scorecard  # noqa: F401,E501 (re-exported)
from .stage_freeze import PAPER_SETTING, paper_dataset
from .stage_freeze import COND_LABELS, HARMFUL_ATTACKS

NOTEBOOKS = {"probe": "01_probe", "classify": "02_classify", "freeze": "03_freeze_finetune",
             "budget": "04_alignment_budget"}
OVERRIDES = ("preset", "model", "seed")  # 05's own parameters, applied to every notebook's

# The verdict rule of the scorecard (the same rule the stage summaries of 02, 03 and 04 state): a
# difference counts when it exceeds twice the larger sd of the two sides, and at least 2 points
# (the sd is floored at `SD_FLOOR` points, so that identical replicates do not make noise look like an effect).
SD_FLOOR = 1.0
K_SD = 2.0
MOST = 50.0  # "most" / "more than half" in the paper's words (Figs 5, 6): a share above 50%


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FiguresConfig:
    """What 05_figures reads: the run (preset, model, seed) and where the notebooks' parameters are."""

    preset: str = "organism"
    model: str = ""  # '' = the preset's models
    seed: int = 0
    notebooks_dir: str = ""  # '' = notebooks/ (the committed defaults); an executed run's folder, e.g. runs/<preset>/

    def overrides(self) -> dict[str, Any]:
        """05's parameters that replace every notebook's (`OVERRIDES`)."""
        return {k: getattr(self, k) for k in OVERRIDES}


class MissingResults(RuntimeError):
    """05_figures was asked to redraw a run whose notebooks have not all been run: nothing is written."""

    def __init__(self, misses: dict[str, str]):
        self.misses = misses
        notebooks = ", ".join(f"notebooks/{NOTEBOOKS[k]}.ipynb" for k in misses)
        detail = "\n".join(f"  - {NOTEBOOKS[k]}: {msg}" for k, msg in misses.items())
        super().__init__(
            f"05_figures redraws every figure and table from cached results only, and these notebooks' results are "
            f"not all cached for this preset, model and seed: {notebooks}. Run them first (`make reproduce` runs "
            f"every notebook), then rerun 05. Nothing was written.\n{detail}")


def missing_sections(cfg: "FiguresConfig") -> dict[str, str]:
    """Section -> why it cannot be redrawn (its CacheMiss or config error), for every section that cannot;
    checked by running each section read-only without writing anything."""
    DRY[0] = True
    try:
        secs = run_all(cfg)
    finally:
        DRY[0] = False
    return {k: s.message for k, s in secs.items() if not s.ok}


def make_config(preset: str = "organism", model: str = "", seed: int = 0, notebooks_dir: str = "", *,
                require_all: bool = True) -> FiguresConfig:
    """The 05 config from its parameters; checks the preset (`config.get_preset`), the model, the seed and
    the folder, and (`require_all`, the notebook's case) that every notebook's results are cached: if one
    is not, `MissingResults` names the notebooks to run and nothing is written."""
    _config.get_preset(preset, model or None)
    _config.check_model_spec(model or "")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not isinstance(notebooks_dir, str):
        raise TypeError(f"notebooks_dir must be a string ('' = notebooks/), got {notebooks_dir!r}")
    folder = notebook_folder(notebooks_dir)
    missing = [nb for nb in NOTEBOOKS.values() if not (folder / f"{nb}.ipynb").is_file()]
    if len(missing) == len(NOTEBOOKS):
        raise ValueError(f"no notebook of {sorted(NOTEBOOKS.values())} in {folder}; set notebooks_dir to the folder "
                         "of notebooks 01-04 (or of an executed run, e.g. runs/<preset>/)")
    cfg = FiguresConfig(preset=preset, model=model or "", seed=int(seed), notebooks_dir=str(notebooks_dir or ""))
    _config.activate_run(preset, model or "", int(seed))
    if require_all:
        misses = missing_sections(cfg)
        if misses:
            raise MissingResults(misses)
    return cfg


def notebook_dir(notebooks_dir: str, notebook: str) -> str:
    """The folder to read `notebook`'s parameters from: `notebooks_dir` when given; else this run's own
    executed copy when there is one (`make reproduce` and `make nb-NN` execute into the run's staging
    folder and publish over notebooks/ only after the last notebook, so 05 must read the fresh copies,
    not the committed ones); else the committed notebooks/ ('')."""
    if notebooks_dir:
        return notebooks_dir
    staged = _config.output_dir("notebooks")
    return str(staged) if (staged / f"{notebook}.ipynb").is_file() else ""


def params_table(cfg: FiguresConfig) -> pd.DataFrame:
    """Every parameter of notebooks 01-04 as 05 uses it, and where its value comes from."""
    rows = []
    for nb in NOTEBOOKS.values():
        path = notebook_folder(notebook_dir(cfg.notebooks_dir, nb)) / f"{nb}.ipynb"
        if not path.is_file():
            continue
        final: dict[str, tuple[Any, str]] = {}
        for k, v, src in read_parameters(path):
            final[k] = (v, src)
        for k, v in cfg.overrides().items():
            if k in final and final[k][0] != v:
                final[k] = (v, "05 parameter")
        rows += [{"notebook": nb, "parameter": k, "value": repr(v), "from": src} for k, (v, src) in final.items()]
    return pd.DataFrame(rows).set_index(["notebook", "parameter"])


# --------------------------------------------------------------------------------------------------
# Sections: one per notebook, each redrawing what the notebook saves
# --------------------------------------------------------------------------------------------------


def _config_for(name: str, params: dict):
    module = {"probe": stage_probe, "classify": stage_classify, "freeze": stage_freeze, "budget": stage_budget}[name]
    return module.config_from_params(params)


# Each notebook's report (its module draws what the notebook saves, from the stage's cached results).
SECTIONS: dict[str, Callable[[Section], None]] = {"probe": report_probe.report, "classify": report_classify.report,
                                                  "freeze": report_freeze.report, "budget": report_budget.report}


def run_section(name: str, cfg: FiguresConfig) -> Section:
    """Rebuild notebook `name`'s config and redraw its figures and tables from the cache (read-only).
    A missing result gives a Section whose `message` is the CacheMiss: which notebook to run first."""
    if name not in SECTIONS:
        raise ValueError(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")
    sec = Section(name, NOTEBOOKS[name])
    try:
        sec.params = notebook_params(sec.notebook, cfg.overrides(), notebook_dir(cfg.notebooks_dir, sec.notebook))
        sec.cfg = _config_for(name, sec.params)
    except (FileNotFoundError, ValueError) as err:
        sec.message = f"cannot rebuild the config of {sec.notebook}: {err}"
        return sec
    buf = io.StringIO()
    try:
        with cache.read_only(notebook=sec.notebook), contextlib.redirect_stdout(buf):
            SECTIONS[name](sec)
    except cache.CacheMiss as err:
        sec.message = str(err)
        sec.results = {}
    finally:
        close_figures()
        sec.log = buf.getvalue()
    return sec


def run_all(cfg: FiguresConfig) -> dict[str, Section]:
    """Every section, in notebook order."""
    return {name: run_section(name, cfg) for name in SECTIONS}


def saved_figure(name: str):
    """The saved PNG `figures/<name>.png`, for display in a notebook."""
    from IPython.display import Image

    path = _config.output_dir("figures") / f"{name}.png"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: nothing has saved figure {name!r} yet")
    return Image(filename=str(path))


def show_figure(sec: Section, name: str):
    """Figure `name` as this run of the section saved it, or why it was not drawn (the CacheMiss), as text."""
    from IPython.display import Pretty

    if not sec.ok:
        return Pretty(f"{name}: not drawn. {sec.message}")
    if ("figure", name) not in sec.written:
        return Pretty(f"{name}: not drawn by {sec.notebook} with these parameters")
    return saved_figure(name)


def section_status(sections: dict[str, Section]) -> pd.DataFrame:
    """One row per notebook: whether its results were found, how many files were redrawn, or what to run."""
    return pd.DataFrame([{"notebook": s.notebook, "found": s.ok,
                          "figures": sum(k == "figure" for k, _ in s.written),
                          "tables": sum(k == "table" for k, _ in s.written),
                          "message": s.message}
                         for s in sections.values()]).set_index("notebook")


# --------------------------------------------------------------------------------------------------
# The verdict rule
# --------------------------------------------------------------------------------------------------

def judge(effect: float, margin: float, expect: str) -> str:
    """The verdict of one comparison: 'higher' holds when effect > margin, 'lower' when effect < -margin,
    'same' when |effect| <= margin; a NaN anywhere is MISSING."""
    if expect not in ("higher", "lower", "same"):
        raise ValueError(f"expect must be 'higher', 'lower' or 'same', got {expect!r}")
    if effect is None or margin is None or not (math.isfinite(effect) and math.isfinite(margin)):
        return MISSING
    ok = {"higher": effect > margin, "lower": effect < -margin, "same": abs(effect) <= margin}[expect]
    return HOLDS if ok else FAILS


def contrast(summary: pd.DataFrame | None, a: str, b: str, metric: str, *, expect: str,
             floor: float | None = None) -> dict:
    """Row `a` against row `b` of a summary frame (columns `metric`, `metric_sd`, `n`; index = condition):
    effect = a − b, margin = K_SD × max(sd_a, sd_b, floor), verdict by `judge`; `floor` None = SD_FLOOR.
    Rows or columns that are absent give MISSING."""
    floor = SD_FLOOR if floor is None else floor
    out = {"run_mean": np.nan, "run_sd": np.nan, "run_n": np.nan, "control_mean": np.nan, "control_sd": np.nan,
           "control_n": np.nan, "effect": np.nan, "margin": np.nan, "verdict": MISSING}
    if summary is None or a not in summary.index or b not in summary.index or metric not in summary.columns:
        return out
    ra, rb = summary.loc[a], summary.loc[b]
    sd = lambda r: float(r[f"{metric}_sd"]) if f"{metric}_sd" in r and pd.notna(r[f"{metric}_sd"]) else 0.0  # noqa: E731
    n = lambda r: float(r["n"]) if "n" in r else 1.0  # noqa: E731
    out.update(run_mean=float(ra[metric]), run_sd=sd(ra), run_n=n(ra), control_mean=float(rb[metric]),
               control_sd=sd(rb), control_n=n(rb))
    out["effect"] = out["run_mean"] - out["control_mean"]
    out["margin"] = K_SD * max(out["run_sd"], out["control_sd"], floor)
    out["verdict"] = judge(out["effect"], out["margin"], expect)
    return out


def versus_value(mean: float, uncertainty: float, value: float, *, expect: str, n: float = np.nan) -> dict:
    """A single estimate against a fixed value (0, chance, 50%): margin = K_SD × its uncertainty."""
    effect, margin = mean - value, K_SD * uncertainty
    return {"run_mean": mean, "run_sd": uncertainty, "run_n": n, "control_mean": value, "control_sd": 0.0,
            "control_n": np.nan, "effect": effect, "margin": margin, "verdict": judge(effect, margin, expect)}


def all_of(*verdicts: str) -> str:
    """Several conditions of one claim: MISSING if any is missing, HOLDS if all hold, else FAILS."""
    if any(v == MISSING for v in verdicts):
        return MISSING
    return HOLDS if all(v == HOLDS for v in verdicts) else FAILS


# --------------------------------------------------------------------------------------------------
# The paper's numbers, as text (from data/paper/reported.csv)
# --------------------------------------------------------------------------------------------------

def _rep(experiment: str, model: str | None = None, setting: str | None = None, metric: str | None = None,
         setting_prefix: str | None = None) -> float:
    df = reported(experiment)
    for col, v in (("model", model), ("setting", setting), ("metric", metric)):
        if v is not None:
            df = df[df[col] == v]
    if setting_prefix is not None:
        df = df[df["setting"].str.startswith(setting_prefix)]
    if len(df) != 1:
        raise KeyError(f"expected one reported row for {experiment}/{model}/{setting or setting_prefix}/{metric}, got {len(df)}")
    return float(df["value"].iloc[0])


def _paper_texts() -> dict[str, str]:
    """The paper's side of each claim, formatted from `paper.reported` (numbers never typed here)."""
    pd_ = reported("probe_distance")
    k = max(int(s.split()[1]) for s in pd_["setting"])
    dr = _rep("probe_distance", setting=f"+refusal {k} tokens")
    dc = _rep("probe_distance", setting=f"+compliance {k} tokens")
    t1 = reported("table1")
    asr = "; ".join(
        f"{m}: {_rep('table1', m, 'dense', 'avg_asr'):.1f} → "
        f"{float(g[(g['setting'].str.startswith('remove ESU')) & (g['metric'] == 'avg_asr')]['value'].iloc[0]):.1f}"
        for m, g in t1.groupby("model", sort=False)
        if ((g["setting"] == "dense") & (g["metric"] == "avg_asr")).any())
    m2 = "Llama-2-7B-chat"
    gsm = {s: _rep("table4", setting=s, metric="gsm8k") for s in ("base", "full SFT (Alpaca)", "RU-only SFT (20%)")}
    base_fr = reported("unit_fractions")
    base_fr = base_fr[base_fr["model"].str.contains("base")]
    base_txt = ", ".join(f"{r.setting} {r.value:.1f}%" for r in base_fr.itertuples())
    return {
        "probe_aligned": f"d(refusal) − d(compliance) = {dr - dc:+.2f} at {k} tokens ({dr:.2f} vs {dc:.2f}; "
                         "Llama-2-7B aligned)",
        "probe_unaligned": "the reverse: closer to compliance (Llama-2-7B unaligned; no number given)",
        "probe_binary": "an implicit binary classification (hypothesis; no probe accuracy reported)",
        "esu_asr": f"average ASR dense → without ESU: {asr} (%)",
        "euu_utility": f"utility −{_rep('table1', m2, setting_prefix='remove EUU', metric='utility_drop'):.1f} points, "
                       f"WikiText-2 ppl {_rep('table1', m2, 'dense', 'wikitext2_ppl'):.2f} → "
                       f"{_rep('table1', m2, setting_prefix='remove EUU', metric='wikitext2_ppl'):.0f} ({m2})",
        "ru_utility": "changes little (Table 1; no number given)",
        "ru_asr": "changes little (Table 1; no number given)",
        "budget_full": f"GSM8K tax {gsm['base'] - gsm['full SFT (Alpaca)']:+.2f} (full SFT) vs "
                       f"{gsm['base'] - gsm['RU-only SFT (20%)']:+.2f} (RU-only) points (LLaMA-7B)",
        "budget_random": "no random-units control in the paper",
        "fig5": "more than half of the ESU become CU (Dolly, Llama-2-7B-chat; no number given)",
        "fig6_ru": f"most base RU stay RU (Llama-2-7B → chat; base: {base_txt})",
        "fig6_euu": f"most base EUU become CU (Llama-2-7B → chat; base: {base_txt})",
    }


def _table2_paper(dataset: str, condition: str) -> float:
    """The paper's AdvBench keyword ASR of Table 2 for one of our fine-tuning sets and conditions (NaN if none)."""

    pds = paper_dataset(dataset)
    if pds is None or condition not in PAPER_SETTING:
        return np.nan
    rep = reported("table2")
    hit = rep[(rep["setting"] == f"{pds}: {PAPER_SETTING[condition]}") & (rep["metric"] == "advbench_keyword_asr")]
    return float(hit["value"].iloc[0]) if len(hit) else np.nan


# --------------------------------------------------------------------------------------------------
# The claims scorecard
# --------------------------------------------------------------------------------------------------

def _pm(mean: float, sd: float, n: float, unit: str = "%", nd: int = 1) -> str:
    if mean is None or not np.isfinite(mean):
        return "-"
    s = f"{mean:.{nd}f}"
    if n == n and n > 1:
        s += f" ± {sd:.{nd}f}"
    return s + unit + (f" (n={int(n)})" if n == n and n > 1 else "")


def _row(cid: str, claim: str, source: str, paper: str, rule: str, res: dict, run: str, control: str,
         verdict: str | None = None, note: str = "") -> dict:
    if not np.isfinite(res.get("run_mean", np.nan)):
        run = control = "-"  # nothing measured: the note says why
    return {"id": cid, "claim": claim, "source": source, "paper": paper, "run": run, "control": control,
            "rule": rule, "verdict": verdict or res["verdict"], "note": note,
            **{k: res.get(k, np.nan) for k in ("effect", "margin", "run_mean", "run_sd", "run_n", "control_mean",
                                               "control_sd", "control_n")}}


def _missing(sec: Section) -> str:
    return f"run notebooks/{sec.notebook}.ipynb first" if not sec.ok else ""


RULE_CONTRAST = "difference beyond {k:g} × the larger sd (sd floored at {f:g} point)"


def _preset(cfg):
    """The preset of a stage config, or None (no config: a notebook not run; or a hand-made one)."""
    name = getattr(cfg, "preset", None)
    return None if name is None else _config.get_preset(name)


def _ppl_utility(cfg) -> bool:
    """Utility is WikiText-2 perplexity on a preset that measures it (the CPU real tier), because GSM8K is
    near 0 for every condition of a 135M model and would make "utility unchanged" hold trivially."""
    p = _preset(cfg)
    return p is not None and int(p.extra.get("wikitext_windows", 0)) > 0


def _asr_word(cfg) -> str:
    """Who calls an answer harmful: the world's oracle on the organism, the learned judge on real models
    (the rule the stage summaries use)."""
    p = _preset(cfg)
    return "oracle ASR" if p is None or p.is_organism else "judged ASR"


def _with_ppl_rise(summary: pd.DataFrame | None, ref: str) -> pd.DataFrame | None:
    """`summary` plus `ppl_rise`: the percent rise of WikiText-2 perplexity over row `ref` (its sd scaled
    alike), so that the scorecard's rule (points, floored at 1) reads as percent of perplexity."""
    if summary is None or ref not in summary.index or "ppl" not in summary.columns:
        return None
    out = summary.copy()
    p0 = float(summary.loc[ref, "ppl"])
    out["ppl_rise"] = 100.0 * (summary["ppl"] / p0 - 1.0)
    out["ppl_rise_sd"] = 100.0 * summary["ppl_sd"] / p0 if "ppl_sd" in summary.columns else 0.0
    return out


def _probe_claims(sec: Section, paper: dict) -> list[dict]:
    rows = []
    d_rule = f"mean over prompts beyond {K_SD:g} standard errors from 0"
    ok = sec.ok
    roles = {}
    if ok:
        dist, point, k = sec.results["dist"], sec.results["point"], sec.results["k_max"]
        d = dist[(dist["point"] == point) & (dist["n_tokens"] == k)].pivot_table(
            index=["role", "prompt_idx"], columns="continuation", values="distance").dropna()
        diff = (d["refusal"] - d["compliance"])
        roles = {role: diff.xs(role, level="role") for role in diff.index.get_level_values("role").unique()}
    for cid, role, expect, claim in (
            ("probe_aligned", "aligned", "lower", "Aligned model: a harmful query's state is closer to the refusal "
                                                  "than to the compliance continuation"),
            ("probe_unaligned", "unaligned", "higher", "Unaligned model: the reverse (closer to compliance)")):
        if ok and role in roles:
            x = roles[role]
            sem = float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else np.nan
            res = versus_value(float(x.mean()), sem, 0.0, expect=expect, n=len(x))
            run = f"d(refusal) − d(compliance) = {res['run_mean']:+.3f} ± {sem:.3f} (sem, {len(x)} prompts, point " \
                  f"{sec.results['point']}, {sec.results['k_max']} tokens)"
            rows.append(_row(cid, claim, "Sec 3, Fig 2", paper[cid], d_rule, res, run, "0 (no preference)"))
        else:
            untestable = ok and role not in roles
            rows.append(_row(cid, claim, "Sec 3, Fig 2", paper[cid], d_rule, {"verdict": MISSING}, "-", "-",
                             UNTESTABLE if untestable else MISSING,
                             f"the preset has no {role} model" if untestable else _missing(sec)))
    claim = "Harmful vs benign is linearly readable from the aligned model (the implicit binary choice)"
    rule = f"held-out balanced accuracy beyond {K_SD:g} binomial sd of chance (0.5)"
    if ok and "aligned" in set(sec.results["acc"]["role"]):
        acc = sec.results["acc"]
        a = acc[(acc["role"] == "aligned") & (acc["point"] == sec.results["point"])].iloc[0]
        n_test = float(a["n_test"])
        res = versus_value(float(a["test_acc"]), math.sqrt(0.25 / n_test), 0.5, expect="higher", n=n_test)
        run = f"{a['test_acc']:.3f} at point {int(a['point'])} ({int(n_test)} held-out requests of unseen activities)"
        rows.append(_row("probe_binary", claim, "Sec 3 (hypothesis)", paper["probe_binary"], rule, res, run,
                         "0.5 (chance)"))
    else:
        rows.append(_row("probe_binary", claim, "Sec 3 (hypothesis)", paper["probe_binary"], rule, {"verdict": MISSING},
                         "-", "-", note=_missing(sec)))
    return rows


def _classify_claims(sec: Section, paper: dict) -> list[dict]:
    s = sec.results.get("summary") if sec.ok else None
    rule = RULE_CONTRAST.format(k=K_SD, f=SD_FLOOR)
    asr = _asr_word(sec.cfg)
    if _ppl_utility(sec.cfg):  # utility = WikiText-2 perplexity, as the rise over the unablated model (%): higher = worse
        s = _with_ppl_rise(s, "none")
        umetric, ucost, uwhat = "ppl_rise", "higher", "WikiText-2 perplexity rise"
    else:
        umetric, ucost, uwhat = "utility", "lower", "task accuracy"
    specs = [
        ("esu_asr", "Removing the ESU raises ASR beyond removing random units of equal size", "ESU", "random≈ESU",
         "asr", "higher", asr),
        ("euu_utility", "Removing the EUU costs utility beyond removing random units of equal size", "EUU",
         "random≈EUU", umetric, ucost, uwhat),
        ("ru_utility", "Removing the RU leaves utility as it is", "RU", "none", umetric, "same", uwhat),
        ("ru_asr", "Removing the RU leaves safety as it is", "RU", "none", "asr", "same", asr),
    ]
    rows = []
    for cid, claim, a, b, metric, expect, what in specs:
        res = contrast(s, a, b, metric, expect=expect)
        run = f"{what} {_pm(res['run_mean'], res['run_sd'], res['run_n'])} without {a}"
        ctrl = (f"{_pm(res['control_mean'], res['control_sd'], res['control_n'])} "
                + ("unablated" if b == "none" else f"without {b}"))
        rows.append(_row(cid, claim, "Sec 4, Table 1", paper[cid], rule if expect != "same" else
                         f"|difference| within {K_SD:g} × the larger sd (sd floored at {SD_FLOOR:g} point)",
                         res, run, ctrl, note=_missing(sec)))
    return rows


def _freeze_claims(sec: Section, paper: dict) -> list[dict]:
    rule = RULE_CONTRAST.format(k=K_SD, f=SD_FLOOR)
    cfg = sec.cfg
    if cfg is None:
        return [_row("freeze", "Freezing ESU (+ CU) during fine-tuning keeps safety (Table 2) and Fig 5",
                     "Sec 5, Table 2", "-", rule, {"verdict": MISSING}, "-", "-", note=sec.message)]
    datasets = cfg.datasets
    rows = []
    for ds in datasets:
        s = sec.results["summary"].loc[ds] if sec.ok and ds in sec.results["summary"].index.get_level_values(0) else None
        kind = "Harmful" if ds in HARMFUL_ATTACKS else ("Identity-shift" if ds.startswith("aoa") else "Benign")  # Qi et al.
        specs = [
            ("ft_erodes", f"{kind} fine-tuning on {ds} raises ASR", "full", "before", "higher"),
            ("freeze_i_vs_full", f"{ds}: freezing ESU + top CU keeps ASR below full fine-tuning", "freeze_esu_topcu",
             "full", "lower"),
            ("freeze_i_vs_random", f"{ds}: freezing ESU + top CU keeps ASR below freezing random units of equal size",
             "freeze_esu_topcu", "freeze_random", "lower"),
            ("freeze_ii_vs_full", f"{ds}: freezing ESU + all CU keeps ASR below full fine-tuning", "freeze_esu_cu",
             "full", "lower"),
            ("freeze_ii_vs_random", f"{ds}: freezing ESU + all CU keeps ASR below freezing random units of equal size",
             "freeze_esu_cu", "freeze_random_cu", "lower"),
        ]
        for cid, claim, a, b, expect in specs:
            if a not in cfg.conditions or b not in cfg.conditions:
                rows.append(_row(f"{cid}:{ds}", claim, "Sec 5, Table 2", "-", rule, {"verdict": UNTESTABLE}, "-", "-",
                                 note=f"condition {a if a not in cfg.conditions else b} not run (`conditions`)"))
                continue
            res = contrast(s, a, b, "asr", expect=expect)
            pa, pb = _table2_paper(ds, a), _table2_paper(ds, b)
            ptxt = (f"keyword ASR {pa:.2f}% ({COND_LABELS[a]}) vs "
                    + (f"{pb:.2f}% ({COND_LABELS[b]})" if pb == pb else "no random control")) if pa == pa else "-"
            run = f"{_asr_word(cfg)} {_pm(res['run_mean'], res['run_sd'], res['run_n'])} ({COND_LABELS[a]})"
            ctrl = f"{_pm(res['control_mean'], res['control_sd'], res['control_n'])} ({COND_LABELS[b]})"
            rows.append(_row(f"{cid}:{ds}", claim, "Sec 5, Table 2", ptxt, rule, res, run, ctrl, note=_missing(sec)))
    for ds in datasets:
        claim = f"Full fine-tuning on {ds} moves more than half of the ESU into CU"
        rule5 = (f"share > {MOST:g}% and above the no-fine-tuning noise floor (calibration halves) by "
                 + RULE_CONTRAST.format(k=K_SD, f=SD_FLOOR))
        tr = sec.results.get("transfer") if sec.ok else None
        if not cfg.relabel:
            rows.append(_row(f"fig5:{ds}", claim, "Sec 4, Fig 5", paper["fig5"], rule5, {"verdict": UNTESTABLE}, "-",
                             "-", note="relabel = False in 03_freeze_finetune"))
            continue
        res = contrast(tr, f"full fine-tuning on {ds}", "no fine-tuning: disjoint calibration halves", "esu_to_cu",
                       expect="higher")
        verdict = all_of(res["verdict"], judge(res["run_mean"] - MOST, 0.0, "higher"))
        run = f"{_pm(res['run_mean'], res['run_sd'], res['run_n'])} of ESU become CU"
        ctrl = f"{_pm(res['control_mean'], res['control_sd'], res['control_n'])} with no fine-tuning"
        rows.append(_row(f"fig5:{ds}", claim, "Sec 4, Fig 5", paper["fig5"], rule5, res, run, ctrl, verdict,
                         note=_missing(sec)))
    return rows


def _budget_claims(sec: Section, paper: dict) -> list[dict]:
    rule = RULE_CONTRAST.format(k=K_SD, f=SD_FLOOR)
    s = sec.results.get("summary") if sec.ok else None
    conds = sec.cfg.conditions if sec.cfg is not None else ()
    rows = []
    for cid, claim, b in (("budget_full", "Aligning only the base's RU has a lower alignment tax than full SFT", "full"),
                          ("budget_random", "Aligning only the base's RU has a lower alignment tax than aligning random "
                                            "units of the same size", "random_only")):
        if sec.cfg is not None and not {"ru_only", b} <= set(conds):
            rows.append(_row(cid, claim, "Sec 6, Table 4", paper[cid], rule, {"verdict": UNTESTABLE}, "-", "-",
                             note="condition not run (`conditions`)"))
            continue
        if _ppl_utility(sec.cfg):  # the tax in WikiText-2 perplexity (% rise over the base): GSM8K is ~0 here
            res = contrast(_with_ppl_rise(s, "base"), "ru_only", b, "ppl_rise", expect="lower")
            unit, what = "%", "tax (WikiText-2 perplexity rise over the base)"
        else:
            res = contrast(s, "ru_only", b, "alignment_tax", expect="lower")
            unit, what = " points", "tax"
        run = f"{what} {_pm(res['run_mean'], res['run_sd'], res['run_n'], unit)} (RU-only)"
        ctrl = f"{_pm(res['control_mean'], res['control_sd'], res['control_n'], unit)} ({b})"
        rows.append(_row(cid, claim, "Sec 6, Table 4", paper[cid], rule, res, run, ctrl, note=_missing(sec)))
    tr = sec.results.get("transfer") if sec.ok else None
    rule6 = (f"share > {MOST:g}% and above the label's share among all units after (chance under independence) "
             f"by more than {K_SD * SD_FLOOR:g} points ({K_SD:g} × the sd floor: one labelling, no sd)")
    for cid, claim, before, after in (("fig6_ru", "Most of the base's RU stay RU after alignment", "RU", "RU"),
                                      ("fig6_euu", "Most of the base's EUU become CU after alignment", "EUU", "CU")):
        if tr is None or "reference" not in tr["matrices"]:
            rows.append(_row(cid, claim, "Sec 4, Fig 6", paper[cid], rule6, {"verdict": MISSING}, "-", "-",
                             note=_missing(sec)))
            continue
        share = float(tr["matrices"]["reference"].loc[before, after])
        chance = float(tr["shares"].loc[after, "reference"])
        margin = K_SD * SD_FLOOR
        res = {"run_mean": share, "run_sd": np.nan, "run_n": 1, "control_mean": chance, "control_sd": np.nan,
               "control_n": np.nan, "effect": share - chance, "margin": margin}
        verdict = all_of(judge(share - MOST, 0.0, "higher"), judge(share - chance, margin, "higher"))
        run = f"{share:.1f}% of base {before} are {after} in the shipped aligned model"
        ctrl = f"{chance:.1f}% of all its units are {after}"
        rows.append(_row(cid, claim, "Sec 4, Fig 6", paper[cid], rule6, res, run, ctrl, verdict))
    return rows


def claims_scorecard(sections: dict[str, Section]) -> pd.DataFrame:
    """One row per claim of the paper: the paper's number, this run's, the control, the rule and the verdict."""
    paper = _paper_texts()
    rows = (_probe_claims(sections["probe"], paper) + _classify_claims(sections["classify"], paper)
            + _freeze_claims(sections["freeze"], paper) + _budget_claims(sections["budget"], paper))
    return pd.DataFrame(rows).set_index("id")


# --------------------------------------------------------------------------------------------------
# Paper-vs-run tables, one per experiment of data/paper/reported.csv
# --------------------------------------------------------------------------------------------------

_PVR_COLS = ["model", "setting", "metric", "unit", "paper", "source", "our_condition", "our_metric", "ours", "ours_sd",
             "ours_n", "sd_over", "note"]


def _pvr(experiment: str, match: Callable[[pd.Series], dict]) -> pd.DataFrame:
    rep = reported(experiment).rename(columns={"value": "paper"})
    rows = []
    for _, r in rep.iterrows():
        ours = {"our_condition": "", "our_metric": "", "ours": np.nan, "ours_sd": np.nan, "ours_n": np.nan,
                "sd_over": "", "note": ""}
        ours.update(match(r))
        rows.append({**{k: r[k] for k in ("model", "setting", "metric", "unit", "paper", "source")}, **ours})
    return pd.DataFrame(rows, columns=_PVR_COLS)


def _from_summary(s: pd.DataFrame | None, cond: str, metric: str, sd_over: str, sec: Section) -> dict:
    if not sec.ok:
        return {"our_condition": cond, "our_metric": metric, "note": _missing(sec)}
    if s is None or cond not in s.index or metric not in s.columns:
        return {"our_condition": cond, "our_metric": metric, "note": "not in this run"}
    r = s.loc[cond]
    return {"our_condition": cond, "our_metric": metric, "ours": float(r[metric]),
            "ours_sd": float(r.get(f"{metric}_sd", np.nan)), "ours_n": float(r.get("n", 1)), "sd_over": sd_over}


def paper_vs_run_tables(sections: dict[str, Section]) -> dict[str, pd.DataFrame]:
    """`paper_vs_run_<experiment>`: every reported row of the paper beside this run's analogue (mean, sd,
    n and what the sd is over), or a note saying why there is none."""
    probe, cls, frz, bud = (sections[k] for k in ("probe", "classify", "freeze", "budget"))

    def m_probe(r):
        cont, k = r["setting"].split()[0].lstrip("+"), int(r["setting"].split()[1])
        if not probe.ok:
            return {"our_condition": f"aligned +{cont}", "our_metric": "cosine_distance", "note": _missing(probe)}
        t2 = probe.results["t2"]
        hit = t2[(t2["role"] == "aligned") & (t2["continuation"] == cont) & (t2["n_tokens"] == k)]
        if hit.empty:
            return {"note": f"{k} tokens not in this run's lengths"}
        h = hit.iloc[0]
        return {"our_condition": f"aligned +{cont}, point {probe.results['point']}", "our_metric": "cosine_distance",
                "ours": float(h["mean"]), "ours_sd": float(h["sem"] * np.sqrt(h["n"])), "ours_n": float(h["n"]),
                "sd_over": "prompts"}

    def m_fractions(r):
        label = r["setting"]
        if "base" in r["model"]:
            if not bud.ok:
                return {"our_condition": "base", "our_metric": "pct_units", "note": _missing(bud)}
            fr = bud.results["base_fractions"]
            return {"our_condition": "base (RU = the budget)", "our_metric": "pct_units",
                    "ours": float(fr.loc[label, "pct_units"]), "ours_n": 1.0, "sd_over": "",
                    "note": "RU is the budget's share of parameters by construction"}
        if not cls.ok:
            return {"our_condition": "aligned", "our_metric": "pct_units", "note": _missing(cls)}
        fr = cls.results["fractions"]
        return {"our_condition": "aligned", "our_metric": "pct_units", "ours": float(fr.loc[label, "pct_units"]),
                "ours_sd": float(fr.loc[label, "pct_units_sd"]), "ours_n": float(len(cls.cfg.calib.seeds)),
                "sd_over": "calibration seeds"}

    def m_table1(r):
        s = cls.results.get("summary") if cls.ok else None
        cond = "none" if r["setting"] == "dense" else r["setting"].split()[1]
        metric = {"avg_asr": "asr_kw", "avg_utility": "utility", "wikitext2_ppl": "ppl", "utility_drop": "utility"}[r["metric"]]
        out = _from_summary(s, cond, metric, "calibration seeds", cls)
        if r["metric"] == "utility_drop" and np.isfinite(out.get("ours", np.nan)):
            out.update(ours=float(s.loc["none", "utility"]) - out["ours"], our_metric="utility drop (none − this)")
        if r["metric"] == "avg_asr":
            out["note"] = "; ".join(x for x in (out.get("note", ""), "keyword judge (the paper's); the oracle ASR is "
                                                "in table1_classify") if x)
        return out

    def m_table2(r):
        pds, setting = r["setting"].split(": ", 1)
        inv = {v: k for k, v in PAPER_SETTING.items()}
        cond = inv.get(setting, "")
        ds = next((d for d in (frz.cfg.datasets if frz.cfg is not None else ()) if paper_dataset(d) == pds), None)
        if ds is None:
            return {"note": f"no {pds} analogue among the fine-tuning sets"}
        if r["metric"] != "advbench_keyword_asr":
            return {"our_condition": f"{ds}: {cond}", "note": "no analogue (GPT-4 judge of HEx-PHI)"}
        s = frz.results["summary"].loc[ds] if frz.ok and ds in frz.results["summary"].index.get_level_values(0) else None
        out = _from_summary(s, cond, "asr_kw", "replicates", frz)
        out["our_condition"] = f"{ds}: {cond}"
        return out

    def m_table4(r):
        cond = {"base": "base", "full SFT (Alpaca)": "full", "RU-only SFT (20%)": "ru_only"}.get(r["setting"], "")
        if r["metric"] != "gsm8k":
            return {"our_condition": cond, "note": f"no analogue of {r['metric']} on this model"}
        s = bud.results.get("summary") if bud.ok else None
        return _from_summary(s, cond, "utility", "training seeds", bud)

    return {f"paper_vs_run_{e}": _pvr(e, f) for e, f in (("probe_distance", m_probe), ("unit_fractions", m_fractions),
                                                          ("table1", m_table1), ("table2", m_table2),
                                                          ("table4", m_table4))}


def write_paper_tables(sections: dict[str, Section]) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Build, save and return the claims scorecard (table + figure) and the paper-vs-run tables."""
    card = claims_scorecard(sections)
    plots.save_table(card, "claims_scorecard")
    save_scorecard(card, "fig_claims_scorecard")
    pvr = paper_vs_run_tables(sections)
    for name, df in pvr.items():
        plots.save_table(df, name)
    return card, pvr


# --------------------------------------------------------------------------------------------------
# Summary in words
# --------------------------------------------------------------------------------------------------

def summary_text(sections: dict[str, Section], card: pd.DataFrame) -> str:
    """What 05 found, every number read from the sections and the scorecard."""
    found = [s.notebook for s in sections.values() if s.ok]
    missing = [s.notebook for s in sections.values() if not s.ok]
    n_files = sum(len(s.written) for s in sections.values())
    lines = [f"Read from the cache: {', '.join(found) or 'nothing'}"
             + (f"; not found (run them first): {', '.join(missing)}." if missing else ".")
             + f" Redrawn: {n_files} figures and tables of notebooks 01-04, plus the scorecard and "
             "paper-vs-run tables."]
    counts = card["verdict"].value_counts()
    lines.append(f"Verdicts of the {len(card)} claims: " + ", ".join(
        f"{v}: {int(counts.get(v, 0))}" for v in (HOLDS, FAILS, MISSING, UNTESTABLE)) + ".")
    for v in (HOLDS, FAILS):
        ids = card.index[card["verdict"] == v]
        if len(ids):
            lines.append(f"{v.capitalize()}:")
            lines += [f"  - {card.loc[i, 'claim']}: {card.loc[i, 'run']} vs {card.loc[i, 'control']}." for i in ids]
    return "\n".join(lines)


# The names of everything 05 writes besides the notebooks' own outputs (those are checked by a test
# against the notebooks' save calls).
OWN_OUTPUTS = ("claims_scorecard", "fig_claims_scorecard", "judge_agreement") + tuple(
    f"paper_vs_run_{e}" for e in ("probe_distance", "unit_fractions", "table1", "table2", "table4"))

__all__ = ["FiguresConfig", "Section", "make_config", "notebook_params", "read_parameters", "params_table",
           "run_section", "run_all", "show_figure", "saved_figure", "section_status", "judge", "contrast", "versus_value", "all_of",
           "claims_scorecard", "plot_scorecard", "paper_vs_run_tables", "write_paper_tables", "summary_text",
           "judge_agreement", "NOTEBOOKS", "SECTIONS", "OWN_OUTPUTS", "HOLDS", "FAILS", "MISSING", "UNTESTABLE"]


# --------------------------------------------------------------------------------------------------
# The judges behind the numbers (issue: judges that agree with people)
# --------------------------------------------------------------------------------------------------

JUDGE_AGREEMENT_CSV = _config.REPO_ROOT / "docs" / "judges" / "agreement.csv"
# The rows a reader needs (every other row is in the CSV): the paper's ASR rule and refusal list, the
# JailbreakBench list, the evaluation's keyword judge, and the CV-selected learned judge on each training set.
_JUDGE_ROWS = (("paper-asr", ""), ("wei2024-cs", ""), ("jailbreakbench-cs", ""), ("eval-keyword", ""),
               ("learned (CV-selected)", "xstest only"), ("learned (CV-selected)", "xstest+alpaca"),
               ("learned (CV-selected)", "xstest+alpaca+llama2-7b-refusals"))


def judge_agreement(path: str | None = None) -> pd.DataFrame:
    """How well each refusal judge agrees with people on XSTest completions of a chat model it never saw
    (leave-one-model-out; `scripts/judge_agreement.py` writes the CSV, docs/judges/README.md explains it):
    accuracy and Cohen's kappa with bootstrap 95% CIs, one row per (held-out model, judge, training data)."""
    p = JUDGE_AGREEMENT_CSV if path is None else Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} is missing: run `python scripts/judge_agreement.py` to write it.")
    d = pd.read_csv(p)
    d["train_data"] = d["train_data"].fillna("")
    rows = []
    for test_model, g in d.groupby("test_model", sort=True):
        for judge_name, train in _JUDGE_ROWS:
            r = g[(g["judge"] == judge_name) & (g["train_data"] == train)]
            if len(r) != 1:
                raise ValueError(f"{p}: expected one row for judge {judge_name!r}, train data {train!r}, "
                                 f"held-out model {test_model!r}, found {len(r)}: rerun scripts/judge_agreement.py.")
            r = r.iloc[0]
            rows.append({"held-out model": test_model, "judge": judge_name, "trained on": train or "-",
                         "n": int(r["n"]),
                         "accuracy": f"{r['accuracy']:.2f} [{r['accuracy_lo']:.2f}, {r['accuracy_hi']:.2f}]",
                         "kappa": f"{r['kappa']:.2f} [{r['kappa_lo']:.2f}, {r['kappa_hi']:.2f}]"})
    return pd.DataFrame(rows).set_index(["held-out model", "judge", "trained on"])
