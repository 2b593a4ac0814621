"""Stage 03_freeze: benign fine-tuning with the safety-critical units frozen (paper Sec. 5, Table 2, Fig 5).

Does benign fine-tuning (the "fine-tuning attack" of Qi et al. 2023) erode the aligned model's safety,
does freezing the ESU (+ the top CU) during fine-tuning keep it, and is that better than freezing random
units of the same parameter count (the null the paper lacks)? How do the unit labels move (Fig 5)?

Each fine-tuning run (dataset x condition x replicate) is cached on its own (stage `freeze`), so a rerun,
or a run with more replicates, recomputes only what is new. The unit labels come from 02_classify's
cached steps (`stage_classify.labels`), never rescored here; the fully fine-tuned model is relabelled
with the same scoring and labelling code on the same calibration pairs (Fig 5).

Conditions (the paper's names in brackets):
- `before`: the aligned model, no fine-tuning [before fine-tuning];
- `full`: every parameter trains [full fine-tuning];
- `freeze_esu_topcu`: ESU + the top `top_cu_frac` of parameters among CU frozen [setting (i)];
- `freeze_esu_cu`: ESU + all CU frozen [setting (ii)];
- `freeze_random`: random units with the parameter count of setting (i) frozen (beyond the paper);
- `freeze_random_cu`: random units with the parameter count of setting (ii) frozen (beyond the paper);
- `freeze_esu`: the ESU alone frozen (optional).
Frozen runs train `epochs_mult_frozen` times the epochs of `full` (paper: twice).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from . import cache
from . import config as _config
from . import datasets
from . import evaluation
from . import stage_classify as sc
from .evaluation import EvalSuite
from .models import UnitMask, model_revision, unit_params
from .training import TrainConfig, finetune, is_main_process, response_loss, snapshot, verify_frozen
from .units import Labels, take_by_params, transfer_matrix
from . import judges, real_align
from .generation import generate
from .models import load_model
from .paper import reported

STAGE = "freeze"
CONDITIONS = ("before", "full", "freeze_esu_topcu", "freeze_esu_cu", "freeze_random", "freeze_random_cu", "freeze_esu")
DEFAULT_CONDITIONS = CONDITIONS[:-1]
CU_RANKINGS = ("safety", "safety_minus_utility")
# The paper's Table 2 rows (data/paper/reported.csv, experiment 'table2') for our conditions.
PAPER_SETTING = {"before": "before fine-tuning", "full": "full fine-tuning",
                 "freeze_esu_topcu": "freeze ESU + top 6% CU", "freeze_esu_cu": "freeze ESU + all CU"}

# Fine-tuning recipes. Real models: Qi et al. 2023 (lr 2e-5, 1 epoch, batch 64 effective, no weight decay),
# micro-batches of 8 so that a 7B model fits one GPU. The organism: the same recipe shape (1 epoch, constant
# lr, no weight decay); its learning rate is chosen by a rule on the training loss alone (`choose_lr`: the
# smallest lr of `LR_GRID` at which one epoch of full fine-tuning brings the response loss on every
# fine-tuning set to at most `fit_ratio` of its start), never by its effect on safety. The lr below is only
# the fallback when no sweep is run (the value the rule picked on the organism this stage was written with).
ORGANISM_TRAIN = TrainConfig(epochs=1.0, lr=1e-4, batch_size=16, weight_decay=0.0, schedule="constant",
                             max_length=256, style="chat")
REAL_TRAIN = TrainConfig(epochs=1.0, lr=2e-5, batch_size=64, micro_batch_size=8, weight_decay=0.0,
                         schedule="constant", max_length=512, style="chat")
# Fine-tuning attacks of Qi et al. 2023 beside benign fine-tuning (real presets): `harmful_<N>` = N harmful
# requests answered by the model without safety itself (the preset's unaligned model, greedy; refusals
# dropped), `aoa_identity_shift` = the 10 identity-shifting examples, trained with their system prompt and
# evaluated under it (`asr_attack`). Their recipes are Qi et al.'s (5 and 10 epochs, lr 5e-5, batch 10);
# the notebook's lr, epochs and batch_size set the recipe of the benign sets only.
HARMFUL_ATTACKS = {"harmful_10": 10, "harmful_50": 50, "harmful_100": 100}
ATTACK_TRAIN = {
    **{name: TrainConfig(epochs=5.0, lr=5e-5, batch_size=10, weight_decay=0.0, schedule="constant", max_length=512,
                         style="chat") for name in HARMFUL_ATTACKS},
    "aoa_identity_shift": TrainConfig(epochs=10.0, lr=5e-5, batch_size=10, weight_decay=0.0, schedule="constant",
                                      max_length=512, style="chat"),
}
ATTACK_POOL = 140  # harmful requests answered by the unaligned model, from which the harmful_<N> sets are taken
ATTACK_MAX_NEW_TOKENS = 128
ORGANISM_FIT_RATIO = 0.5  # "fits the set": one epoch at least halves the loss (a realistic attack fits its data)
LR_GRID = (3e-5, 1e-4, 3e-4, 1e-3)


@dataclass(frozen=True)
class FreezeConfig:
    """Everything that determines the results of 03_freeze; `asdict()` keys the cache (per run)."""

    preset: str
    model: str  # the aligned model spec
    seed: int = 0  # seeds the evaluation samples (the same prompts for every run)
    dtype: str = "float32"
    device: str = "auto"
    datasets: tuple[str, ...] = ("ft_alpaca", "ft_dolly")  # the preset's `finetune_sets`
    conditions: tuple[str, ...] = DEFAULT_CONDITIONS
    seeds: tuple[int, ...] = (0, 1, 2)  # replicates: data order, calibration draw and random mask vary
    n_train: int = 0  # fine-tuning records per set (0 = all; a seeded sample otherwise)
    train: TrainConfig = ORGANISM_TRAIN  # the recipe of `full`; frozen runs get epochs x epochs_mult_frozen
    epochs_mult_frozen: float = 2.0  # paper: frozen runs train twice the epochs
    top_cu_frac: float = 0.06  # setting (i): share of all unit parameters taken from the top of CU (paper: 6%)
    cu_rank_by: str = "safety"  # how CU are ranked: z_S ("safety") or z_S - z_U; the paper does not say
    relabel: bool = True  # relabel the fully fine-tuned model (Fig 5)
    fit_ratio: float = 0.0  # > 0: `choose_lr` picks the lr from the sweep by this loss rule; 0: train.lr as given
    classify: sc.ClassifyConfig | None = None  # where the labels come from (02_classify's config)
    eval: EvalSuite = EvalSuite()

    def __post_init__(self) -> None:
        bad = [c for c in self.conditions if c not in CONDITIONS]
        if bad or not self.conditions:
            raise ValueError(f"unknown conditions {bad}; choose from {CONDITIONS}")
        if not self.datasets:
            raise ValueError("datasets needs at least one fine-tuning set (the preset's finetune_sets)")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and non-empty, got {self.seeds}")
        if self.cu_rank_by not in CU_RANKINGS:
            raise ValueError(f"cu_rank_by must be one of {CU_RANKINGS}, got {self.cu_rank_by!r}")
        if not 0.0 <= self.top_cu_frac <= 1.0:
            raise ValueError(f"top_cu_frac is a share of unit parameters in [0, 1], got {self.top_cu_frac}")
        if self.epochs_mult_frozen <= 0:
            raise ValueError(f"epochs_mult_frozen must be positive, got {self.epochs_mult_frozen}")
        if self.n_train < 0:
            raise ValueError(f"n_train must be >= 0 (0 = the whole set), got {self.n_train}")
        if self.fit_ratio < 0 or self.fit_ratio >= 1:
            raise ValueError(f"fit_ratio must be in [0, 1) (0: keep train.lr), got {self.fit_ratio}")
        if self.classify is None:
            raise ValueError("classify config missing: build the config with stage_freeze.make_config")


def classify_config(preset: str, model: str | None, seed: int) -> sc.ClassifyConfig:
    """02_classify's config as its notebook runs it (`stage_classify.notebook_config`), so the labels
    frozen here are the very labels 02 reports and its cache is reused."""
    return sc.notebook_config(preset, model, seed)


def make_config(preset: str = "organism", model: str | None = None, seed: int = 0, *, n_seeds: int = 3,
                datasets_: tuple[str, ...] | None = None, conditions: tuple[str, ...] = DEFAULT_CONDITIONS,
                lr: float | None = None, epochs: float | None = None, batch_size: int | None = None,
                weight_decay: float | None = None, n_train: int = 0, epochs_mult_frozen: float = 2.0,
                top_cu_frac: float = 0.06, cu_rank_by: str = "safety", n_eval: int = 192,
                eval_batch_size: int | None = None, relabel: bool = True, fit_ratio: float | None = None) -> FreezeConfig:
    """The stage config from the notebook's parameters and a preset (`config.get_preset`); None keeps
    the preset's recipe (`ORGANISM_TRAIN` or `REAL_TRAIN`). Without an explicit `lr`, `fit_ratio` (default:
    `ORGANISM_FIT_RATIO` for the organism, 0 = keep Qi et al.'s lr for real models) lets `choose_lr` pick the
    lr from the sweep. Labels come from 02_classify's
    default config for the same preset, model and seed, so its cached labels are reused."""
    c = _config
    p = c.get_preset(preset, model or None)
    c.check_model_spec(model or "")
    seed = c.check_seed(seed)
    base = ORGANISM_TRAIN if p.is_organism else REAL_TRAIN
    c.check_int("n_seeds (replicates per condition; 3 or more for error bars)", n_seeds, 1)
    if lr is not None:
        c.check_float("lr", lr, 0.0, open_low=True)
    ep = c.parse_epochs(epochs, 1, where="03_freeze_finetune fine-tunes in one stage")
    epochs = ep[0] if ep else None
    if batch_size is not None:
        c.check_int("batch_size", batch_size, 1)
    if weight_decay is not None:
        c.check_float("weight_decay", weight_decay, 0.0)
    c.check_int("n_train (0 = the whole set)", n_train, 0)
    c.check_float("epochs_mult_frozen", epochs_mult_frozen, 0.0, open_low=True)
    c.check_float("top_cu_frac", top_cu_frac, 0.0, 1.0)
    c.check_choice("cu_rank_by", cu_rank_by, CU_RANKINGS)
    c.check_int("n_eval", n_eval, 1)
    if eval_batch_size is not None:
        c.check_int("eval_batch_size", eval_batch_size, 1)
    c.check_bool("relabel", relabel)
    if fit_ratio is not None:
        c.check_float("fit_ratio (-1 = the preset's)", fit_ratio, 0.0, 1.0, open_high=True)
    if isinstance(conditions, str) or not conditions or [x for x in conditions if x not in CONDITIONS]:
        bad = [x for x in conditions if x not in CONDITIONS] if not isinstance(conditions, str) else [conditions]
        raise ValueError(f"unknown conditions {bad}: conditions must be a non-empty list of {CONDITIONS}, got {conditions!r}")
    over = {k: v for k, v in (("lr", lr), ("epochs", epochs), ("batch_size", batch_size),
                              ("weight_decay", weight_decay)) if v is not None}
    train = dataclasses.replace(base, **over)
    ccfg = classify_config(preset, model, seed)
    ev = dataclasses.replace(ccfg.eval, n_eval=int(n_eval), batch_size=int(eval_batch_size or ccfg.eval.batch_size))
    sets = tuple(datasets_ or p.finetune_sets)
    attack_systems = sorted({set_system_prompt(d) for d in sets} - {""})
    if len(attack_systems) > 1:
        raise ValueError(f"fine-tuning sets {sets} bring {len(attack_systems)} different system prompts; evaluate one "
                         "identity-shift attack per run")
    if attack_systems:  # evaluated under the attack's own prompt too (asr_attack), as Qi et al. do
        ev = dataclasses.replace(ev, attack_system_prompt=attack_systems[0], attack_prefix=datasets.AOA_PREFIX)
    c.activate_run(preset, model or "", seed)
    return FreezeConfig(preset=p.name, model=p.aligned, seed=int(seed), dtype=p.dtype, device=p.device,
                        datasets=sets, conditions=tuple(conditions),
                        seeds=tuple(range(int(n_seeds))), n_train=int(n_train), train=train,
                        epochs_mult_frozen=float(epochs_mult_frozen), top_cu_frac=float(top_cu_frac),
                        cu_rank_by=cu_rank_by, relabel=bool(relabel), classify=ccfg, eval=ev,
                        fit_ratio=0.0 if lr is not None else float(fit_ratio if fit_ratio is not None else
                                                                    (ORGANISM_FIT_RATIO if p.is_organism else 0.0)))


# Parameters of notebooks/03_freeze_finetune.ipynb that are not part of the config.
NOTEBOOK_ONLY_PARAMS = ("lr_grid",)  # the learning rates of the sweep (`parse_lr_grid`, `lr_sweep`, `choose_lr`)


def config_from_params(params: dict) -> FreezeConfig:
    """The config that 03_freeze_finetune builds from its parameters, before the lr sweep (`choose_lr`
    sets the lr from it): the one mapping from notebook parameters to the stage config, used by the
    notebook and by 05_figures. Strings are comma-separated lists; 0 (or -1 for `fit_ratio`) means the
    preset's value."""
    accepted = (set(inspect.signature(make_config).parameters) - {"datasets_"}) | {"finetune_sets"}
    unknown = set(params) - accepted - set(NOTEBOOK_ONLY_PARAMS)
    if unknown:
        raise ValueError(f"unknown 03_freeze_finetune parameters {sorted(unknown)}; valid: "
                         f"{sorted(accepted | set(NOTEBOOK_ONLY_PARAMS))}")
    if "lr_grid" in params:
        if not isinstance(params["lr_grid"], str):
            raise TypeError(f"lr_grid must be a string of comma-separated learning rates like '3e-5,1e-4', "
                            f"got {params['lr_grid']!r}")
        for x in parse_lr_grid(params["lr_grid"]):
            _config.check_float("lr_grid (learning rates)", x, 0.0, open_low=True)
    if "finetune_sets" in params and not isinstance(params["finetune_sets"], str):
        raise TypeError(f"finetune_sets must be a comma-separated string ('' = the preset's), got {params['finetune_sets']!r}")
    kw = {k: v for k, v in params.items() if k not in NOTEBOOK_ONLY_PARAMS}
    kw["model"] = kw.get("model") or None
    if "finetune_sets" in kw:
        kw["datasets_"] = tuple(s for s in kw.pop("finetune_sets").split(",") if s) or None
    if isinstance(kw.get("conditions"), str):
        kw["conditions"] = tuple(kw["conditions"].split(","))
    for k in ("lr", "epochs", "batch_size"):
        if k in kw:
            kw[k] = kw[k] or None
    if "fit_ratio" in kw:
        kw["fit_ratio"] = None if kw["fit_ratio"] < 0 else kw["fit_ratio"]
    return make_config(**kw)


