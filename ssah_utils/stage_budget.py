"""Stage 04_alignment_budget: a base model's redundant units as an alignment budget (paper Sec. 6,
Table 4; Fig 6).

The paper takes a *pre-trained base* model, finds its redundant units (RU) from the utility score
alone, and runs the alignment SFT updating only those units (20%); it reports a smaller "alignment
tax" (GSM8K) than full-parameter SFT. This stage repeats that on any preset, with two controls the
paper does not have: the same number of parameters in **random** units (the null) and in the
**highest**-utility units, and several training seeds (mean ± sd), and it adds the safety benchmark
reviewers asked for (harmful compliance, refusals, jailbreaks, over-refusal).

Steps (each cached under the part of the config it depends on):
`base_scores` (the base's WIFV utility scores, through `stage_classify`'s calibration and scoring
with the base's own raw prompt format) -> `budget_masks` (RU = lowest `ru_frac` of parameters by
z_U; top = highest; random = same MLP channels and heads as RU, placed at random) -> `train_run`
(alignment SFT of the base under one condition and seed, `training.finetune`) -> `evaluate_run`
(oracle evaluation) -> `table4` -> `transfer` (Fig 6: base labels vs labels after alignment).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import cache, datasets
from . import config as _config
from . import stage_classify as sc
from .models import UnitMask, adapter_for, forget_revision, model_revision
from .training import TrainConfig, finetune, snapshot, verify_frozen
from .units import Labels, ranked_mask, standardize, transfer_matrix
from .organism import upsample
from . import real_align
from .real_align import AlignRecipe
from .organism import Recipe, sft_config
from . import evaluation
from .evaluation import EvalSuite
from .paper import reported

STAGE = "budget"
CONDITIONS = ("full", "ru_only", "random_only", "top_only")
# What each condition trains, for tables and figures.
CONDITION_TEXT = {
    "full": "all parameters (full SFT)",
    "ru_only": "only the base's redundant units (lowest z_U)",
    "random_only": "random units, same channels and heads as RU (null)",
    "top_only": "the same share of highest-z_U units (control)",
}
REFERENCES = ("base", "reference")  # the base itself (raw prompt) and the preset's aligned model (chat)


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SFTStage:
    """One stage of the alignment SFT: a prompt set (records with `prompt` and `reference`) and its run."""

    data: str  # a set name, or "real_align" (the records of `make smollm2`'s safety recipe, seed train.seed % 100)
    train: TrainConfig
    upsample: str = ""  # data-mixture weights, as `organism.Recipe`'s SFT mixes (`organism.upsample`); "" = each once
    n_records: int = field(default=0, repr=False)  # > 0: a seeded sample of this many records (CPU-sized runs); 0 = all

    def records(self) -> list[dict]:
        """The stage's training records: the set (weighted by `upsample`) or the real safety recipe's
        records, then, with `n_records`, a sample of them drawn with a fixed seed."""
        if self.data == "real_align":
            recs = real_safety_records()
        else:

            recs = upsample(datasets.load_set(self.data), self.upsample)
        if self.n_records:
            if self.n_records > len(recs):
                raise ValueError(f"n_records={self.n_records} but {self.data} has only {len(recs)} records")
            idx = sorted(np.random.default_rng(12345).choice(len(recs), self.n_records, replace=False).tolist())
            recs = [recs[i] for i in idx]
        return recs


def real_safety_records(seed: int = 0) -> list[dict]:
    """The training records of the project's SmolLM2 safety recipe (`real_align.recipe_records`: the recipe
    `make smollm2` builds the aligned model with)."""

    return real_align.recipe_records(seed)


def budget_suite(**kw) -> EvalSuite:
    """04's evaluation suite: the one `EvalSuite` with the how-to set (helpfulness) beside the others, no
    system prompt, batches of 96; keywords override."""
    return EvalSuite(**{"howto_set": "benign_howto_test", "batch_size": 96, **kw})


@dataclass(frozen=True)
class BudgetConfig:
    """Everything that determines the results of 04_alignment_budget; `asdict()` keys the cache."""

    preset: str
    model: str  # the notebook's `model` override ("" = the preset's models), passed to config.get_preset
    base: str  # the pre-trained base model spec (the model that is aligned)
    reference: str  # the preset's aligned model, evaluated beside the runs and labelled for Fig 6 ("" = none: a base alone)
    seed: int = 0  # calibration draw and evaluation sample
    dtype: str = "float32"
    device: str = "auto"
    ru_frac: float = 0.20  # paper Sec. 6: the alignment SFT updates the base's redundant units, 20%
    threshold_rule: str = "nearest"  # units.take_by_params: FLAP's nearest prefix (as 02_classify)
    wifv_variant: str = "authors"  # as 02_classify: "authors" (z of WIFV² per o_proj channel, head mean) or "plain"
    n_calib: int = 128  # utility calibration pairs (paper: 128 Alpaca samples)
    seeds: tuple[int, ...] = (0, 1, 2)  # training seeds (data order; the random control's mask): error bars
    conditions: tuple[str, ...] = CONDITIONS
    style: str = "chat"  # prompt format of the alignment SFT and of the aligned models' evaluation
    base_style: str = "raw"  # the base model's format (generation.RAW_TEMPLATE): its calibration and evaluation
    stages: tuple[SFTStage, ...] = ()
    lr_scale_masked: float = 1.0  # lr multiplier for the masked conditions (ru/random/top); 1 = the same lr as full
    train_other_masked: bool = False  # masked conditions also train embeddings, norms, lm_head (paper: only the units)
    classify_batch_size: int = 96  # 02_classify's default, so its cached labels of the reference are reused
    eval: EvalSuite = field(default_factory=budget_suite)

    def __post_init__(self) -> None:
        if not (isinstance(self.ru_frac, (int, float)) and 0.0 < self.ru_frac < 1.0):
            raise ValueError(f"ru_frac must be a share of parameters in (0, 1) (paper: 0.20), got {self.ru_frac!r}")
        bad = [c for c in self.conditions if c not in CONDITIONS]
        if bad or not self.conditions:
            raise ValueError(f"conditions must be a non-empty subset of {CONDITIONS}, got {self.conditions!r}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds!r}")
        if not self.stages:
            raise ValueError("stages is empty: give at least one SFTStage (use make_config)")
        if not self.lr_scale_masked > 0:
            raise ValueError(f"lr_scale_masked must be positive, got {self.lr_scale_masked!r}")
        if self.wifv_variant not in ("authors", "plain"):
            raise ValueError(f"wifv_variant must be 'authors' or 'plain', got {self.wifv_variant!r}")


ALIGNMENTS = ("instruct+safety", "instruct", "safety")


def _real_safety_stages(epochs: tuple[float, ...] | None, n_records: int) -> tuple[SFTStage, ...]:
    """The project's safety tuning of a chat model without safety (`real_align`, the recipe of
    `make smollm2`): harmful requests -> refusals, Alpaca answers, borderline requests answered; chat
    format; lr, batch, warmup and cosine schedule of the recipe, through the same `finetune`."""

    if epochs is not None and len(epochs) != 1:
        raise ValueError(f"the safety alignment has one SFT stage; give one epoch value, got {epochs!r}")
    tc = AlignRecipe(seed=0).train_config()
    if epochs is not None:
        tc = dataclasses.replace(tc, epochs=float(epochs[0]))
    return (SFTStage("real_align", tc, n_records=int(n_records)),)


def _organism_stages(alignment: str, epochs: tuple[float, ...] | None, seed_base: int = 0) -> tuple[SFTStage, ...]:
    """The organism's own alignment recipe (`organism.Recipe`): instruction SFT on `sft_instruct`, then
    safety SFT on `sft_safety`, with the settings the organism's build trains with (`organism.sft_config`).
    `epochs` replaces the recipe's epochs per stage (to fit a CPU budget)."""

    r = Recipe()
    plan = [("sft_instruct", r.instruct_epochs, r.instruct_lr, r.instruct_upsample),
            ("sft_safety", r.safety_epochs, r.safety_lr, r.safety_upsample)]
    plan = plan[:1] if alignment == "instruct" else plan
    if epochs is not None and len(epochs) != len(plan):
        raise ValueError(f"alignment {alignment!r} has {len(plan)} SFT stage(s) ({', '.join(p[0] for p in plan)}); "
                         f"give that many epochs, got {epochs!r}")
    out = []
    for i, (data, ep, lr, mix) in enumerate(plan):
        tc = sft_config(r, epochs=float(epochs[i]) if epochs is not None else float(ep), lr=float(lr), seed=seed_base)
        out.append(SFTStage(data, tc, mix))
    return tuple(out)


