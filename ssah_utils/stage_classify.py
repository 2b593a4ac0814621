"""Stage 02_classify: score, label and ablate ESU / EUU / CU / RU units (paper Sec. 4, Table 1).

The notebook calls one function per step; each step is cached under the parts of the config it
depends on (`cache.cached`), so changing an evaluation setting never re-scores and a rerun is free.

Steps: `calibration` (safety pairs = harmful prompts with the aligned model's own refusals, or the
set's references; utility pairs = benign instructions with answers; several seeded draws) ->
`scores` (WIFV, and the alternative scorers for the stability check) -> `labels` -> `table1`
(ablate each kind and random masks of equal composition; evaluate safety and utility) ->
`stability` (Jaccard of ESU across calibration seeds, disjoint halves and scorers) ->
`dose_response` (ASR and utility as more units of each ranking are removed).
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import random
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import torch

from . import cache
from . import config as _config
from . import datasets
from .ablation import ablate
from .flap import flap_labels, flap_stats, flap_z
from .nbparams import notebook_params
from .models import UnitMask, adapter_for, load_model, model_revision
from .units import (LABELS, Labels, activation_stats, jaccard, label_units, ranked_mask, score_units, unit_groups,
                    wifv_authors_z)
from . import evaluation
from .evaluation import EvalSuite
from .generation import encode_pairs, without_final_eos
from .paper import reported

STAGE = "classify"
WIFV_VARIANTS = ("authors", "plain", "flap")


@dataclass(frozen=True)
class CalibConfig:
    """How the calibration sets are drawn (paper: 128 safety + 128 utility samples)."""

    safety_set: str = "calib_safety"
    utility_set: str = "calib_utility"
    n_calib: int = 128
    seeds: tuple[int, ...] = (0, 1, 2)  # one labelling per seed: the error bars of the ablation rows
    safety_responses: str = "model"  # "model": the aligned model's own greedy answers (paper); "reference": the set's
    only_refusals: bool = True  # keep only answers the judge calls refusals (the paper's pairs are refusals)
    style: str = "chat"
    max_new_tokens: int = 48  # for generating the model's own refusals
    max_length: int = 256
    batch_size: int = 32
    # False: each response's closing eos is not scored (the authors' calibration text has none); not printed
    score_eos: bool = field(default=True, repr=False)


@dataclass(frozen=True)
class ClassifyConfig:
    """Everything that determines the results of 02_classify; `asdict()` keys the cache."""

    preset: str
    model: str  # the aligned model spec
    seed: int = 0
    dtype: str = "float32"
    device: str = "auto"
    scorer: str = "wifv"  # the scorer that labels units (the paper's); others are compared in `stability`
    wifv_variant: str = "authors"  # "authors": z-score o_proj channels (metric squared), then mean per head; "plain": pool,
    # then z; "flap": the authors' z-scores on FLAP's streaming statistics with FLAP's thresholds (ssah_utils.flap)
    compare_scorers: tuple[str, ...] = ("wanda", "snip")
    h: tuple[float, float, float] = (0.10, 0.01, 0.10)  # RU, ESU, EUU thresholds (authors' code)
    threshold_rule: str = "nearest"  # FLAP's global threshold (closest prefix) or "floor" (never above h)
    bias_from: str = "safety"  # calibration tokens whose mean feeds FLAP bias compensation: safety (authors' code)|utility|both|none
    n_random_seeds: int = 3  # random masks of each category's composition (the null)
    dose_fractions: tuple[float, ...] = (0.01, 0.02, 0.05, 0.10, 0.20)  # shares of parameters removed
    n_dose: int = 64  # prompts per set in the dose-response curve
    calib: CalibConfig = CalibConfig()
    eval: EvalSuite = EvalSuite()  # what measures safety and utility after an ablation (n_eval prompts a set)

    def __post_init__(self) -> None:
        if self.bias_from not in ("both", "safety", "utility", "none"):
            raise ValueError(f"bias_from must be both|safety|utility|none, got {self.bias_from!r}")
        if self.wifv_variant not in WIFV_VARIANTS:
            raise ValueError(f"wifv_variant must be one of {WIFV_VARIANTS}, got {self.wifv_variant!r}")
        if self.calib.safety_responses not in ("model", "reference"):
            raise ValueError(f"safety_responses must be 'model' or 'reference', got {self.calib.safety_responses!r}")
        if not self.calib.seeds:
            raise ValueError("calib.seeds needs at least one seed")


def make_config(preset: str = "organism", model: str | None = None, seed: int = 0, *, h0: float = 0.10,
                h1: float = 0.01, h2: float = 0.10, threshold_rule: str = "nearest", wifv_variant: str = "authors",
                n_calib: int = 128, n_calib_seeds: int = 3,
                safety_responses: str = "model", scorer: str = "wifv", bias_from: str = "safety",
                n_random_seeds: int = 3, n_eval: int = 192, n_dose: int = 64, batch_size: int | None = None,
                dose_fractions: tuple[float, ...] = (0.01, 0.02, 0.05, 0.10, 0.20), score_eos: bool = True) -> ClassifyConfig:
    """The stage config from the notebook's parameters and a preset (`config.get_preset`).
    `batch_size` overrides the preset's for generation and scoring (on a CPU larger batches of a small
    model cost less per prompt)."""
    c = _config
    p = c.get_preset(preset, model or None)
    c.check_model_spec(model or "")
    seed = c.check_seed(seed)
    for name, v in (("h0", h0), ("h1", h1), ("h2", h2)):
        c.check_float(name, v, 0.0, 1.0, open_low=True, open_high=True)
    c.check_choice("threshold_rule", threshold_rule, ("nearest", "floor"))
    c.check_choice("wifv_variant", wifv_variant, WIFV_VARIANTS)
    if not isinstance(score_eos, bool):
        raise ValueError(f"score_eos must be True or False, got {score_eos!r}")
    if wifv_variant == "flap" and scorer != "wifv":
        raise ValueError(f"wifv_variant='flap' is a WIFV estimator; it needs scorer='wifv', not {scorer!r}")
    c.check_choice("scorer", scorer, ("wifv", "wanda", "snip"))
    c.check_choice("safety_responses", safety_responses, ("model", "reference"))
    c.check_choice("bias_from", bias_from, ("both", "safety", "utility", "none"))
    c.check_int("n_calib", n_calib, 1)
    c.check_int("n_calib_seeds", n_calib_seeds, 1)
    c.check_int("n_random_seeds (random masks of each category's composition: the null; at least one)", n_random_seeds, 1)
    c.check_int("n_eval", n_eval, 1)
    c.check_int("n_dose", n_dose, 1)
    if batch_size is not None:
        c.check_int("batch_size", batch_size, 1)
    if not dose_fractions or isinstance(dose_fractions, str):
        raise ValueError(f"dose_fractions must be a non-empty tuple of shares in (0, 1), got {dose_fractions!r}")
    for f in dose_fractions:
        c.check_float("dose_fractions", f, 0.0, 1.0, open_low=True, open_high=True)
    check_calib_size(p.calib_safety, p.calib_utility, int(n_calib), int(n_calib_seeds))
    bs = int(batch_size or p.batch_size)
    calib = CalibConfig(safety_set=p.calib_safety, utility_set=p.calib_utility, n_calib=int(n_calib),
                        seeds=tuple(seed + i for i in range(int(n_calib_seeds))),
                        safety_responses=safety_responses, max_new_tokens=p.max_new_tokens, batch_size=bs,
                        score_eos=score_eos)
    ev = EvalSuite(harmful_set=p.harmful_test, jailbreak_set=p.jailbreak_test, borderline_set=p.borderline_test,
                   utility_set=p.utility_test, ppl_set="ppl_heldout" if p.is_organism else None,
                   n_eval=int(n_eval), system_prompt=p.system_prompt, max_new_tokens=p.max_new_tokens,
                   batch_size=bs, wikitext_windows=int(p.extra.get("wikitext_windows", 0)),
                   n_nll=int(p.extra.get("n_nll", 0)))
    others = tuple(s for s in ("wifv", "wanda", "snip") if s != scorer)
    c.activate_run(preset, model or "", seed)
    return ClassifyConfig(preset=p.name, model=p.aligned, seed=int(seed), dtype=p.dtype, device=p.device, scorer=scorer,
                          compare_scorers=others, h=(float(h0), float(h1), float(h2)), threshold_rule=threshold_rule,
                          wifv_variant=wifv_variant, bias_from=bias_from,
                          n_random_seeds=int(n_random_seeds), dose_fractions=tuple(float(f) for f in dose_fractions),
                          n_dose=int(n_dose), calib=calib, eval=ev)


def check_calib_size(safety_set: str, utility_set: str, n_calib: int, n_seeds: int) -> None:
    """Refuse an `n_calib` that the calibration sets cannot give (no silent cap): more pairs than a set
    holds, or, with several draws, the whole set (every draw would be the same, so the spread over
    calibration seeds would be 0 by construction). Checked against the sets' sizes before any model is
    loaded; with several draws the safety pool (the model's own refusals) is checked again once it is
    known. A single draw of a model that refuses fewer prompts than `n_calib` uses all its refusals
    (04 relabels aligned runs this way); the calibration summary records how many."""
    for role, name in (("safety", safety_set), ("utility", utility_set)):
        try:
            size = len(datasets.load_set(name))
        except (datasets.DatasetUnavailableError, FileNotFoundError):
            continue  # not on this machine: the pool check after generation still applies
        _check_pool(role, name, size, n_calib, n_seeds)


def _check_pool(role: str, name: str, size: int, n_calib: int, n_seeds: int) -> None:
    if n_calib > size:
        raise ValueError(f"n_calib={n_calib} but the {role} calibration pool ({name}) has only {size} usable pairs; "
                         f"use n_calib <= {size} (paper: 128)")
    if n_seeds > 1 and n_calib == size:
        raise ValueError(f"n_calib={n_calib} takes the whole {role} calibration pool ({name}, {size} pairs), so all "
                         f"{n_seeds} calibration draws would be identical and their spread 0 by construction; use "
                         f"n_calib < {size} or n_calib_seeds=1")


def config_from_params(params: dict) -> ClassifyConfig:
    """The config that 02_classify's config cell builds from its parameters (`model` '' and
    `batch_size` 0 mean the preset's), for 05_figures: the one mapping from notebook parameters to the
    stage config. A test checks it against the notebook's own cell."""
    kw = dict(params)
    kw["model"] = kw.get("model") or None
    if "batch_size" in kw:
        kw["batch_size"] = kw["batch_size"] or None
    valid = set(inspect.signature(make_config).parameters)
    if set(kw) - valid:
        raise ValueError(f"unknown 02_classify parameters {sorted(set(kw) - valid)}; valid: {sorted(valid)}")
    return make_config(**kw)

def notebook_config(preset: str, model: str | None, seed: int) -> ClassifyConfig:
    """02_classify's config as its notebook runs it for this preset, model and seed (its `parameters`
    cell and the preset's CPU-sized defaults, `nbparams.notebook_params`), so that 03 and 04 use the
    very labels 02 reports and reuse its cache. Without the notebooks (an installed package): 02's
    `make_config` defaults."""
    try:
        params = notebook_params("02_classify", {"preset": preset, "model": model or "", "seed": int(seed)})
    except FileNotFoundError:
        return make_config(preset, model or None, seed)
    return config_from_params(params)


# --------------------------------------------------------------------------------------------------
# Model (loaded once per process)
# --------------------------------------------------------------------------------------------------

_LOADED: dict[tuple[str, str, str], tuple] = {}


def load(cfg: ClassifyConfig):
    """(model, tokenizer) of the config's aligned model, loaded once per process."""
    key = (cfg.model, cfg.dtype, cfg.device)
    if key not in _LOADED:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Loading weights" bars (with timings) in notebook outputs
        _LOADED[key] = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    return _LOADED[key]


def _data_revision(cfg: ClassifyConfig) -> str:
    """The content of the prompt sets the stage reads (`datasets.sets_revision`)."""
    return datasets.sets_revision([cfg.calib.safety_set, cfg.calib.utility_set, cfg.eval.harmful_set,
                                   cfg.eval.jailbreak_set, cfg.eval.borderline_set, cfg.eval.utility_set,
                                   cfg.eval.ppl_set])


def _rev(cfg: ClassifyConfig) -> str:
    """Cache revision: the model's weights and the data's content."""
    return f"{model_revision(load(cfg)[0])}|data:{_data_revision(cfg)}"


_MEMO: dict[tuple[str, str, str], dict] = {}


def _cached(stage: str, key, compute, cfg: "ClassifyConfig") -> dict:
    """`cache.cached`, memoised in the process so that later steps reuse a result without rereading it."""
    rev = _rev(cfg)
    k = (stage, cache.config_key(stage, key, rev), str(_config.CACHE_DIR))
    if k not in _MEMO:
        _MEMO[k] = cache.cached(stage, key, compute, model_revision=rev)
    return _MEMO[k]


@dataclass(frozen=True)
class _Key:
    model: str
    dtype: str
    part: object
    extra: object = None


# --------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------

def calibration(cfg: ClassifyConfig) -> dict:
    """The calibration pairs: `safety` and `utility` DataFrames (prompt, response, draw columns
    `seed_<s>` marking the records of each seeded draw) and a `summary` of how they were made."""
    model, tok = load(cfg)
    c = cfg.calib

    def compute() -> dict:
        s_recs = datasets.load_set(c.safety_set)
        if c.safety_responses == "model":
            df = evaluation.evaluate_behaviour(model, tok, s_recs, style=c.style, system_prompt=None,
                                                  max_new_tokens=c.max_new_tokens, batch_size=c.batch_size)
            safety = pd.DataFrame({"id": df["id"], "prompt": df["prompt"], "response": df["response"],
                                   "verdict": df["verdict"]})
        else:
            safety = pd.DataFrame({"id": [r["id"] for r in s_recs], "prompt": [r["prompt"] for r in s_recs],
                                   "response": [r["reference"] for r in s_recs], "verdict": "reference"})
        pool = safety[safety["verdict"].isin(["refusal", "reference"])] if c.only_refusals else safety
        pool = pool[pool["response"].str.strip() != ""]
        if len(pool) < 2:  # a draw is also cut into two disjoint halves (`_draws`): each needs a refusal
            raise ValueError(f"the model refused {'none' if pool.empty else 'only one'} of the {len(safety)} "
                             f"{c.safety_set} prompts, so there is no refusal to calibrate on (two at least: the "
                             "disjoint halves of a draw each take one); use safety_responses='reference' (the set's "
                             "refusals)")
        u_recs = datasets.load_set(c.utility_set)
        utility = pd.DataFrame({"id": [r["id"] for r in u_recs], "prompt": [r["prompt"] for r in u_recs],
                                "response": [r["reference"] for r in u_recs]})
        if len(c.seeds) > 1:  # one draw may take the whole pool (the summary's n_*_per_draw says how many)
            _check_pool("safety", f"{c.safety_set}, answers judged refusals" if c.only_refusals else c.safety_set,
                        len(pool), c.n_calib, len(c.seeds))
            _check_pool("utility", c.utility_set, len(utility), c.n_calib, len(c.seeds))
        for s in c.seeds:
            keep_s = set(random.Random(s).sample(list(pool["id"]), min(c.n_calib, len(pool))))
            keep_u = set(random.Random(s).sample(list(utility["id"]), min(c.n_calib, len(utility))))
            safety[f"seed_{s}"] = safety["id"].isin(keep_s)
            utility[f"seed_{s}"] = utility["id"].isin(keep_u)
        summary = {"safety_pool": len(safety), "safety_refusal_rate": float((safety["verdict"] == "refusal").mean())
                   if c.safety_responses == "model" else None, "safety_kept": int(len(pool)),
                   "n_safety_per_draw": int(min(c.n_calib, len(pool))), "n_utility_per_draw": int(min(c.n_calib, len(utility)))}
        return {"safety": safety, "utility": utility, "summary": summary}

    return _cached(f"{STAGE}_calib", _Key(cfg.model, cfg.dtype, c), compute, cfg)


def _encode(tok, df: pd.DataFrame, c: CalibConfig) -> dict[str, torch.Tensor]:
    enc = encode_pairs(tok, list(df["prompt"]), list(df["response"]), style=c.style, system_prompt=None,
                       max_length=c.max_length)
    return enc if c.score_eos else without_final_eos(enc, tok.eos_token_id)


def _draws(cfg: ClassifyConfig, calib: dict) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """Named calibration draws: `seed_<s>` for every seed, and the disjoint halves `half_a`/`half_b`
    of the first seed's draw (no shared sample, unlike two seeded draws from one pool)."""
    s, u = calib["safety"], calib["utility"]
    out = {f"seed_{k}": (s[s[f"seed_{k}"]], u[u[f"seed_{k}"]]) for k in cfg.calib.seeds}
    s0, u0 = out[f"seed_{cfg.calib.seeds[0]}"]
    out["half_a"] = (s0.iloc[0::2], u0.iloc[0::2])
    out["half_b"] = (s0.iloc[1::2], u0.iloc[1::2])
    return out


# --------------------------------------------------------------------------------------------------
# Scores and labels
# --------------------------------------------------------------------------------------------------

def scores(cfg: ClassifyConfig) -> dict:
    """Raw unit scores per (draw, scorer, set) as float64 tensors named `<draw>/<scorer>/<S|U>`, the
    o_proj/down_proj input statistics of each seeded draw (`stats`, for bias compensation) and timings."""
    model, tok = load(cfg)
    calib = calibration(cfg)

    def compute() -> dict:
        import time

        out, stats, timing = {}, {}, []
        for name, (s_df, u_df) in _draws(cfg, calib).items():
            scorers = (cfg.scorer,) + (cfg.compare_scorers if name == f"seed_{cfg.calib.seeds[0]}" else ())
            for scorer in scorers:
                for tag, df in (("S", s_df), ("U", u_df)):
                    enc = _encode(tok, df, cfg.calib)
                    t0 = time.perf_counter()
                    sc, st = score_units(model, enc, scorer, batch_size=min(32, cfg.calib.batch_size))
                    timing.append({"draw": name, "scorer": scorer, "set": tag, "tokens": int(enc["response_mask"].sum()),
                                   "seconds": time.perf_counter() - t0})
                    out[f"{name}/{scorer}/{tag}"] = sc
                    if scorer == "wifv":
                        out[f"{name}/wifv_authors_z/{tag}"] = wifv_authors_z(model, st)
                    if scorer == "wifv" and cfg.wifv_variant == "flap":
                        out[f"{name}/wifv_flap_z/{tag}"] = flap_z(model, flap_stats(model, enc))
                    if scorer == "wifv" and name.startswith("seed_"):
                        stats[f"{name}/{tag}"] = st
            if not any(k.startswith(f"{name}/") for k in stats) and name.startswith("seed_"):
                for tag, df in (("S", s_df), ("U", u_df)):
                    stats[f"{name}/{tag}"] = activation_stats(model, _encode(tok, df, cfg.calib))
        return {"scores": out, "stats": stats, "timing": pd.DataFrame(timing)}

    flap = ("flap",) if cfg.wifv_variant == "flap" else ()
    key = _Key(cfg.model, cfg.dtype, cfg.calib, (cfg.scorer, cfg.compare_scorers) + flap)
    return _cached(f"{STAGE}_scores", key, compute, cfg)


_LABELS: dict[tuple, Labels] = {}


def _label(cfg: ClassifyConfig, shape, scorer: str, raw: dict, z: dict | None) -> Labels:
    """Labels from the S/U scores of one draw: the authors' per-matrix z-scores when the WIFV variant is
    "authors" (`z`), else the raw scores, with the config's h and threshold rule; "flap": the authors'
    z-scores of FLAP's statistics (`z`) with FLAP's thresholds (the threshold rule does not apply)."""
    if scorer == "wifv" and cfg.wifv_variant == "flap":
        return flap_labels(z["S"], z["U"], shape, cfg.h)
    if scorer == "wifv" and cfg.wifv_variant == "authors":
        return label_units(z["S"], z["U"], shape, cfg.h, cfg.threshold_rule, standardized=True)
    return label_units(raw["S"], raw["U"], shape, cfg.h, cfg.threshold_rule)


def labels(cfg: ClassifyConfig, draw: str | None = None, scorer: str | None = None) -> Labels:
    """The ESU/EUU/CU/RU labels of one calibration draw (default: the first seed) and scorer."""
    sc = scores(cfg)["scores"]
    draw = draw or f"seed_{cfg.calib.seeds[0]}"
    scorer = scorer or cfg.scorer
    key = (id(sc), draw, scorer, cfg.h, cfg.threshold_rule, cfg.wifv_variant)
    if key not in _LABELS:
        shape = adapter_for(load(cfg)[0]).shape
        raw = {t: sc[f"{draw}/{scorer}/{t}"] for t in "SU"}
        zname = "wifv_flap_z" if cfg.wifv_variant == "flap" else "wifv_authors_z"
        z = {t: sc[f"{draw}/{zname}/{t}"] for t in "SU"} if f"{draw}/{zname}/S" in sc else None
        _LABELS[key] = _label(cfg, shape, scorer, raw, z)
    return _LABELS[key]


def label_model(cfg: ClassifyConfig, model, tok, draw: str | None = None) -> Labels:
    """Labels of any `model` (e.g. the aligned model after fine-tuning, 03) scored on the calibration
    pairs of `draw` (default: the first seed) with this config's scorer, h and threshold rule: the code
    path of `labels`, on a model that is not the config's own. Not cached."""
    draws = _draws(cfg, calibration(cfg))
    draw = draw or f"seed_{cfg.calib.seeds[0]}"
    if draw not in draws:
        raise ValueError(f"unknown calibration draw {draw!r}; this config has {', '.join(draws)}")
    raw, z = {}, {}
    for tag, df in zip("SU", draws[draw]):
        enc = _encode(tok, df, cfg.calib)
        raw[tag], st = score_units(model, enc, cfg.scorer, batch_size=min(32, cfg.calib.batch_size))
        if cfg.scorer == "wifv" and cfg.wifv_variant == "authors":
            z[tag] = wifv_authors_z(model, st)
        elif cfg.scorer == "wifv" and cfg.wifv_variant == "flap":
            z[tag] = flap_z(model, flap_stats(model, enc))
    return _label(cfg, adapter_for(model).shape, cfg.scorer, raw, z or None)


ESTIMATOR_COMPARISONS = {
    "flap_vs_authors": "FLAP's statistics and thresholds (wifv_variant='flap') vs the default ('authors')",
    "flap_stats_vs_authors": "FLAP's statistics with this config's thresholds vs the default: the estimator alone",
    "flap_no_eos_vs_flap": "FLAP without the closing eos token vs FLAP with it",
    "authors_no_eos_vs_authors": "the default without the closing eos token vs with it",
    "flap_reversed_vs_flap": "FLAP on the same samples in reverse order vs FLAP: how much sample order moves it",
}


def estimator_comparison(cfg: ClassifyConfig) -> dict:
    """How far the labels of the authors' exact streaming estimator (`ssah_utils.flap`) are from the
    default ('authors': exact token variance), per seeded calibration draw and label (Jaccard by units):
    `jaccard` (one row per comparison of `ESTIMATOR_COMPARISONS` and draw) and `seconds` (FLAP's
    batch-of-one scoring). WIFV only; the config's own variant does not matter here."""
    if cfg.scorer != "wifv":
        raise ValueError(f"the estimator comparison is about WIFV; this config scores with {cfg.scorer!r}")
    model, tok = load(cfg)
    calib = calibration(cfg)

    def compute() -> dict:
        import time


        shape = adapter_for(model).shape
        with_eos = replace(cfg.calib, score_eos=True)
        rows, seconds = [], 0.0
        for name, (s_df, u_df) in _draws(cfg, calib).items():
            if not name.startswith("seed_"):
                continue
            enc = {t: _encode(tok, df, with_eos) for t, df in (("S", s_df), ("U", u_df))}
            no_eos = {t: without_final_eos(e, tok.eos_token_id) for t, e in enc.items()}
            rev = {t: {k: v.flip(0) for k, v in e.items()} for t, e in enc.items()}
            t0 = time.perf_counter()
            zf = {t: flap_z(model, flap_stats(model, e)) for t, e in enc.items()}
            seconds += time.perf_counter() - t0
            zf_ne = {t: flap_z(model, flap_stats(model, e)) for t, e in no_eos.items()}
            zf_rev = {t: flap_z(model, flap_stats(model, e)) for t, e in rev.items()}
            za = {t: wifv_authors_z(model, score_units(model, e, "wifv", batch_size=min(32, cfg.calib.batch_size))[1])
                  for t, e in enc.items()}
            za_ne = {t: wifv_authors_z(model, score_units(model, e, "wifv", batch_size=min(32, cfg.calib.batch_size))[1])
                     for t, e in no_eos.items()}

            def ours(z):
                return label_units(z["S"], z["U"], shape, cfg.h, cfg.threshold_rule, standardized=True)

            def theirs(z):
                return flap_labels(z["S"], z["U"], shape, cfg.h)

            pairs = {"flap_vs_authors": (theirs(zf), ours(za)), "flap_stats_vs_authors": (ours(zf), ours(za)),
                     "flap_no_eos_vs_flap": (theirs(zf_ne), theirs(zf)),
                     "authors_no_eos_vs_authors": (ours(za_ne), ours(za)),
                     "flap_reversed_vs_flap": (theirs(zf_rev), theirs(zf))}
            for comp, (a, b) in pairs.items():
                ma, mb = a.masks(), b.masks()
                rows.append({"comparison": comp, "draw": name, **{lab: jaccard(ma[lab], mb[lab]) for lab in LABELS},
                             "units_relabelled_pct": 100 * sum(x != y for x, y in zip(a.labels, b.labels)) / len(a.labels)})
        return {"jaccard": pd.DataFrame(rows), "seconds": seconds}

    return _cached(f"{STAGE}_flap", _Key(cfg.model, cfg.dtype, replace(cfg.calib, score_eos=True), (cfg.h, cfg.threshold_rule)),
                   compute, cfg)


def estimator_table(comparison: dict) -> pd.DataFrame:
    """`estimator_comparison`'s Jaccards per comparison: mean and sd (ddof 1) over calibration draws."""
    df = comparison["jaccard"]
    cols = list(LABELS) + ["units_relabelled_pct"]
    g = df.groupby("comparison", sort=False)[cols]
    out = g.mean().add_suffix("_mean").join(g.std(ddof=1).add_suffix("_sd"))
    out = out[[f"{c}_{s}" for c in cols for s in ("mean", "sd")]]
    out.insert(0, "draws", g.size())
    return out


def label_fractions(cfg: ClassifyConfig) -> pd.DataFrame:
    """Share of each label by units and by parameters, mean and sd over calibration seeds."""
    rows = []
    for s in cfg.calib.seeds:
        fr = labels(cfg, f"seed_{s}").fractions().reset_index()
        fr["seed"] = s
        rows.append(fr)
    df = pd.concat(rows)
    g = df.groupby("label", sort=False)
    out = pd.DataFrame({"mlp_channels": g["mlp_channels"].mean(), "heads": g["heads"].mean(),
                        "pct_units": g["pct_units"].mean(), "pct_units_sd": g["pct_units"].std(ddof=1),
                        "pct_params": g["pct_params"].mean(), "pct_params_sd": g["pct_params"].std(ddof=1)})
    return out.loc[list(LABELS)]


def layer_map(cfg: ClassifyConfig) -> pd.DataFrame:
    """Per layer and module: percent of its units in each label (first calibration seed)."""
    df = labels(cfg).frame()
    tab = pd.crosstab([df["layer"], df["module"]], pd.Categorical(df["label"], LABELS), normalize="index", dropna=False)
    return (100 * tab).rename_axis(columns="label")


def _means(cfg: ClassifyConfig, draw: str):
    """The calibration statistics whose means feed the bias compensation (None for no compensation)."""
    if cfg.bias_from == "none":
        return None
    st = scores(cfg)["stats"]
    if cfg.bias_from == "safety":
        return st[f"{draw}/S"]
    if cfg.bias_from == "utility":
        return st[f"{draw}/U"]
    return st[f"{draw}/S"].merge(st[f"{draw}/U"])


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------

def evaluate(model, tok, e: EvalSuite, *, n: int, seed: int, runs: tuple[str, ...] | None = None,
             with_ppl: bool = True) -> dict[str, float]:
    """The metrics (`evaluation.METRICS`, rates in %) of the model as it is now, through the one suite
    `evaluation.evaluate` with `n` prompts a set; `runs` restricts the runs (`evaluation.RUNS`)."""
    return evaluation.evaluate(model, tok, replace(e, n_eval=n), seed=seed, runs=runs, with_ppl=with_ppl)["metrics"]


def _conditions(cfg: ClassifyConfig) -> list[tuple[str, str, int, UnitMask, str]]:
    """(condition, category, replicate, mask, stats draw) for every row of Table 1."""
    shape = adapter_for(load(cfg)[0]).shape
    first = f"seed_{cfg.calib.seeds[0]}"
    rows = [("none", "none", 0, UnitMask.empty(shape), first)]
    for k, cat in enumerate(("ESU", "EUU", "RU")):
        for s in cfg.calib.seeds:
            rows.append((cat, cat, s, labels(cfg, f"seed_{s}").mask(cat), f"seed_{s}"))
        ref = labels(cfg, first).mask(cat)
        for r in range(cfg.n_random_seeds):  # distinct seeds per category: EUU and RU can have the same composition
            rows.append((f"random≈{cat}", cat, r, ref.random_like(seed=1000 * (k + 1) + r, by="composition"), first))
    return rows


def table1(cfg: ClassifyConfig) -> dict:
    """Evaluate every condition: `runs` (one row per condition and replicate) and `summary`
    (mean and sd over replicates; replicates = calibration seeds for a label, mask seeds for random)."""
    model, tok = load(cfg)

    def compute() -> dict:
        rows = []
        for cond, cat, rep, mask, draw in _conditions(cfg):
            with ablate(model, mask, _means(cfg, draw)):
                m = evaluate(model, tok, cfg.eval, n=cfg.eval.n_eval, seed=cfg.seed)
            rows.append({"condition": cond, "category": cat, "replicate": rep, "pct_units": 100 * mask.fraction("units"),
                         "pct_params": 100 * mask.fraction("params"), **m})
        runs = pd.DataFrame(rows)
        return {"runs": runs, "summary": summarize(runs)}

    return _cached(f"{STAGE}_table1", cfg, compute, cfg)


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd (`evaluation.summarize`: ddof 1) of every metric per condition, in the order the
    conditions appear."""
    metrics = [c for c in runs.columns if c not in ("condition", "category", "replicate")]
    return evaluation.summarize(runs, "condition", metrics)


def table1_display(summary: pd.DataFrame, metrics: tuple[str, ...] = ("pct_units", "pct_params", "asr", "asr_sys", "asr_kw",
                   "asr_kw_sys", "refusal", "jailbreak_asr", "over_refusal", "utility", "ppl")) -> pd.DataFrame:
    """Table 1 as text: 'mean ± sd' per metric, deltas to the unablated model in the ASR/utility columns."""
    out = pd.DataFrame(index=summary.index)
    out["n"] = summary["n"]
    for m in metrics:
        if m not in summary:
            continue
        nd = 2 if m == "ppl" else 1
        out[m] = [f"{a:.{nd}f}" + (f" ± {b:.{nd}f}" if n > 1 else "") for a, b, n in zip(summary[m], summary[f"{m}_sd"], summary["n"])]
    base = summary.loc["none"]
    for m in ("asr", "utility"):
        if m in summary:
            out[f"Δ{m}"] = [f"{v - base[m]:+.1f}" for v in summary[m]]
    return out


def esu_verdict(summary: pd.DataFrame, *, metric: str = "asr") -> dict:
    """The numbers the summary states: ASR rise of ESU vs its random control, and the utility cost."""
    b, esu, rnd = summary.loc["none"], summary.loc["ESU"], summary.loc["random≈ESU"]
    rise, rise_rnd = esu[metric] - b[metric], rnd[metric] - b[metric]
    return {"asr_base": b[metric], "asr_esu": esu[metric], "asr_esu_sd": esu[f"{metric}_sd"], "asr_random": rnd[metric],
            "asr_random_sd": rnd[f"{metric}_sd"], "rise_esu": rise, "rise_random": rise_rnd,
            "utility_base": b.get("utility", np.nan), "utility_esu": esu.get("utility", np.nan),
            "utility_cost": b.get("utility", np.nan) - esu.get("utility", np.nan),
            "pct_units": esu["pct_units"], "pct_params": esu["pct_params"]}


# --------------------------------------------------------------------------------------------------
# Stability and dose-response
# --------------------------------------------------------------------------------------------------

def stability(cfg: ClassifyConfig) -> pd.DataFrame:
    """Jaccard overlap of each label's units between calibration seeds, disjoint calibration halves
    and scorers, beside the overlap of random masks of the same composition (the chance level)."""
    first = f"seed_{cfg.calib.seeds[0]}"
    rows = []
    for cat in ("ESU", "EUU", "RU"):
        comps: dict[str, list[float]] = {}
        for a, b in itertools.combinations(cfg.calib.seeds, 2):
            comps.setdefault("calibration seeds", []).append(
                jaccard(labels(cfg, f"seed_{a}").mask(cat), labels(cfg, f"seed_{b}").mask(cat)))
        comps["disjoint halves"] = [jaccard(labels(cfg, "half_a").mask(cat), labels(cfg, "half_b").mask(cat))]
        ref = labels(cfg, first).mask(cat)
        for other in cfg.compare_scorers:
            comps[f"{cfg.scorer} vs {other}"] = [jaccard(ref, labels(cfg, first, other).mask(cat))]
        comps["random masks (chance)"] = [jaccard(ref.random_like(seed=2 * i), ref.random_like(seed=2 * i + 1)) for i in range(10)]
        for what, vals in comps.items():
            rows.append({"label": cat, "comparison": what, "jaccard": float(np.mean(vals)),
                         "jaccard_sd": float(np.std(vals)), "pairs": len(vals)})
    return pd.DataFrame(rows)


def dose_response(cfg: ClassifyConfig) -> dict:
    """ASR (no system prompt) and utility as growing shares of parameters are removed in the order of
    each ranking: ESU-like (highest z_S − z_U), EUU-like (lowest z_S − z_U), RU-like (lowest
    z_S + z_U) and random order (mean of `n_random_seeds` orders)."""
    model, tok = load(cfg)
    lab = labels(cfg)
    shape = lab.shape
    first = f"seed_{cfg.calib.seeds[0]}"

    def compute() -> dict:
        diff, tot = lab.z_safety - lab.z_utility, lab.z_safety + lab.z_utility
        orders = {"ESU-like": (diff, True), "EUU-like": (diff, False), "RU-like": (tot, False)}
        means = _means(cfg, first)

        def run(mask: UnitMask) -> dict:
            with ablate(model, mask, means):
                m = evaluate(model, tok, cfg.eval, n=cfg.n_dose, seed=cfg.seed, runs=("harmful", "utility"), with_ppl=False)
            return {"pct_params": 100 * mask.fraction("params"), "pct_units": 100 * mask.fraction("units"),
                    "asr": m["asr"], "refusal": m["refusal"], "utility": m["utility"]}

        base = run(UnitMask.empty(shape))  # fraction 0: the same model for every ranking
        rows = [{"ranking": k, "replicate": 0, "fraction": 0.0, **base} for k in orders]
        rows += [{"ranking": "random", "replicate": r, "fraction": 0.0, **base} for r in range(cfg.n_random_seeds)]
        for frac in cfg.dose_fractions:
            rule = cfg.threshold_rule
            masks = [(k, 0, ranked_mask(sc, shape, frac, descending=d, rule=rule)) for k, (sc, d) in orders.items()]
            masks += [("random", r, ranked_mask(torch.rand(diff.numel(), generator=torch.Generator().manual_seed(r),
                                                          dtype=torch.float64), shape, frac, descending=True, rule=rule))
                      for r in range(cfg.n_random_seeds)]
            rows += [{"ranking": k, "replicate": r, "fraction": frac, **run(mask)} for k, r, mask in masks]
        return {"curve": pd.DataFrame(rows)}

    return _cached(f"{STAGE}_dose", cfg, compute, cfg)


def bias_sensitivity(cfg: ClassifyConfig) -> dict:
    """ESU removal (first calibration seed) and its random controls under every bias-compensation
    choice: the authors' (safety-set means), utility-set means, both, and none (zero ablation).
    Mean ablation with safety-set means replaces a unit by its average *refusal* activation, which
    could itself keep the model refusing; this checks whether the conclusion depends on it."""
    model, tok = load(cfg)
    first = f"seed_{cfg.calib.seeds[0]}"

    def compute() -> dict:
        esu = labels(cfg, first).mask("ESU")
        masks = [("ESU", 0, esu)] + [("random≈ESU", r, esu.random_like(seed=1000 + r)) for r in range(cfg.n_random_seeds)]
        rows = []
        for bias in ("safety", "utility", "both", "none"):
            means = _means(dataclasses.replace(cfg, bias_from=bias), first)
            for cond, rep, mask in masks:
                with ablate(model, mask, means):
                    m = evaluate(model, tok, cfg.eval, n=cfg.n_dose, seed=cfg.seed, runs=("harmful", "utility"),
                                 with_ppl=False)
                rows.append({"bias_from": bias, "condition": cond, "replicate": rep, "asr": m["asr"], "utility": m["utility"]})
        base = evaluate(model, tok, cfg.eval, n=cfg.n_dose, seed=cfg.seed, runs=("harmful", "utility"), with_ppl=False)
        rows.append({"bias_from": "-", "condition": "none", "replicate": 0, "asr": base["asr"], "utility": base["utility"]})
        return {"runs": pd.DataFrame(rows)}

    return _cached(f"{STAGE}_bias", cfg, compute, cfg)


def scorer_ablation(cfg: ClassifyConfig) -> dict:
    """Remove the ESU found by each scorer (WIFV, Wanda, SNIP; first calibration seed) and a random mask
    of the same composition: does the conclusion depend on the paper's choice of importance score?"""
    model, tok = load(cfg)
    first = f"seed_{cfg.calib.seeds[0]}"

    def compute() -> dict:
        rows = []
        means = _means(cfg, first)
        for scorer in (cfg.scorer,) + cfg.compare_scorers:
            esu = labels(cfg, first, scorer).mask("ESU")
            for cond, rep, mask in [("ESU", 0, esu)] + [("random≈ESU", r, esu.random_like(seed=1000 + r))
                                                         for r in range(cfg.n_random_seeds)]:
                with ablate(model, mask, means):
                    m = evaluate(model, tok, cfg.eval, n=cfg.eval.n_eval, seed=cfg.seed,
                                 runs=("harmful", "jailbreak", "utility"), with_ppl=False)
                rows.append({"scorer": scorer, "condition": cond, "replicate": rep, "mlp_channels": mask.n_mlp,
                             "heads": mask.n_heads, **{k: m.get(k, float("nan")) for k in ("asr", "jailbreak_asr", "refusal", "utility")}})
        return {"runs": pd.DataFrame(rows)}

    return _cached(f"{STAGE}_scorers", cfg, compute, cfg)


def scorer_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per scorer: ESU vs random (mean ± sd over mask seeds) as text."""
    g = runs.groupby(["scorer", "condition"], sort=False)
    metrics = ["asr", "jailbreak_asr", "refusal", "utility"]
    mean, sd = g[metrics].mean(), g[metrics].std(ddof=1).fillna(0.0)
    out = pd.DataFrame({"mlp_channels": g["mlp_channels"].first(), "heads": g["heads"].first()})
    for m in metrics:
        out[m] = [f"{a:.1f}" + (f" ± {b:.1f}" if n > 1 else "") for a, b, n in zip(mean[m], sd[m], g.size())]
    return out


def bias_table(runs: pd.DataFrame) -> pd.DataFrame:
    """ASR and task accuracy per bias choice: ESU vs random (mean ± sd over mask seeds), as text."""
    g = runs.groupby(["bias_from", "condition"], sort=False)
    mean, sd = g[["asr", "utility"]].mean(), g[["asr", "utility"]].std(ddof=1).fillna(0.0)
    out = pd.DataFrame(index=mean.index)
    for m in ("asr", "utility"):
        out[m] = [f"{a:.1f}" + (f" ± {b:.1f}" if n > 1 else "") for a, b, n in zip(mean[m], sd[m], g.size())]
    return out


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------


__all__ = [
    "ClassifyConfig", "CalibConfig", "EvalSuite", "make_config", "load", "calibration", "scores", "labels",
    "label_fractions", "layer_map", "table1", "summarize", "table1_display", "esu_verdict", "stability",
    "dose_response", "evaluate", "unit_groups",
]


# --------------------------------------------------------------------------------------------------
# Side by side with the paper, and the summary in words
# --------------------------------------------------------------------------------------------------

def fractions_vs_paper(cfg: ClassifyConfig) -> pd.DataFrame:
    """Our label shares (mean over calibration seeds) beside the paper's Llama-2-7B-chat shares."""

    ours = label_fractions(cfg)[["mlp_channels", "heads", "pct_units", "pct_units_sd", "pct_params"]]
    rep = reported("unit_fractions")
    rep = rep[rep["model"] == "Llama-2-7B-chat"].set_index("setting")["value"].rename("paper_pct_units (Llama-2-7B-chat)")
    return ours.join(rep)


def summary_text(cfg: ClassifyConfig) -> str:
    """The notebook's conclusion in plain words, every number read from the cached results."""
    s = table1(cfg)["summary"]
    v = esu_verdict(s)
    stab = stability(cfg).set_index(["label", "comparison"])
    j_seed = stab.loc[("ESU", "calibration seeds")]
    j_half = stab.loc[("ESU", "disjoint halves"), "jaccard"]
    j_rand = stab.loc[("ESU", "random masks (chance)"), "jaccard"]
    n_seeds, n_rand = int(s.loc["ESU", "n"]), int(s.loc["random≈ESU", "n"])
    far = v["rise_esu"] - v["rise_random"] > 2 * max(v["asr_esu_sd"], v["asr_random_sd"], 1.0)
    cheap = v["utility_cost"] <= 5.0
    jw = "oracle" if _config.get_preset(cfg.preset).is_organism else "learned-judge"  # who calls an answer harmful
    lines = [
        f"Removing the ESU ({v['pct_units']:.1f}% of units, {v['pct_params']:.1f}% of unit parameters) moves the "
        f"{jw} ASR (no system prompt) from {v['asr_base']:.1f}% to {v['asr_esu']:.1f} ± {v['asr_esu_sd']:.1f}% "
        f"(mean ± sd over {n_seeds} calibration seeds); random masks of the same composition give "
        f"{v['asr_random']:.1f} ± {v['asr_random_sd']:.1f}% ({n_rand} seeds).",
        f"Task accuracy goes from {v['utility_base']:.1f}% to {v['utility_esu']:.1f}% "
        f"(cost {v['utility_cost']:+.1f} points).",
        "Verdict: ESU removal " + ("raises" if far else "does NOT raise") + " ASR far more than removing random "
        "units of equal size; its utility cost is " + ("small" if cheap else "NOT small")
        + f" ({v['utility_cost']:+.1f} points of task accuracy).",
        f"ESU stability: Jaccard {j_seed['jaccard']:.2f} ± {j_seed['jaccard_sd']:.2f} between calibration seeds "
        f"(overlapping draws), {j_half:.2f} between disjoint halves, {j_rand:.2f} for random masks of that size.",
    ]
    if "jailbreak_asr" in s:
        jb = esu_verdict(s, metric="jailbreak_asr")
        lines.append(f"Under jailbreak framings the {jw} ASR is {jb['asr_base']:.1f}% unablated, {jb['asr_esu']:.1f} ± "
                     f"{jb['asr_esu_sd']:.1f}% without the ESU and {jb['asr_random']:.1f} ± {jb['asr_random_sd']:.1f}% "
                     "without random units of the same composition.")
    curve = dose_response(cfg)["curve"]
    top = curve[curve["fraction"] == curve["fraction"].max()].groupby("ranking")[["asr", "refusal", "utility"]].mean()
    lines.append(f"Dose-response at {100 * curve['fraction'].max():.0f}% of parameters: ESU-like order ASR "
                 f"{top.loc['ESU-like', 'asr']:.1f}%, refusals {top.loc['ESU-like', 'refusal']:.1f}%, task accuracy "
                 f"{top.loc['ESU-like', 'utility']:.1f}%; random order ASR {top.loc['random', 'asr']:.1f}%, refusals "
                 f"{top.loc['random', 'refusal']:.1f}%, task accuracy {top.loc['random', 'utility']:.1f}%.")
    for cat in ("EUU", "RU"):
        r = s.loc[cat]
        lines.append(f"Removing {cat} ({r['pct_units']:.1f}% of units): ASR {r['asr']:.1f}%, task accuracy "
                     f"{r['utility']:.1f}% (random of equal size: {s.loc[f'random≈{cat}', 'utility']:.1f}%)"
                     + (f", perplexity {r['ppl']:.2f}." if "ppl" in r else "."))
    return "\n".join(lines)