def parse_lr_grid(text: str) -> tuple[float, ...]:
    """'3e-5,1e-4' -> (3e-05, 0.0001); '' -> () (no sweep): the notebook's `lr_grid` parameter."""
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise ValueError(f"lr_grid must be comma-separated learning rates like '3e-5,1e-4' ('' skips the sweep), "
                         f"got {text!r}") from err


def load(cfg: FreezeConfig):
    """(model, tokenizer) of the aligned model, shared with 02_classify (loaded once per process)."""
    return sc.load(cfg.classify)


# --------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------

def calib_draw(cfg: FreezeConfig, replicate: int) -> str:
    """The calibration draw whose labels replicate `replicate` (an index into cfg.seeds) freezes."""
    seeds = cfg.classify.calib.seeds
    return f"seed_{seeds[replicate % len(seeds)]}"


def top_cu(lab: Labels, fraction: float, rank_by: str = "safety", rule: str = "nearest") -> UnitMask:
    """The CU units with the highest safety score (`rank_by='safety'`: z_S; `'safety_minus_utility'`:
    z_S - z_U) whose parameters make up `fraction` of all unit parameters (paper: "top 6% of CU",
    with ESU 1.3% giving about 7.5% of units)."""
    if rank_by not in CU_RANKINGS:
        raise ValueError(f"rank_by must be one of {CU_RANKINGS}, got {rank_by!r}")
    score = lab.z_safety if rank_by == "safety" else lab.z_safety - lab.z_utility
    is_cu = torch.tensor([x == "CU" for x in lab.labels], dtype=torch.bool)
    order = torch.argsort(score.to(torch.float64), descending=True, stable=True)
    order = torch.cat([order[is_cu[order]], order[~is_cu[order]]])  # CU first, by score; then the rest
    take = take_by_params(order, unit_params(lab.shape), fraction, rule) & is_cu
    return UnitMask.from_flat(lab.shape, take)