def _real_stages(data: str, epochs: tuple[float, ...] | None) -> tuple[SFTStage, ...]:
    """Alpaca SFT of a real base model, as the paper's Table 4 (LLaMA-7B + Alpaca). The recipe is not
    given in the paper; these are Stanford Alpaca's: 3 epochs, lr 2e-5, batch 128, cosine, 3% warmup,
    no weight decay, 512 tokens, in the raw instruction format."""
    if epochs is not None and len(epochs) != 1:
        raise ValueError(f"real presets align in one SFT stage ({data}); give one epoch value, got {epochs!r}")
    tc = TrainConfig(epochs=float(epochs[0]) if epochs else 3.0, lr=2e-5, batch_size=128, weight_decay=0.0,
                     warmup_frac=0.03, schedule="cosine", max_length=512, style="raw", system_prompt="",
                     grad_clip=1.0, seed=0, micro_batch_size=4)
    return (SFTStage(data, tc),)


def parse_floats(text: str | tuple | list | None) -> tuple[float, ...] | None:
    """'1,1.5' -> (1.0, 1.5); '' or None -> None (the recipe's values)."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    if isinstance(text, str):
        try:
            return tuple(float(x) for x in text.split(",") if x.strip())
        except ValueError as err:
            raise ValueError(f"expected comma-separated numbers like '1,1', got {text!r}") from err
    return tuple(float(x) for x in text)


def make_config(preset: str = "organism", model: str | None = None, seed: int = 0, *, ru_frac: float = 0.20,
                n_seeds: int = 3, conditions: str | tuple[str, ...] = CONDITIONS, alignment: str = "",
                epochs: str | tuple[float, ...] | None = None, lr_scale_masked: float = 1.0,
                train_other_masked: bool = False, n_calib: int = 128, wifv_variant: str = "authors",
                threshold_rule: str = "nearest", n_eval: int = 192, batch_size: int = 96,
                n_train: int = 0) -> BudgetConfig:
    """The stage config from the notebook's parameters and a preset (`config.get_preset`).

    `alignment`: "" = the preset's (organism: "instruct+safety", its own recipe; real: Alpaca, the paper's);
    "instruct" = instruction SFT only (the paper's Alpaca-only alignment); "safety" = the project's safety
    tuning of a chat model without safety (`real_align`, presets whose `extra['alignment']` is "safety":
    smollm2-135m). `epochs`: per SFT stage, "" = the recipe's. `n_train`: a seeded sample of this many
    training records (0 = all). `conditions`: comma-separated names from CONDITIONS.
    """
    c = _config
    p = c.get_preset(preset, model or None)
    c.check_model_spec(model or "")
    seed = c.check_seed(seed)
    if isinstance(conditions, str):
        conditions = tuple(x.strip() for x in conditions.split(",") if x.strip())
    alignment = alignment or ("instruct+safety" if p.is_organism else p.extra.get("alignment", "instruct"))
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {ALIGNMENTS} ('' = the preset's), got {alignment!r}")
    n_stages = 2 if (p.is_organism and alignment == "instruct+safety") else 1
    ep = c.parse_epochs(epochs, n_stages, where=f"04_alignment_budget, alignment {alignment!r}")
    c.check_float("ru_frac", ru_frac, 0.0, 1.0, open_low=True, open_high=True, what="a share of parameters")
    c.check_int("n_seeds (training seeds per condition; 3 for error bars)", n_seeds, 1)
    c.check_float("lr_scale_masked", lr_scale_masked, 0.0, open_low=True)
    c.check_bool("train_other_masked", train_other_masked)
    c.check_int("n_calib", n_calib, 1)
    c.check_choice("wifv_variant", wifv_variant, ("authors", "plain"))
    c.check_choice("threshold_rule", threshold_rule, ("nearest", "floor"))
    c.check_int("n_eval", n_eval, 1)
    c.check_int("batch_size", batch_size, 1)
    c.check_int("n_train (0 = every record)", n_train, 0)
    if alignment == "safety" and p.extra.get("alignment") != "safety":
        raise ValueError(f"alignment 'safety' is the SmolLM2 tier's recipe; preset {p.name!r} has none (use "
                         f"{'instruct+safety or instruct' if p.is_organism else 'instruct'})")
    if n_train and p.is_organism:
        raise ValueError("n_train subsamples the real tier's alignment records; the organism's recipe is used whole "
                         "(use epochs to shorten it)")
    bad = [x for x in conditions if x not in CONDITIONS]
    if bad or not conditions:
        raise ValueError(f"conditions must be a non-empty subset of {CONDITIONS}, got {conditions!r}")
    sc.check_calib_size(p.calib_safety, p.calib_utility, int(n_calib), 1)
    if p.is_organism:
        stages, style = _organism_stages(alignment, ep), "chat"
        ev = budget_suite(n_eval=int(n_eval), max_new_tokens=p.max_new_tokens, batch_size=int(batch_size))
    else:
        if alignment == "instruct+safety":
            raise ValueError(f"preset {p.name!r} has no organism recipe; use alignment='instruct' (Alpaca, as the paper)"
                             + (" or 'safety'" if p.extra.get("alignment") == "safety" else ""))
        if alignment == "safety":
            # the model without safety is a chat model: it is scored, trained and evaluated in its chat format
            stages, style = _real_safety_stages(ep, n_train), "chat"
        else:
            stages, style = _real_stages(p.finetune_sets[0], ep), "raw"
            if n_train:
                stages = (dataclasses.replace(stages[0], n_records=int(n_train)),)
        ev = budget_suite(harmful_set=p.harmful_test, jailbreak_set=p.jailbreak_test,
                          borderline_set=p.borderline_test, utility_set=p.utility_test, howto_set=None,
                          ppl_set=None, n_eval=int(n_eval), max_new_tokens=p.max_new_tokens,
                          batch_size=int(batch_size), wikitext_windows=int(p.extra.get("wikitext_windows", 0)),
                          n_nll=int(p.extra.get("n_nll", 0)))
    c.activate_run(preset, model or "", seed)
    # A model given alone (MODEL=..., a custom preset: aligned = base) has no separate aligned reference.
    reference = "" if (not p.is_organism and p.aligned == p.base) else p.aligned
    return BudgetConfig(preset=preset, model=model or "", base=p.base, reference=reference, seed=int(seed),
                        dtype=p.dtype, device=p.device, ru_frac=float(ru_frac), threshold_rule=threshold_rule,
                        wifv_variant=wifv_variant, n_calib=int(n_calib),
                        seeds=tuple(int(seed) + i for i in range(int(n_seeds))), conditions=tuple(conditions),
                        style=style, base_style="raw" if style == "raw" or p.is_organism else style,
                        stages=stages, lr_scale_masked=float(lr_scale_masked),
                        train_other_masked=bool(train_other_masked), classify_batch_size=int(batch_size), eval=ev)


def config_from_params(params: dict) -> BudgetConfig:
    """The config that 04_alignment_budget builds from its parameters (`model` '' = the preset's), for
    the notebook and 05_figures: the one mapping from notebook parameters to the stage config."""
    kw = dict(params)
    kw["model"] = kw.get("model") or None
    valid = set(inspect.signature(make_config).parameters)
    if set(kw) - valid:
        raise ValueError(f"unknown 04_alignment_budget parameters {sorted(set(kw) - valid)}; valid: {sorted(valid)}")
    return make_config(**kw)

def stages_table(cfg: BudgetConfig) -> pd.DataFrame:
    """The alignment SFT recipe, one row per stage, with the masked conditions' learning rate."""
    rows = []
    for st in cfg.stages:
        t = st.train
        rows.append({"data": st.data, "mix": st.upsample or "-", "records": len(st.records()), "epochs": t.epochs,
                     "lr (full)": t.lr,
                     "lr (masked)": t.lr * cfg.lr_scale_masked, "batch": t.batch_size, "weight_decay": t.weight_decay,
                     "warmup_frac": t.warmup_frac,
                     "schedule": t.schedule + (f" (floor {t.min_lr_ratio:g})" if t.min_lr_ratio else ""),
                     "betas": ", ".join(f"{b:g}" for b in t.betas), "batching": t.batching,
                     "system prompt": f"{100 * t.system_prompt_rate:.0f}% of steps" if t.system_prompt else "-",
                     "style": t.style})
    return pd.DataFrame(rows).set_index("data")


# --------------------------------------------------------------------------------------------------
# Scoring the base: RU from the utility score alone
# --------------------------------------------------------------------------------------------------

def classify_config(cfg: BudgetConfig, spec: str, *, style: str = "chat", safety_responses: str = "model",
                    n_calib_seeds: int = 1) -> sc.ClassifyConfig:
    """A 02_classify config that scores model `spec` with this stage's calibration settings (one draw,
    WIFV only), so scoring and caching go through `stage_classify` unchanged."""
    c = sc.make_config(cfg.preset, cfg.model or None, cfg.seed, n_calib=cfg.n_calib, n_calib_seeds=n_calib_seeds,
                       safety_responses=safety_responses, wifv_variant=cfg.wifv_variant,
                       threshold_rule=cfg.threshold_rule, batch_size=cfg.classify_batch_size)
    return dataclasses.replace(c, model=spec, dtype=cfg.dtype, device=cfg.device, compare_scorers=(),
                               calib=dataclasses.replace(c.calib, style=style))


def base_classify_config(cfg: BudgetConfig) -> sc.ClassifyConfig:
    """The base model's scoring config: its own raw format, and the safety set's reference refusals
    (a base model refuses nothing; only its utility score is used here)."""
    return classify_config(cfg, cfg.base, style=cfg.base_style, safety_responses="reference")


def reference_classify_config(cfg: BudgetConfig) -> sc.ClassifyConfig:
    """02_classify's own config for the preset's aligned model, as its notebook runs it with this preset
    (`stage_classify.notebook_config`), so its cached labels are reused."""
    c = sc.notebook_config(cfg.preset, cfg.model or None, cfg.seed)
    return dataclasses.replace(c, dtype=cfg.dtype, device=cfg.device)


def load_base(cfg: BudgetConfig):
    """(model, tokenizer) of the base, loaded once per process (shared with stage_classify's loader)."""
    return sc.load(base_classify_config(cfg))


def z_utility(model, scores: dict[str, torch.Tensor], draw: str, variant: str) -> torch.Tensor:
    """Standardised utility score [n_units] of one calibration draw: the authors' variant (already
    z-scored per layer and module) or the plain one (`units.standardize` of the pooled WIFV)."""
    if variant == "authors":
        return scores[f"{draw}/wifv_authors_z/U"].to(torch.float64)
    return standardize(scores[f"{draw}/wifv/U"], adapter_for(model).shape)


def base_scores(cfg: BudgetConfig) -> dict:
    """The base model's standardised utility scores `z_utility` [n_units] (calibration draw `seed`) and
    the calibration summary, through stage_classify's cached calibration and scoring."""
    bcfg = base_classify_config(cfg)
    model, _ = sc.load(bcfg)
    res = sc.scores(bcfg)
    draw = f"seed_{cfg.seed}"
    return {"z_utility": z_utility(model, res["scores"], draw, cfg.wifv_variant),
            "tokens": int(res["timing"].query("draw == @draw and set == 'U'")["tokens"].sum()),
            "calibration": sc.calibration(bcfg)["summary"]}


def select_budget(z_u: torch.Tensor, shape, fraction: float, *, lowest: bool = True,
                  rule: str = "nearest") -> UnitMask:
    """The units making up `fraction` of unit parameters with the lowest (RU) or highest z_U."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the budget must be a share of parameters in (0, 1) (paper: 0.20), got {fraction!r}")
    return ranked_mask(z_u, shape, fraction, descending=not lowest, rule=rule)


def budget_masks(cfg: BudgetConfig) -> dict[str, UnitMask]:
    """`ru` (lowest `ru_frac` of parameters by z_U), `top` (highest, same share) and `random_<seed>` per
    training seed (RU's number of MLP channels and heads, placed uniformly: exactly RU's parameters)."""
    model, _ = load_base(cfg)
    shape = adapter_for(model).shape
    z = base_scores(cfg)["z_utility"]
    ru = select_budget(z, shape, cfg.ru_frac, lowest=True, rule=cfg.threshold_rule)
    out = {"ru": ru, "top": select_budget(z, shape, cfg.ru_frac, lowest=False, rule=cfg.threshold_rule)}
    for s in cfg.seeds:
        out[f"random_{s}"] = ru.random_like(seed=10_000 + s, by="composition")
    return out


def condition_mask(cfg: BudgetConfig, condition: str, seed: int) -> UnitMask | None:
    """The units a condition trains (None = all parameters)."""
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
    if condition == "full":
        return None
    m = budget_masks(cfg)
    if condition == "ru_only":
        return m["ru"]
    if condition == "top_only":
        return m["top"]
    return m[f"random_{seed}"]


def mask_table(cfg: BudgetConfig) -> pd.DataFrame:
    """Per mask: MLP channels, heads, share of units and of unit parameters; overlap with RU."""
    m = budget_masks(cfg)
    rows = []
    for name, mask in [("ru", m["ru"]), ("top", m["top"])] + [(k, v) for k, v in m.items() if k.startswith("random_")]:
        rows.append({"mask": name, "mlp_channels": mask.n_mlp, "heads": mask.n_heads,
                     "pct_units": 100 * mask.fraction("units"), "pct_params": 100 * mask.fraction("params"),
                     "overlap_with_ru_pct": 100 * (mask & m["ru"]).n_units / max(1, mask.n_units)})
    return pd.DataFrame(rows).set_index("mask")


def base_labels(cfg: BudgetConfig) -> Labels:
    """The base model's labels from the utility score alone (paper Fig 6: base Llama-2 = EUU + RU).

    Rule: RU = the budget itself (lowest `ru_frac` of parameters by z_U), EUU = every other unit. A base
    model has no safety behaviour to score (it refuses nothing, so there are no refusals of its own to
    calibrate I_S on), so no unit can be ESU or CU; with I_U alone a unit is either needed for utility
    or redundant. Using the budget as RU lets Fig 6 answer directly what the trained units become."""
    model, _ = load_base(cfg)
    shape = adapter_for(model).shape
    z = base_scores(cfg)["z_utility"]
    ru = budget_masks(cfg)["ru"].flat()
    lab = ["RU" if r else "EUU" for r in ru.tolist()]
    return Labels(shape, lab, torch.zeros_like(z), z, (cfg.ru_frac, 0.0, 1.0 - cfg.ru_frac), cfg.threshold_rule)


# --------------------------------------------------------------------------------------------------
# Caching helpers
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _TrainKey:
    base: str
    dtype: str
    seed: int  # calibration draw
    ru_frac: float
    threshold_rule: str
    wifv_variant: str
    n_calib: int
    style: str
    stages: tuple[SFTStage, ...]
    condition: str
    run_seed: int
    lr_scale: float
    train_other: bool


def _train_key(cfg: BudgetConfig, condition: str, seed: int) -> _TrainKey:
    masked = condition != "full"
    return _TrainKey(cfg.base, cfg.dtype, cfg.seed, cfg.ru_frac, cfg.threshold_rule, cfg.wifv_variant, cfg.n_calib,
                     cfg.style, cfg.stages, condition, int(seed), cfg.lr_scale_masked if masked else 1.0,
                     cfg.train_other_masked if masked else True)


def _train_rev(cfg: BudgetConfig) -> str:
    bcfg = base_classify_config(cfg)
    names = [bcfg.calib.utility_set, bcfg.calib.safety_set] + [s.data for s in cfg.stages]
    return f"{model_revision(load_base(cfg)[0])}|data:{datasets.sets_revision(names)}"


_MEMO: dict[tuple, dict] = {}


def clear_memo() -> None:
    """Drop the in-process memo of results (each trained run's weights included; they stay in the disk cache):
    a loop over many runs of a large model calls it between runs to bound its memory."""
    _MEMO.clear()


def _cached(stage: str, key, compute, rev: str) -> dict:
    """`cache.cached`, memoised in the process (a notebook reads a run's weights several times)."""
    k = (stage, cache.config_key(stage, key, rev), str(_config.CACHE_DIR))
    if k not in _MEMO:
        _MEMO[k] = cache.cached(stage, key, compute, model_revision=rev)
    return _MEMO[k]


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------

def unit_change(before: dict[str, torch.Tensor], model) -> torch.Tensor:
    """Float64 [n_units] (`unit_order`): L2 norm of the change of each unit's own entries (MLP channel:
    gate/up rows and down column; head: q rows and o columns; shared k/v rows are not counted)."""
    ad = adapter_for(model)
    names = {id(p): n for n, p in model.named_parameters()}
    mlp, heads = [], []
    for layer in range(ad.n_layers):
        def d(proj: str) -> torch.Tensor:
            w = ad.proj(layer, proj).weight
            return (w.detach().to(torch.float64).cpu() - before[names[id(w)]].to(torch.float64).cpu()).square()

        mlp.append((d("gate_proj").sum(1) + d("up_proj").sum(1) + d("down_proj").sum(0)).sqrt())
        q = d("q_proj").sum(1).view(ad.n_heads, ad.head_dim).sum(1)
        o = d("o_proj").sum(0).view(ad.n_heads, ad.head_dim).sum(1)
        heads.append((q + o).sqrt())
    return torch.cat([torch.stack(mlp).reshape(-1), torch.stack(heads).reshape(-1)])


def align(model, tok, stages: tuple[SFTStage, ...], *, mask: UnitMask | None, run_seed: int, lr_scale: float = 1.0,
          train_other: bool = False, log=None) -> dict:
    """Run the alignment SFT stages in order on `model` (in place): all parameters when `mask` is None,
    else only `mask`'s units (plus non-unit parameters when `train_other`). Returns the per-step
    losses of every stage, the training summary and the check that nothing outside the mask moved."""
    before = snapshot(model)
    losses, info = [], []
    for i, st in enumerate(stages):
        tc = dataclasses.replace(st.train, seed=st.train.seed + 100 * i + int(run_seed),
                                 lr=st.train.lr * (lr_scale if mask is not None else 1.0))
        recs = st.records()
        _config.seed_everything(int(run_seed))
        kw = {} if mask is None else {"train_only": mask, "train_other": bool(train_other)}
        r = finetune(model, tok, recs, tc, log=log, **kw)
        losses.append(r["losses"].assign(stage=st.data))
        info.append({"stage": st.data, "lr": tc.lr, "epochs": tc.epochs, "steps": r["steps"], "seconds": r["seconds"],
                     "initial_loss": r["initial_loss"], "final_loss": r["final_loss"],
                     "trainable_params": r["trainable_params"], "frozen_params": r["frozen_params"],
                     **({"processes": r["processes"]} if r["processes"] > 1 else {})})  # scripts/train_stage.py
    moved_outside = 0
    if mask is not None:
        chk = verify_frozen(before, model, ~mask, kv="any", include_other=not train_other)
        moved_outside = int(chk["changed"].sum())
    delta = unit_change(before, model)
    return {"losses": pd.concat(losses, ignore_index=True), "info": pd.DataFrame(info),
            "moved_outside_mask": moved_outside, "unit_change": delta}


def train_run(cfg: BudgetConfig, condition: str, seed: int) -> dict:
    """Align a copy of the base under `condition` with training seed `seed` (cached): its weights
    (`state`), losses, a per-stage summary, and checks (entries changed outside the mask: must be 0)."""
    if seed not in cfg.seeds:
        raise ValueError(f"seed {seed} is not one of the config's training seeds {cfg.seeds}")
    base, tok = load_base(cfg)
    mask = condition_mask(cfg, condition, seed)

    def compute() -> dict:
        model = copy.deepcopy(base)
        forget_revision(model)  # a copy is not the base: never reuse its revision
        out = align(model, tok, cfg.stages, mask=mask, run_seed=seed, lr_scale=cfg.lr_scale_masked,
                    train_other=cfg.train_other_masked)
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        summary = {"condition": condition, "seed": int(seed), "moved_outside_mask": out["moved_outside_mask"],
                   "trained_units_pct": 100.0 if mask is None else 100 * mask.fraction("units"),
                   "trained_unit_params_pct": 100.0 if mask is None else 100 * mask.fraction("params")}
        return {"state": state, "losses": out["losses"], "info": out["info"], "unit_change": out["unit_change"],
                "summary": summary}

    return _cached(f"{STAGE}_train", _train_key(cfg, condition, seed), compute, _train_rev(cfg))


def trained_model(cfg: BudgetConfig, condition: str, seed: int):
    """A fresh copy of the base with the weights of one run (for inspection)."""
    base, tok = load_base(cfg)
    model = copy.deepcopy(base)
    model.load_state_dict(train_run(cfg, condition, seed)["state"])
    forget_revision(model)
    model.eval()
    return model, tok


def materialize(cfg: BudgetConfig, condition: str, seed: int) -> Path:
    """The run's model saved with `save_pretrained` under `data/cache/budget_models/<run key>/`, so that
    stage_classify can load and label it like any model (its revision is the hash of these files)."""
    key = cache.config_key(f"{STAGE}_train", _train_key(cfg, condition, seed), _train_rev(cfg),
                           cache.code_version(__name__))
    folder = _config.CACHE_DIR / f"{STAGE}_models" / key
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder  # written whole or not at all (rename below); its content is hashed by model_revision
    model, tok = trained_model(cfg, condition, seed)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=folder.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------

def evaluate(model, tok, e: EvalSuite, *, style: str, seed: int) -> dict:
    """Safety and utility of a model in one prompt format: `evaluation.evaluate` (the one suite; metric
    names `evaluation.METRICS`, rates in %), `metrics` and per-record `rows`."""
    return evaluation.evaluate(model, tok, e, seed=seed, style=style)


def _eval_rev(cfg: BudgetConfig) -> str:
    return datasets.sets_revision(cfg.eval.set_names())


@dataclass(frozen=True)
class _EvalKey:
    what: object  # a _TrainKey, or the spec of a reference model
    style: str
    seed: int
    eval: EvalSuite


def evaluate_run(cfg: BudgetConfig, condition: str, seed: int) -> dict:
    """Evaluation of one trained run (cached): `metrics` (dict) and `rows` (per record)."""
    key = _EvalKey(_train_key(cfg, condition, seed), cfg.style, cfg.seed, cfg.eval)

    def compute() -> dict:
        model, tok = trained_model(cfg, condition, seed)
        return evaluate(model, tok, cfg.eval, style=cfg.style, seed=cfg.seed)

    return _cached(f"{STAGE}_eval", key, compute, f"{_train_rev(cfg)}|eval:{_eval_rev(cfg)}")


def evaluate_reference(cfg: BudgetConfig, which: str) -> dict:
    """Evaluation of the base (`which='base'`, raw format) or of the preset's aligned model
    (`'reference'`, chat format), cached."""
    if which not in REFERENCES:
        raise ValueError(f"which must be one of {REFERENCES}, got {which!r}")
    if which == "reference" and not cfg.reference:
        raise ValueError("this config has no aligned reference (a model given alone: its base is the model itself); "
                         "evaluate 'base' or the runs")
    if which == "base":
        model, tok = load_base(cfg)
        style = cfg.base_style
    else:
        model, tok = sc.load(reference_classify_config(cfg))
        style = "chat"
    spec = cfg.base if which == "base" else cfg.reference
    key = _EvalKey(f"{spec}|{cfg.dtype}", style, cfg.seed, cfg.eval)

    def compute() -> dict:
        return evaluate(model, tok, cfg.eval, style=style, seed=cfg.seed)

    return _cached(f"{STAGE}_eval", key, compute, f"{model_revision(model)}|eval:{_eval_rev(cfg)}")


# --------------------------------------------------------------------------------------------------
# Table 4
# --------------------------------------------------------------------------------------------------

METRICS = ("utility", "howto_utility", "asr", "refusal", "jailbreak_asr", "over_refusal", "degenerate", "ppl",
           "alpaca_nll")  # Table 4's columns, in the suite's vocabulary (`evaluation.METRICS`)


def table4(cfg: BudgetConfig, log=print) -> dict:
    """Train and evaluate every condition and seed (each run cached), plus the base and the reference.
    `runs`: one row per run; `summary`: mean, sd (`evaluation.summarize`) and n per condition; alignment
    tax = base task accuracy (`utility`) minus the condition's."""
    rows = []
    for which, label in (("base", "base"), ("reference", "reference"))[:2 if cfg.reference else 1]:
        m = evaluate_reference(cfg, which)["metrics"]
        rows.append({"condition": label, "seed": -1, "trained_unit_params_pct": 0.0, "final_loss": np.nan,
                     "train_seconds": np.nan, "moved_outside_mask": 0, **m})
    for cond in cfg.conditions:
        for s in cfg.seeds:
            tr = train_run(cfg, cond, s)
            m = evaluate_run(cfg, cond, s)["metrics"]
            info = tr["info"]
            rows.append({"condition": cond, "seed": s,
                         "trained_unit_params_pct": tr["summary"]["trained_unit_params_pct"],
                         "final_loss": float(info["final_loss"].iloc[-1]), "train_seconds": float(info["seconds"].sum()),
                         "moved_outside_mask": tr["summary"]["moved_outside_mask"], **m})
            if log:
                log(f"[budget] {cond} seed {s}: task {m['utility']:.1f}%, harmful {m['asr']:.1f}%")
    runs = pd.DataFrame(rows)
    base_acc = float(runs.loc[runs["condition"] == "base", "utility"].iloc[0])
    runs["alignment_tax"] = base_acc - runs["utility"]
    return {"runs": runs, "summary": summarize(runs)}


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd (`evaluation.summarize`: ddof 1, 0 for one run) of every numeric column per condition,
    conditions in order."""
    cols = [c for c in runs.columns if c not in ("condition", "seed") and pd.api.types.is_numeric_dtype(runs[c])]
    return evaluation.summarize(runs, "condition", cols)


def table4_display(summary: pd.DataFrame, metrics: tuple[str, ...] = ("trained_unit_params_pct", "utility",
                   "alignment_tax", "howto_utility", "asr", "refusal", "jailbreak_asr", "over_refusal",
                   "degenerate", "ppl", "final_loss")) -> pd.DataFrame:
    """Table 4 as text: 'mean ± sd' per metric (sd only where there are several seeds)."""
    out = pd.DataFrame(index=summary.index)
    out["n"] = summary["n"]
    for m in metrics:
        if m not in summary or summary[m].isna().all():
            continue
        nd = 2 if m in ("ppl", "final_loss") else 1
        out[m] = ["" if pd.isna(a) else f"{a:.{nd}f}" + (f" ± {b:.{nd}f}" if n > 1 else "")
                  for a, b, n in zip(summary[m], summary[f"{m}_sd"], summary["n"])]
    return out


def response_examples(cfg: BudgetConfig, role: str = "harmful", n: int = 2) -> pd.DataFrame:
    """The first `n` prompts of one evaluation set (`role`: harmful, jailbreak, borderline, utility, howto)
    with each model's answer and verdict: base, reference and every condition's first-seed run."""
    models = {"base": evaluate_reference(cfg, "base")}
    if cfg.reference:
        models["reference"] = evaluate_reference(cfg, "reference")
    models.update({c: evaluate_run(cfg, c, cfg.seeds[0]) for c in cfg.conditions})
    rows = []
    for name, res in models.items():
        d = res["rows"]
        d = d[d["role"] == role].head(n)
        rows += [{"prompt": p, "model": name, "response": r, "verdict": v}
                 for p, r, v in zip(d["prompt"], d["response"], d["verdict"])]
    return pd.DataFrame(rows).set_index(["prompt", "model"])


_PAPER_SETTING = {"base": "base", "full SFT (Alpaca)": "full", "RU-only SFT (20%)": "ru_only"}
_PAPER_METRIC = {"gsm8k": "utility"}  # our analogue of each of the paper's Table 4 metrics


def table4_vs_paper(summary: pd.DataFrame) -> pd.DataFrame:
    """The paper's Table 4 (LLaMA-7B) beside ours: GSM8K against our task accuracy (the exact-answer
    utility set); MMLU and MT-Bench have no analogue here (NaN). Adds the alignment tax of each."""

    rep = reported("table4")
    rows = []
    for _, r in rep.iterrows():
        cond = _PAPER_SETTING.get(r["setting"])
        ours_metric = _PAPER_METRIC.get(r["metric"])
        ok = cond in summary.index and ours_metric is not None
        rows.append({"paper_setting": r["setting"], "paper_metric": r["metric"], "paper": r["value"],
                     "our_condition": cond, "our_metric": ours_metric or "",
                     "ours": summary.loc[cond, ours_metric] if ok else np.nan,
                     "ours_sd": summary.loc[cond, f"{ours_metric}_sd"] if ok else np.nan})
    out = pd.DataFrame(rows)
    gsm = rep[rep["metric"] == "gsm8k"].set_index("setting")["value"]
    for setting, cond in _PAPER_SETTING.items():
        if setting == "base" or setting not in gsm or cond not in summary.index:
            continue
        out.loc[len(out)] = {"paper_setting": setting, "paper_metric": "alignment tax (gsm8k, base − this)",
                             "paper": gsm["base"] - gsm[setting], "our_condition": cond,
                             "our_metric": "alignment_tax", "ours": summary.loc[cond, "alignment_tax"],
                             "ours_sd": summary.loc[cond, "alignment_tax_sd"]}
    return out


# --------------------------------------------------------------------------------------------------
# Fig 6: label transfer
# --------------------------------------------------------------------------------------------------

def labels_after(cfg: BudgetConfig, which: str) -> tuple[Labels, str]:
    """ESU/EUU/CU/RU labels of a model after alignment, by 02_classify's method: `which='reference'`
    (the preset's aligned model: 02_classify's own cached labels) or a condition name (its run with
    the first training seed). Returns the labels and the safety calibration used ('model': the model's
    own refusals, as the paper; 'reference': the set's refusals, when the model refuses nothing)."""
    if which == "reference":
        return sc.labels(reference_classify_config(cfg)), "model"
    path = str(materialize(cfg, which, cfg.seeds[0]))
    try:
        c = classify_config(cfg, path, style=cfg.style, safety_responses="model")
        return sc.labels(c), "model"
    except (ValueError, cache.CacheMiss) as err:
        # read-only (05_figures): a run that fell back to the reference refusals has no 'model' calibration cached
        if isinstance(err, ValueError) and "no refusal to calibrate on" not in str(err):
            raise
        c = classify_config(cfg, path, style=cfg.style, safety_responses="reference")
        return sc.labels(c), "reference"


def transfer(cfg: BudgetConfig, afters: tuple[str, ...] = ("reference", "full", "ru_only")) -> dict:
    """Fig 6 analogue: percent of each base label (RU, EUU; rows) that gets each label after alignment
    (columns), by units, for each model in `afters`. Also the label shares after, and which calibration
    labelled it."""
    before = base_labels(cfg)
    mats, shares, how = {}, [], {}
    for a in afters:
        if (a != "reference" and a not in cfg.conditions) or (a == "reference" and not cfg.reference):
            continue
        lab, used = labels_after(cfg, a)
        how[a] = used
        mats[a] = transfer_matrix(before, lab).loc[["RU", "EUU"]]
        shares.append(lab.fractions()["pct_units"].rename(a))
    return {"matrices": mats, "shares": pd.concat(shares, axis=1), "safety_calibration": how}


def transfer_table(tr: dict) -> pd.DataFrame:
    """The matrices of `transfer` stacked: (after model, base label) x label after, percent of row."""
    return pd.concat({k: v for k, v in tr["matrices"].items()}, names=["after", "before"])


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# Summary in words
# --------------------------------------------------------------------------------------------------

def _pm(s: pd.DataFrame, cond: str, m: str, nd: int = 1) -> str:
    a, b, n = s.loc[cond, m], s.loc[cond, f"{m}_sd"], int(s.loc[cond, "n"])
    return f"{a:.{nd}f}" + (f" ± {b:.{nd}f}" if n > 1 else "")


def summary_text(cfg: BudgetConfig, tr: dict | None = None) -> str:
    """The notebook's conclusion in plain words, every number read from the cached results. Where the
    evaluation measures WikiText-2 (the real tier), the alignment tax is the perplexity rise over the
    base (GSM8K accuracy, near 0 for a 135M model, is still reported); elsewhere it is task accuracy."""
    t = table4(cfg, log=None)
    s, runs = t["summary"], t["runs"].copy()
    n = len(cfg.seeds)
    ppl_tax = bool(cfg.eval.wikitext_windows) and "ppl" in s.columns and "base" in s.index
    if ppl_tax:
        p0 = float(s.loc["base", "ppl"])
        s = s.copy()
        s["ppl_rise"], s["ppl_rise_sd"] = 100.0 * (s["ppl"] / p0 - 1.0), 100.0 * s["ppl_sd"] / p0
    lines = [f"Base (raw prompt): task accuracy {s.loc['base', 'utility']:.1f}%, harmful compliance "
             f"{s.loc['base', 'asr']:.1f}%; shipped aligned model: task accuracy "
             f"{s.loc['reference', 'utility']:.1f}%, harmful compliance {s.loc['reference', 'asr']:.1f}%."]
    if ppl_tax:
        lines[0] += (f" WikiText-2 perplexity: base {p0:.2f}, aligned {s.loc['reference', 'ppl']:.2f}. Task accuracy is "
                     "GSM8K's final-number match, near 0 for this model, so the alignment tax below is the perplexity rise.")
    for c in cfg.conditions:
        tax = (f"WikiText-2 perplexity {_pm(s, c, 'ppl', 2)} (alignment tax {_pm(s, c, 'ppl_rise')}% over the base), "
               f"Alpaca NLL {_pm(s, c, 'alpaca_nll', 3)}, task accuracy {_pm(s, c, 'utility')}%" if ppl_tax else
               f"task accuracy {_pm(s, c, 'utility')}% (alignment tax {_pm(s, c, 'alignment_tax')} points)")
        lines.append(f"{c} ({s.loc[c, 'trained_unit_params_pct']:.0f}% of unit parameters trained; mean ± sd over {n} "
                     f"seeds): {tax}, harmful compliance {_pm(s, c, 'asr')}%, refusal {_pm(s, c, 'refusal')}%, "
                     f"jailbreak {_pm(s, c, 'jailbreak_asr')}%, over-refusal {_pm(s, c, 'over_refusal')}%, final loss "
                     f"{_pm(s, c, 'final_loss', 3)}.")
    if {"ru_only", "random_only"} <= set(cfg.conditions):
        if ppl_tax:  # lower perplexity is better
            d = s.loc["random_only", "ppl_rise"] - s.loc["ru_only", "ppl_rise"]
            sd = max(s.loc["ru_only", "ppl_rise_sd"], s.loc["random_only", "ppl_rise_sd"], 1.0)
            what, unit = "perplexity rise lower by", "% of the base's perplexity"
        else:
            d = s.loc["ru_only", "utility"] - s.loc["random_only", "utility"]
            sd = max(s.loc["ru_only", "utility_sd"], s.loc["random_only", "utility_sd"], 1.0)
            what, unit = "task accuracy", " points"
        verdict = "better than" if d > 2 * sd else ("worse than" if d < -2 * sd else "not distinguishable from")
        lines.append(f"RU-only vs random units of the same size: {what} {d:+.1f}{unit}, {verdict} the null "
                     f"(criterion: a difference beyond twice the larger sd and at least 2{unit}).")
    if {"ru_only", "full"} <= set(cfg.conditions):
        m, u = ("ppl_rise", "%") if ppl_tax else ("alignment_tax", " points")
        lines.append(f"Alignment tax, full SFT {s.loc['full', m]:+.1f}{u} vs RU-only "
                     f"{s.loc['ru_only', m]:+.1f}{u}; harmful compliance "
                     f"{s.loc['full', 'asr']:.1f}% vs {s.loc['ru_only', 'asr']:.1f}%.")
    moved = int(runs["moved_outside_mask"].sum())
    lines.append(f"Entries changed outside the trained units, all masked runs together: {moved}.")
    if tr is not None:
        for a, m in tr["matrices"].items():
            r = m.loc["RU"]
            lines.append(f"base RU → {a}: {r['RU']:.0f}% RU, {r['CU']:.0f}% CU, {r['ESU']:.0f}% ESU, {r['EUU']:.0f}% EUU; "
                         f"base EUU → {a}: {m.loc['EUU', 'RU']:.0f}% RU, {m.loc['EUU', 'CU']:.0f}% CU.")
    return "\n".join(lines)


__all__ = [
    "BudgetConfig", "clear_memo", "budget_suite", "SFTStage", "CONDITIONS", "make_config", "base_scores", "select_budget",
    "budget_masks", "condition_mask", "mask_table", "base_labels", "align", "unit_change", "train_run",
    "trained_model", "evaluate", "evaluate_run", "evaluate_reference", "table4", "summarize", "table4_display",
    "table4_vs_paper", "labels_after", "transfer", "transfer_table",
    "summary_text", "stages_table", "response_examples",
]