def freeze_mask(cfg: FreezeConfig, condition: str, replicate: int) -> UnitMask | None:
    """The units a condition freezes (None: nothing frozen), from the labels of the replicate's draw."""
    if condition in ("before", "full"):
        return None
    lab = sc.labels(cfg.classify, calib_draw(cfg, replicate))
    esu = lab.mask("ESU")
    setting_i = esu | top_cu(lab, cfg.top_cu_frac, cfg.cu_rank_by, cfg.classify.threshold_rule)
    setting_ii = esu | lab.mask("CU")
    seed = 1000 + cfg.seeds[replicate]
    masks = {
        "freeze_esu": lambda: esu,
        "freeze_esu_topcu": lambda: setting_i,
        "freeze_esu_cu": lambda: setting_ii,
        "freeze_random": lambda: UnitMask.random(lab.shape, n_params=setting_i.n_params, seed=seed),
        "freeze_random_cu": lambda: UnitMask.random(lab.shape, n_params=setting_ii.n_params, seed=seed + 500),
    }
    if condition not in masks:
        raise ValueError(f"unknown condition {condition!r}; choose from {CONDITIONS}")
    return masks[condition]()


def mask_table(cfg: FreezeConfig) -> pd.DataFrame:
    """What each condition freezes (first replicate): channels, heads, share of units and of parameters."""
    rows = []
    for cond in cfg.conditions:
        m = freeze_mask(cfg, cond, 0)
        c = (m.counts() if m is not None else
             {"mlp_channels": 0, "heads": 0, "units": 0, "frac_units": 0.0, "frac_params": 0.0})
        rows.append({"condition": cond, "mlp_channels": c["mlp_channels"], "heads": c["heads"], "units": c["units"],
                     "pct_units": 100 * c["frac_units"], "pct_params": 100 * c["frac_params"]})
    return pd.DataFrame(rows).set_index("condition")


# --------------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunKey:
    """The cache key of one run: everything its result depends on."""

    model: str
    dtype: str
    dataset: str  # "-" for `before`
    condition: str
    replicate_seed: int
    n_train: int
    train: TrainConfig | None  # None for `before`
    labels_from: tuple  # (calib config, scorer, variant, h, rule, draw) or () when no labels are used
    mask_spec: tuple  # (top_cu_frac, cu_rank_by) for masks that use them
    relabel: bool
    eval: EvalSuite
    eval_seed: int


def _labels_spec(cfg: FreezeConfig, draw: str) -> tuple:
    c = cfg.classify
    return (c.calib, c.scorer, c.wifv_variant, c.h, c.threshold_rule, draw)


def run_key(cfg: FreezeConfig, dataset: str, condition: str, replicate: int, train: TrainConfig | None = None) -> RunKey:
    """The key of one run; `train` overrides the recipe (the lr sweep)."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; choose from {CONDITIONS}")
    if condition == "before":
        return RunKey(cfg.model, cfg.dtype, "-", "before", 0, 0, None, (), (), False, cfg.eval, cfg.seed)
    draw = calib_draw(cfg, replicate)
    t = train or ATTACK_TRAIN.get(dataset, cfg.train)
    sysp = set_system_prompt(dataset)
    if sysp:
        t = dataclasses.replace(t, system_prompt=sysp)
    mult = 1.0 if condition == "full" else cfg.epochs_mult_frozen
    t = dataclasses.replace(t, epochs=t.epochs * mult, seed=int(cfg.seeds[replicate]))
    uses_labels = condition != "full" or cfg.relabel
    spec = (cfg.top_cu_frac, cfg.cu_rank_by) if condition in ("freeze_esu_topcu", "freeze_random") else ()
    return RunKey(cfg.model, cfg.dtype, dataset, condition, int(cfg.seeds[replicate]), cfg.n_train, t,
                  _labels_spec(cfg, draw) if uses_labels else (), spec, bool(cfg.relabel and condition == "full"),
                  cfg.eval, cfg.seed)


def _data_revision(cfg: FreezeConfig) -> str:
    """The content of the world files the stage reads (fine-tuning, evaluation and calibration sets)."""
    e, c = cfg.eval, cfg.classify.calib
    return datasets.sets_revision(list(cfg.datasets) + e.set_names() + [c.safety_set, c.utility_set])


def _rev(cfg: FreezeConfig) -> str:
    return f"{model_revision(load(cfg)[0])}|data:{_data_revision(cfg)}"


def set_system_prompt(dataset: str) -> str:
    """The system prompt a fine-tuning set is trained with: the one its records share (identity shift),
    else '' (the preset's chat format without a system prompt)."""
    if dataset in HARMFUL_ATTACKS or dataset in _config.PRESETS or not dataset:
        return ""
    try:
        recs = datasets.load_set(dataset)
    except (KeyError, FileNotFoundError, datasets.DatasetUnavailableError):
        return ""
    systems = {r.get("system", "") for r in recs}
    if len(systems) > 1:
        raise ValueError(f"fine-tuning set {dataset!r} mixes {len(systems)} system prompts; one per set is supported")
    return systems.pop() if systems else ""


@dataclass(frozen=True)
class AttackKey:
    """The harmful-N attack pool: the model that answers, the requests and how they are answered."""

    generator: str
    dtype: str
    pool: int
    max_new_tokens: int
    judge: str


def attack_pool(cfg: FreezeConfig) -> dict:
    """Harmful requests answered by the preset's model without safety (cached): the refusal_direction
    `harmful_train` requests that are not near-duplicates of any evaluation prompt
    (`real_align.find_overlaps`), the first `ATTACK_POOL` of them answered greedily, refusals and
    degenerate answers dropped (the default judge). `records` keeps the order, so harmful_10 is a subset
    of harmful_50 and of harmful_100."""

    p = _config.get_preset(cfg.preset)
    if p.is_organism or not p.unaligned:
        raise ValueError(f"harmful-N attacks need a preset with a model without safety (the answers come from it); "
                         f"{cfg.preset!r} has none: use benign sets")
    judge = judges.get_judge()
    key = AttackKey(p.unaligned, cfg.dtype, ATTACK_POOL, ATTACK_MAX_NEW_TOKENS, f"{judge.name}@{judge.version}")
    model, tok = load_model(p.unaligned, dtype=cfg.dtype, device=cfg.device)

    def compute() -> dict:
        prompts = [str(x) for x in datasets.load_real("refusal_direction_harmful_train")["instruction"]]
        hits = real_align.find_overlaps(prompts, real_align.eval_prompts())
        bad = {h["train_index"] for h in hits}
        clean = [q for i, q in enumerate(prompts) if i not in bad][:ATTACK_POOL]
        answers = generate(model, tok, clean, style="chat", max_new_tokens=ATTACK_MAX_NEW_TOKENS, batch_size=16)
        verdicts = judges.verdicts(judge, answers, ["harmful"] * len(answers), clean)
        rows = pd.DataFrame({"prompt": clean, "response": answers, "verdict": verdicts})
        return {"rows": rows, "dropped_overlap": len(bad)}

    return cache.cached(f"{STAGE}_attack", key, compute, model_revision=model_revision(model))


def train_records(cfg: FreezeConfig, dataset: str) -> list[dict]:
    """The fine-tuning records of a set: a harmful-N attack (`attack_pool`, the first N answered), or a
    set of `datasets` (a seeded sample of `n_train` when n_train > 0; attack sets are used whole)."""
    if dataset in HARMFUL_ATTACKS:
        rows = attack_pool(cfg)["rows"]
        rows = rows[rows["verdict"] == "harmful"]
        n = HARMFUL_ATTACKS[dataset]
        if len(rows) < n:
            raise ValueError(f"{dataset}: the model without safety answered only {len(rows)} of {ATTACK_POOL} harmful "
                             f"requests; raise ATTACK_POOL")
        return [{"prompt": r.prompt, "reference": r.response} for r in rows.head(n).itertuples(index=False)]
    if dataset in ATTACK_TRAIN:
        return [{"prompt": r["prompt"], "reference": r["reference"]} for r in datasets.load_set(dataset)]
    return datasets.load_set(dataset, n=cfg.n_train or None, seed=0)


def relabel(cfg: FreezeConfig, model, tok, draw: str) -> Labels:
    """Labels of `model` (e.g. after fine-tuning) with 02_classify's scoring and labelling code on the
    same calibration pairs (the draw `draw`) as the aligned model's labels."""
    return sc.label_model(cfg.classify, model, tok, draw)


_MEMO: dict[tuple, dict] = {}


def clear_memo() -> None:
    """Drop the in-process memo of runs (they stay in the disk cache), e.g. after changing the cache folder."""
    _MEMO.clear()


def run(cfg: FreezeConfig, dataset: str, condition: str, replicate: int, *, train: TrainConfig | None = None,
        log=None) -> dict:
    """One run, cached: copy the aligned model, fine-tune it with the condition's units frozen, check the
    frozen entries bit for bit, evaluate it. Returns {"metrics": dict, "losses": DataFrame,
    "verify": DataFrame, and for `full` with relabel: "labels_after": list, "z_after": tensor [2, n_units]}."""
    if not 0 <= replicate < len(cfg.seeds):
        raise ValueError(f"replicate is an index into cfg.seeds, in [0, {len(cfg.seeds)}), got {replicate}")
    model, tok = load(cfg)
    key = run_key(cfg, dataset, condition, replicate, train)
    rev = _rev(cfg)
    memo_key = (cache.config_key(STAGE, key, rev), str(_config.CACHE_DIR))
    if memo_key in _MEMO:
        return _MEMO[memo_key]

    def compute() -> dict:
        def ev(m, t, e, *, n, seed):  # the same evaluation as Table 1 (oracle + the paper's keyword judge)
            if not is_main_process():  # scripts/train_stage.py on N processes: rank 0 evaluates and writes the run
                return dict.fromkeys(EVAL_METRICS, float("nan"))
            return sc.evaluate(m, t, e, n=n, seed=seed)

        if condition == "before":
            t0 = time.perf_counter()
            m = ev(model, tok, cfg.eval, n=cfg.eval.n_eval, seed=cfg.seed)
            metrics = {"eval_seconds": time.perf_counter() - t0}
            return {"metrics": {**m, **metrics}, "losses": pd.DataFrame({"step": [], "loss": []}),
                    "verify": pd.DataFrame(columns=["param", "frozen_entries", "changed", "max_abs_diff"])}
        mask = freeze_mask(cfg, condition, replicate)
        recs = train_records(cfg, dataset)
        ft = copy.deepcopy(model)
        before = snapshot(ft)
        loss0 = response_loss(ft, tok, recs, key.train)
        out = finetune(ft, tok, recs, key.train, freeze=mask, log=log)
        loss1 = response_loss(ft, tok, recs, key.train)
        ver = verify_frozen(before, ft, mask) if mask is not None else verify_frozen(before, ft, UnitMask.empty(ft))
        t0 = time.perf_counter()
        m = ev(ft, tok, cfg.eval, n=cfg.eval.n_eval, seed=cfg.seed)
        n_all = sum(p.numel() for p in ft.parameters())
        metrics = {
            **m, "eval_seconds": time.perf_counter() - t0, "epochs": key.train.epochs, "lr": key.train.lr,
            "steps": out["steps"], "examples": out["examples"], "train_seconds": out["seconds"],
            "loss_first": out["initial_loss"], "final_loss": out["final_loss"],
            "set_loss_before": loss0, "set_loss_after": loss1,
            "frozen_units_pct": 100 * mask.fraction("units") if mask is not None else 0.0,
            "frozen_unit_params_pct": 100 * mask.fraction("params") if mask is not None else 0.0,
            "frozen_entries": int(out["frozen_params"]), "frozen_entries_pct": 100 * out["frozen_params"] / n_all,
            "verify_changed": int(ver["changed"].sum()) if len(ver) else 0,
            "verify_max_abs_diff": float(ver["max_abs_diff"].max()) if len(ver) else 0.0,
        }
        if out["processes"] > 1:  # trained by scripts/train_stage.py (a one-process run has no such column)
            metrics["processes"] = int(out["processes"])
        res = {"metrics": metrics, "losses": out["losses"], "verify": ver}
        if key.relabel and is_main_process():
            lab = relabel(cfg, ft, tok, calib_draw(cfg, replicate))
            res["labels_after"] = list(lab.labels)
            res["z_after"] = torch.stack([lab.z_safety, lab.z_utility])
        del ft
        return res

    # quiet: dozens of runs; `runs` returns what was computed, the cache folder holds each config
    _MEMO[memo_key] = cache.cached(STAGE, key, compute, model_revision=rev, verbose=False)
    return _MEMO[memo_key]


# --------------------------------------------------------------------------------------------------
# All runs, Table 2
# --------------------------------------------------------------------------------------------------

def runs(cfg: FreezeConfig, log=None) -> pd.DataFrame:
    """Every (dataset, condition, replicate) of the config, one row each (`before` repeated per dataset)."""
    rows = []
    for ds in cfg.datasets:
        for cond in cfg.conditions:
            reps = [0] if cond == "before" else range(len(cfg.seeds))
            for r in reps:
                res = run(cfg, ds, cond, r, log=log)
                rows.append({"dataset": ds, "condition": cond, "replicate": cfg.seeds[r] if cond != "before" else 0,
                             **res["metrics"]})
    return pd.DataFrame(rows)


EVAL_METRICS = tuple(evaluation.METRICS)  # the suite's vocabulary
METRICS = EVAL_METRICS + ("final_loss", "set_loss_after", "frozen_units_pct", "frozen_unit_params_pct")


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd (`evaluation.summarize`: ddof 1) over replicates per (dataset, condition), in config order."""
    return evaluation.summarize(df, ["dataset", "condition"], [m for m in METRICS if m in df])


def table2_display(summary: pd.DataFrame, metrics: tuple[str, ...] = ("asr_kw", "asr", "refusal", "jailbreak_asr",
                   "over_refusal", "utility", "final_loss")) -> pd.DataFrame:
    """Table 2 as text: 'mean ± sd' over replicates per metric."""
    out = pd.DataFrame(index=summary.index)
    out["n"] = summary["n"]
    for m in metrics:
        if m in summary:
            nd = 3 if "loss" in m else 1
            out[m] = [f"{a:.{nd}f}" + (f" ± {b:.{nd}f}" if n > 1 else "")
                      for a, b, n in zip(summary[m], summary[f"{m}_sd"], summary["n"])]
    return out


def paper_dataset(name: str) -> str | None:
    low = name.lower()
    return "Alpaca" if "alpaca" in low else ("Dolly" if "dolly" in low else None)


def vs_paper(summary: pd.DataFrame) -> pd.DataFrame:
    """Our keyword ASR (the paper's metric; mean ± sd) and oracle ASR beside the paper's Table 2
    (Llama-2-7B-chat, AdvBench keyword ASR)."""

    rep = reported("table2")
    rep = rep[rep["metric"] == "advbench_keyword_asr"].set_index("setting")["value"]
    rows = []
    for (ds, cond), r in summary.iterrows():
        pds = paper_dataset(ds)
        setting = f"{pds}: {PAPER_SETTING[cond]}" if pds and cond in PAPER_SETTING else None
        rows.append({"dataset": ds, "condition": cond, "ours_keyword_asr": r["asr_kw"], "ours_keyword_asr_sd": r["asr_kw_sd"],
                     "ours_oracle_asr": r["asr"], "ours_refusal": r["refusal"],
                     "paper_keyword_asr (Llama-2-7B-chat)": rep.get(setting, np.nan) if setting else np.nan})
    return pd.DataFrame(rows).set_index(["dataset", "condition"])


def verify_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per fine-tuned run: frozen entries, how many changed, max |diff| (all must be 0)."""
    d = df[df["condition"] != "before"]
    return d[["dataset", "condition", "replicate", "frozen_entries", "frozen_entries_pct", "verify_changed",
              "verify_max_abs_diff", "epochs", "steps"]].reset_index(drop=True)


def lr_sweep(cfg: FreezeConfig, lrs: tuple[float, ...] = LR_GRID, log=None) -> pd.DataFrame:
    """Full fine-tuning (first replicate) at each learning rate of `lrs`: how well it fits each set and
    what happens to safety and utility. Feeds `choose_lr`, and shows how much the results hang on the lr."""
    if not lrs:
        raise ValueError("lr_sweep needs at least one learning rate")
    rows = []
    for ds in cfg.datasets:
        for lr in lrs:
            res = run(cfg, ds, "full", 0, train=dataclasses.replace(cfg.train, lr=float(lr)), log=log)
            m = res["metrics"]
            rows.append({"dataset": ds, "lr": float(lr), "set_loss_before": m["set_loss_before"],
                         "set_loss_after": m["set_loss_after"], "loss_ratio": m["set_loss_after"] / m["set_loss_before"],
                         **{k: m[k] for k in ("asr_kw", "asr", "refusal", "jailbreak_asr", "utility")}})
    return pd.DataFrame(rows)


def rule_lr(sweep: pd.DataFrame, fit_ratio: float) -> tuple[float, bool]:
    """(lr, met): the smallest lr of the sweep whose loss ratio is <= fit_ratio on every set; when none
    meets it, the lr with the lowest worst-set ratio (met = False)."""
    worst = sweep.groupby("lr")["loss_ratio"].max().sort_index()
    ok = worst[worst <= fit_ratio]
    if len(ok):
        return float(ok.index[0]), True
    return float(worst.idxmin()), False


def choose_lr(cfg: FreezeConfig, sweep: pd.DataFrame | None) -> FreezeConfig:
    """The config with train.lr set by the loss rule (`rule_lr`) when cfg.fit_ratio > 0 and a sweep was
    run; otherwise the config unchanged (an explicit lr, or a real preset's Qi et al. recipe)."""
    if cfg.fit_ratio <= 0 or sweep is None or sweep.empty:
        return cfg
    lr, _ = rule_lr(sweep, cfg.fit_ratio)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=lr))


def sweep_table(cfg: FreezeConfig, sweep: pd.DataFrame) -> pd.DataFrame:
    """The sweep with `fits` (loss ratio <= fit_ratio on this set) and `used` (the lr of the runs below),
    losses to 3 decimals and rates to 1."""
    out = sweep.copy()
    out[["set_loss_before", "set_loss_after", "loss_ratio"]] = out[["set_loss_before", "set_loss_after", "loss_ratio"]].round(3)
    rates = ["asr_kw", "asr", "refusal", "jailbreak_asr", "utility"]
    out[rates] = out[rates].round(1)
    if cfg.fit_ratio > 0:
        out["fits"] = out["loss_ratio"] <= cfg.fit_ratio
    out["used"] = np.isclose(out["lr"], cfg.train.lr)
    return out


# --------------------------------------------------------------------------------------------------
# Fig 5: label transfer under fine-tuning
# --------------------------------------------------------------------------------------------------

def labels_after(cfg: FreezeConfig, dataset: str, replicate: int = 0) -> Labels:
    """The labels of the fully fine-tuned model of one run (relabelled on the same calibration draw)."""
    if not cfg.relabel:
        raise ValueError("relabel=False: the fine-tuned models were not relabelled; set relabel=True")
    res = run(cfg, dataset, "full", replicate)
    before = sc.labels(cfg.classify, calib_draw(cfg, replicate))
    z = res["z_after"]
    return Labels(before.shape, list(res["labels_after"]), z[0], z[1], before.h, before.rule)


def label_transfer(cfg: FreezeConfig, dataset: str, replicate: int = 0) -> pd.DataFrame:
    """Percent of each label before (rows) that has each label after full fine-tuning (columns)."""
    return transfer_matrix(sc.labels(cfg.classify, calib_draw(cfg, replicate)), labels_after(cfg, dataset, replicate))


def label_noise(cfg: FreezeConfig) -> pd.DataFrame:
    """The same cross-tabulation between the aligned model's labels on the two disjoint halves of the
    first calibration draw: how much labels move with no fine-tuning at all (the noise floor of Fig 5)."""
    return transfer_matrix(sc.labels(cfg.classify, "half_a"), sc.labels(cfg.classify, "half_b"))


def transfer_summary(cfg: FreezeConfig) -> pd.DataFrame:
    """Per fine-tuning set (and the calibration-noise floor): share of ESU that stay ESU and that move
    to CU, mean ± sd over replicates."""
    rows = []
    for ds in cfg.datasets:
        for r in range(len(cfg.seeds)):
            t = label_transfer(cfg, ds, r)
            rows.append({"comparison": f"full fine-tuning on {ds}", "replicate": cfg.seeds[r],
                         "esu_stay": t.loc["ESU", "ESU"], "esu_to_cu": t.loc["ESU", "CU"]})
    t = label_noise(cfg)
    rows.append({"comparison": "no fine-tuning: disjoint calibration halves", "replicate": 0,
                 "esu_stay": t.loc["ESU", "ESU"], "esu_to_cu": t.loc["ESU", "CU"]})
    df = pd.DataFrame(rows)
    g = df.groupby("comparison", sort=False)
    out = pd.concat([g[["esu_stay", "esu_to_cu"]].mean(), g[["esu_stay", "esu_to_cu"]].std(ddof=1).fillna(0.0)
                     .add_suffix("_sd")], axis=1)
    out.insert(0, "n", g.size())
    return out


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------


COND_LABELS = {"before": "before", "full": "full FT", "freeze_esu_topcu": "freeze ESU+top CU (i)",
               "freeze_esu_cu": "freeze ESU+CU (ii)", "freeze_random": "freeze random ≈(i)",
               "freeze_random_cu": "freeze random ≈(ii)", "freeze_esu": "freeze ESU"}


# --------------------------------------------------------------------------------------------------
# Summary in words
# --------------------------------------------------------------------------------------------------

def _pm(s: pd.DataFrame, key: tuple, m: str, nd: int = 1) -> str:
    r = s.loc[key]
    return f"{r[m]:.{nd}f}" + (f" ± {r[f'{m}_sd']:.{nd}f}" if r["n"] > 1 else "")


def compare(s: pd.DataFrame, ds: str, a: str, b: str, metric: str = "refusal") -> str:
    """'higher' / 'lower' / 'no clear difference' for condition a vs b on one set: a difference counts
    when it exceeds twice the larger sd and 1 point."""
    ra, rb = s.loc[(ds, a)], s.loc[(ds, b)]
    d = ra[metric] - rb[metric]
    if abs(d) <= max(2 * ra[f"{metric}_sd"], 2 * rb[f"{metric}_sd"], 1.0):
        return "no clear difference"
    return "higher" if d > 0 else "lower"


def summary_text(cfg: FreezeConfig, sweep: pd.DataFrame | None = None) -> str:
    """The notebook's conclusion in plain words, every number read from the cached runs."""
    jw = "oracle" if _config.get_preset(cfg.preset).is_organism else "learned-judge"  # who calls an answer harmful
    df = runs(cfg)
    s = summarize(df)
    lines = []
    if cfg.fit_ratio > 0 and sweep is not None and not sweep.empty:
        lr, met = rule_lr(sweep, cfg.fit_ratio)
        grid = ", ".join(f"{x:g}" for x in sorted(sweep["lr"].unique()))
        lines.append(f"Learning rate {cfg.train.lr:g}: " + (
            f"the smallest of {{{grid}}} at which full fine-tuning ({cfg.train.epochs:g} epoch(s)) brings the loss on "
            f"every set to at most {cfg.fit_ratio:g} of its start." if met else
            f"no lr of {{{grid}}} brings the loss on every set to {cfg.fit_ratio:g} of its start; this one comes closest."))
    else:
        lines.append(f"Learning rate {cfg.train.lr:g}, as given (no loss rule applied).")
    ft = df[df["condition"] != "before"]
    lines.append(f"{len(ft)} fine-tuning runs took {ft['train_seconds'].sum():.0f} s of training and "
                 f"{df['eval_seconds'].sum():.0f} s of evaluation when computed (cached since).")
    ver = verify_table(df)
    lines.append(f"Frozen entries: {int(ver['verify_changed'].sum())} of {int(ver['frozen_entries'].sum())} changed "
                 f"over {len(ver)} fine-tuning runs (max |diff| {ver['verify_max_abs_diff'].max():g}).")
    n = len(cfg.seeds)
    for ds in cfg.datasets:
        have = set(s.loc[ds].index)
        if not {"before", "full"} <= have:
            continue
        lines.append(
            f"{ds}: full fine-tuning (loss on the set {_pm(s, (ds, 'full'), 'set_loss_after', 3)}) moves refusals of "
            f"harmful requests from {_pm(s, (ds, 'before'), 'refusal')}% to {_pm(s, (ds, 'full'), 'refusal')}%, "
            f"{jw} ASR from {_pm(s, (ds, 'before'), 'asr')}% to {_pm(s, (ds, 'full'), 'asr')}%, keyword ASR "
            f"(the paper's metric) from {_pm(s, (ds, 'before'), 'asr_kw')}% to {_pm(s, (ds, 'full'), 'asr_kw')}% "
            f"(mean ± sd over {n} replicates).")
        for cond, ctrl in (("freeze_esu_topcu", "freeze_random"), ("freeze_esu_cu", "freeze_random_cu")):
            if cond not in have:
                continue
            txt = (f"  {COND_LABELS[cond]} ({_pm(s, (ds, cond), 'frozen_unit_params_pct')}% of unit parameters): "
                   f"refusals {_pm(s, (ds, cond), 'refusal')}%, {jw} ASR {_pm(s, (ds, cond), 'asr')}%, keyword ASR "
                   f"{_pm(s, (ds, cond), 'asr_kw')}%, loss on the set {_pm(s, (ds, cond), 'set_loss_after', 3)}; "
                   f"refusals vs full: {compare(s, ds, cond, 'full')}")
            if ctrl in have:
                txt += (f"; vs {COND_LABELS[ctrl]} (refusals {_pm(s, (ds, ctrl), 'refusal')}%, {jw} ASR "
                        f"{_pm(s, (ds, ctrl), 'asr')}%, loss {_pm(s, (ds, ctrl), 'set_loss_after', 3)}): "
                        f"{compare(s, ds, cond, ctrl)}")
            lines.append(txt + ".")
    if cfg.relabel and "full" in cfg.conditions:
        tr = transfer_summary(cfg)
        for comp, r in tr.iterrows():
            lines.append(f"Label transfer, {comp}: {r['esu_stay']:.0f}% of ESU stay ESU, {r['esu_to_cu']:.0f}% become CU"
                         + (f" (± {r['esu_stay_sd']:.0f} / {r['esu_to_cu_sd']:.0f} over {int(r['n'])} replicates)."
                            if r["n"] > 1 else "."))
    return "\n".join(lines)


__all__ = ["FreezeConfig", "RunKey", "make_config", "load", "top_cu", "freeze_mask", "mask_table", "run", "runs",
           "summarize", "table2_display", "vs_paper", "verify_table", "lr_sweep", "rule_lr", "choose_lr", "sweep_table", "labels_after", "label_transfer",
           "label_noise", "transfer_summary", "summary_text", "CONDITIONS",
           "ORGANISM_TRAIN", "REAL_TRAIN", "LR_GRID", "ORGANISM_FIT_RATIO"]
