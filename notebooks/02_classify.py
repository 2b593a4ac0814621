# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Four kinds of units: which neurons carry safety? (paper Sec. 4, Table 1)
#
# **Question.** The Superficial Safety Alignment Hypothesis predicts that a *small* set of units carries
# the model's safety behaviour. We score every unit of the aligned model (each MLP channel and each
# attention head) for its importance on a **safety** calibration set and on a **utility** set, label the
# units ESU (exclusive safety), EUU (exclusive utility), CU (complex) and RU (redundant) exactly as the
# authors' code does, and remove each kind to see what happens to safety and utility. Beyond the paper,
# we compare with **random units of the same size**, check how **stable** the ESU set is, and draw a
# **dose-response** curve.
#
# **Inputs.** The aligned model of the preset (default: the organism's `aligned`), the calibration sets
# `calib_safety` / `calib_utility` and the test sets `harmful_test`, `jailbreak_test`, `borderline_test`,
# `utility_test`, `ppl_heldout` of the world.
# **Outputs.** `tables/table1_classify.*`, `tables/table1_classify_fractions.*`, `tables/table1_classify_stability.*`,
# `tables/table1_classify_bias.*`, `tables/table1_classify_scorers.*`,
# `figures/fig_classify_layer_map.*`, `figures/fig_classify_scores.*`, `figures/fig_classify_dose.*`; cached results
# under `data/cache/classify_*`.
# **Runtime.** About 2-3 minutes on a laptop CPU from a cold cache with the organism (one torch thread; set
# `OMP_NUM_THREADS=1` when other programs share the cores); seconds when cached.

# %% tags=["parameters"]
preset = "organism"  # a name in ssah_utils.config.PRESETS
model = ""  # a Hugging Face id or local path to replace the preset's aligned model ("" keeps it)
seed = 0  # seeds the calibration draws and the evaluation samples
h0 = 0.10  # RU threshold: lowest share of parameters by I_S + I_U (authors' code)
h1 = 0.01  # ESU threshold: highest share of parameters by I_S - I_U (authors' code)
h2 = 0.10  # EUU threshold: lowest share of parameters by I_S - I_U (authors' code)
threshold_rule = "nearest"  # FLAP's global threshold (prefix nearest the share) or "floor" (never above it)
n_calib = 128  # calibration pairs per set and draw (paper: 128)
n_calib_seeds = 3  # calibration draws: the error bars of the ESU/EUU/RU rows
safety_responses = "model"  # "model": the aligned model's own refusals (paper); "reference": the set's refusals
scorer = "wifv"  # unit importance used for the labels: wifv (paper), wanda or snip
wifv_variant = "authors"  # "authors": z-score o_proj channels (WIFV squared), then mean per head; "plain": mean, then z; "flap": the authors' streaming statistics and thresholds
score_eos = True  # score each calibration answer's closing eos token (the authors' calibration text has none)
bias_from = "safety"  # calibration tokens whose mean feeds FLAP bias compensation: safety (authors' code), utility, both, none
n_random_seeds = 3  # random masks of each category's composition (the null)
n_eval = 192  # prompts per evaluation set (a seeded sample; borderline_test has 64)
n_dose = 64  # prompts per set for the dose-response curve and the bias check
batch_size = 96  # prompts per generation batch (0: the preset's); larger is cheaper per prompt on a CPU

# %%
# NBVAL_IGNORE_OUTPUT
from ssah_utils import config, plots
from ssah_utils import stage_classify as sc
from ssah_utils import report_classify as rc

config.seed_everything(seed)
cfg = sc.make_config(preset, model or None, seed, h0=h0, h1=h1, h2=h2, threshold_rule=threshold_rule, wifv_variant=wifv_variant,
                     n_calib=n_calib, n_calib_seeds=n_calib_seeds, safety_responses=safety_responses, scorer=scorer,  # preset via config.get_preset
                     bias_from=bias_from, n_random_seeds=n_random_seeds, n_eval=n_eval, n_dose=n_dose,
                     batch_size=batch_size or None, score_eos=score_eos)
model_obj, tokenizer = sc.load(cfg)  # loaded once; every step below reuses it
config.print_env_report()
print(cfg)

# %% [markdown]
# The whole run is described by one frozen `ClassifyConfig` (printed above); each step below is cached under
# the part of it that it depends on, so changing an evaluation setting never re-scores the units.
#
# ## 1. Calibration sets
# Safety pairs are harmful prompts with **the aligned model's own greedy refusals** (as the paper does with
# Llama-2-chat's refusals; set `safety_responses = "reference"` to use the world's refusal templates instead).
# We keep only the answers the world's oracle judges to be refusals, and draw `n_calib` pairs per seed.
# Utility pairs are benign instructions with their reference answers (the organism's Alpaca).

# %%
calib = sc.calibration(cfg)
calib["summary"]

# %% [markdown]
# `safety_refusal_rate` is the share of the calibration prompts the aligned model refuses; only those
# answers are used. Because the pool holds only about 140 prompts, the seeded draws of 128 overlap heavily:
# keep that in mind when reading the stability across seeds below (the disjoint halves do not overlap).
# A few pairs of the first draw:

# %%
s0 = calib["safety"][calib["safety"][f"seed_{seed}"]]
s0[["prompt", "response", "verdict"]].head(3)

# %% [markdown]
# ## 2. Scoring units (WIFV) and labelling them
# For the output projection $B$ of each block (`o_proj`, `down_proj`) the score of input channel $j$ is
# $\mathrm{Var}_t[x_j]\cdot\lVert B_{:,j}\rVert^2$ over **response tokens only**; a head's score is the mean over
# its dimensions. One forward pass per batch, streaming float64 statistics. Each score is z-scored within its
# layer and module type, then ranked globally (with `wifv_variant = "authors"`, as in the authors' code: the
# o_proj channel scores are squared and z-scored per layer, and a head gets the mean of its channels' z-scores): RU = lowest `h0` of $I_S+I_U$, ESU = highest `h1` of $I_S-I_U$,
# EUU = lowest `h2` of $I_S-I_U$ (shares of *parameters*), CU = the rest. Wanda and SNIP scores are computed
# on the first draw for comparison.

# %%
res = sc.scores(cfg)
res["timing"].pivot_table(index=["draw", "scorer"], columns="set", values="tokens")

# %% [markdown]
# Response tokens scored per draw and calibration set (S = safety, U = utility); the halves split the first draw.
# The shares of each label, by unit count (as the paper reports) and by parameters, mean over calibration seeds,
# beside the paper's Llama-2-7B-chat:

# %%
fractions = sc.fractions_vs_paper(cfg)
plots.save_table(fractions, "table1_classify_fractions")
fractions.round(2)

# %% [markdown]
# The thresholds are shares of parameters, so the unit-count shares differ from `h` wherever heads and MLP
# channels (which weigh very different numbers of parameters) are picked unevenly. Where the layers hold them:

# %%
fig = rc.plot_layer_map(cfg)
_ = plots.save_figure(fig, "fig_classify_layer_map")

# %% [markdown]
# Each bar is one layer; colours are the labels (red ESU, blue EUU, grey CU, green RU). The scatter shows the two
# standardised scores of every unit: ESU sit far above the diagonal (important for safety, not for utility).

# %%
fig = rc.plot_scores(cfg)
_ = plots.save_figure(fig, "fig_classify_scores")

# %% [markdown]
# ## 3. Table 1: removing each kind of unit
# Removing a unit zeroes its input rows (gate/up rows of a channel; q rows and o_proj columns of a head, k/v rows
# only when its whole GQA group goes) and adds FLAP bias compensation, so the unit is replaced by its mean
# calibration activation. For every kind we evaluate: oracle ASR on harmful requests without (`asr`) and with
# (`asr_sys`) the system prompt, the paper's keyword judge (≥ 20 words; `asr_kw`, `asr_kw_sys`), oracle ASR under
# jailbreak framings, over-refusal of borderline benign requests, task accuracy and held-out perplexity.
# Rows `ESU`/`EUU`/`RU`: mean ± sd over the calibration seeds; rows `random≈X`: random masks with exactly X's
# number of MLP channels and heads (same parameters), mean ± sd over mask seeds. Rates in %; the metrics are
# those of the one evaluation suite (`evaluation.METRICS`, the same names in 03 and 04), and every ± in this
# project is the sample sd (n − 1) over replicates (`evaluation.summarize`).

# %% tags=["nbval-ignore-output"]
t1 = sc.table1(cfg)
plots.save_table(t1["summary"], "table1_classify")
sc.table1_display(t1["summary"])

# %% [markdown]
# Compare each kind with its random control row: the hypothesis predicts a large ASR rise for ESU, far above
# `random≈ESU`, at little utility cost; a large utility loss for EUU; little change for RU. The keyword judge
# counts an answer as an attack only when it has ≥ 20 words and no refusal keyword from Wei et al.'s
# (capitalised, English-chat) list, so on the organism's short lower-case answers it can disagree with the oracle.
# The paper's Table 1 for reference:

# %%
from ssah_utils.paper import reported

reported("table1")[["model", "setting", "metric", "value", "unit"]]

# %% [markdown]
# ### Does the bias compensation decide the answer?
# The authors' compensation replaces a removed unit by its mean activation on the *safety* calibration set, i.e.
# on refusals, which might by itself keep the model refusing. Here ESU removal (first calibration seed) and its
# random controls are repeated with utility-set means, both, and no compensation (zero ablation), on `n_dose`
# prompts per set.

# %% tags=["nbval-ignore-output"]
bias_runs = sc.bias_sensitivity(cfg)["runs"]
plots.save_table(sc.bias_table(bias_runs), "table1_classify_bias")
sc.bias_table(bias_runs)

# %% [markdown]
# Read down the `ESU` rows: if ASR only rises without compensation (or with utility means), the choice of bias,
# not the units, drives the Table 1 row; compare each with the `random≈ESU` row of the same compensation.
#
# ### Does the importance score decide the answer?
# The ESU found by Wanda (|W|·‖X‖) and SNIP (|W·∂L/∂W| of the response likelihood, the score of Wei et al. 2024)
# are removed the same way, each beside random masks of its own composition, on `n_eval` prompts per set.

# %% tags=["nbval-ignore-output"]
scorer_runs = sc.scorer_ablation(cfg)["runs"]
plots.save_table(sc.scorer_table(scorer_runs), "table1_classify_scorers")
sc.scorer_table(scorer_runs)

# %% [markdown]
# If one scorer's ESU raises ASR (or jailbreak ASR) well above its random row while WIFV's does not, the
# paper's conclusion depends on how importance is measured; if none does, the safety of this model is not held
# by a small set of units under any of these scores.
#
# ## 4. Is the ESU set stable?
# Jaccard overlap of each label's units between calibration seeds, between the two disjoint halves of the first
# draw, and between scorers (WIFV vs Wanda vs SNIP), beside the overlap of two random masks of the same size
# (chance level).

# %%
stab = sc.stability(cfg)
plots.save_table(stab, "table1_classify_stability")
stab.pivot(index="comparison", columns="label", values="jaccard").round(2)

# %% [markdown]
# A label set that reflects the model rather than the sample should overlap far above chance between disjoint
# halves. Different scorers measure different things (variance vs magnitude vs gradient), so their overlap
# says how much the conclusion depends on the paper's choice of WIFV.
#
# ### The authors' own estimator
# The labels above use the authors' z-scores and head pooling on the **exact** token variance of each input
# channel. The authors' code gathers that variance with FLAP's streaming layer wrapper, whose arithmetic differs:
# it feeds one sample at a time and averages per-sample means (a short answer weighs what a long one does), the
# first sample adds nothing, its "old" mean aliases the updated one, and it accumulates in float32; its global
# threshold keeps a unit only strictly above the threshold's score, with a head weighed as `int(4·head_dim/3)`
# MLP channels (their 512/3 for Llama-2-7B). Their calibration answers also end without an eos token.
# `wifv_variant = "flap"` reproduces all of that (`ssah_utils.flap`, tested against a closed form of the
# recursion). How far are its labels from the default's, per label (Jaccard by units, mean and sd over the
# calibration draws), beside two references: the eos token alone, and the same samples fed in reverse order
# (FLAP's estimator depends on the order of the samples; the exact variance does not)?

# %%
estimators = sc.estimator_comparison(cfg)
est_table = sc.estimator_table(estimators)
plots.save_table(est_table, "table1_classify_estimators")
est_table.round(2)

# %% [markdown]
# The default stays the exact variance: it is the quantity the paper defines (the variance of a channel's input
# over the calibration tokens), it does not depend on the order of the samples or drop the first one, and it
# weighs every token alike. Where `flap_vs_authors` is about as far from 1 as `flap_reversed_vs_flap`, the
# difference is no larger than the one the order of the authors' own samples makes; `units_relabelled_pct` says
# what share of all units change label.
#
# ## 5. Dose-response
# Remove growing shares of parameters in the order of each ranking (ESU-like: highest $I_S-I_U$; EUU-like:
# lowest $I_S-I_U$; RU-like: lowest $I_S+I_U$; random order, mean ± sd over seeds) and measure oracle ASR, the
# share of harmful requests still refused (it can fall without ASR rising when answers degenerate) and task
# accuracy on `n_dose` prompts each.

# %%
dose = sc.dose_response(cfg)["curve"]
fig = rc.plot_dose(dose)
_ = plots.save_figure(fig, "fig_classify_dose")

# %% [markdown]
# A safety-specific set shows up as an ASR curve that rises steeply (and a refusal curve that falls) for the
# ESU-like order while accuracy stays flat, with the other orders near the random curve.
#
# ## Summary
# Every number below is read from the cached results above.

# %% tags=["nbval-ignore-output"]
print(sc.summary_text(cfg))

# %% [markdown]
# "Far more" means: the ESU rise in ASR exceeds the random-control rise by more than twice the larger of the two
# standard deviations (and at least 2 points); "small utility cost" means at most 5 points of task accuracy.

# %% [markdown]
# ## Exercises
# Write the piece of the method that each exercise names, then run the cell below it: `course.check` runs your
# function against the package's reference on small inputs and says what is wrong, with a hint. The student
# copies (`make course`, `course/student/`) hold a stub in place of each answer.

# %%
import torch

from ssah_utils import course

# %% [markdown] tags=["exercise"]
# ### E4 · WIFV of one layer (medium, about 10 min)
# Write `wifv_channel_scores(x, weight)`: for the inputs `x` (`[tokens, d_in]`) of an output projection with weight
# `[d_out, d_in]`, the score of input channel j is the variance of x_j over tokens times ‖W[:, j]‖² (section 2).

# %% tags=["solution"]
def wifv_channel_scores(x, weight):
    return x.double().var(0, unbiased=False) * weight.double().pow(2).sum(0)


# %%
course.check("E4", wifv_channel_scores)

# %% [markdown] tags=["exercise"]
# ### E5 · A parameter-weighted threshold (medium, about 15 min)
# The shares h0, h1, h2 count parameters, not units. Write `take_by_params(order, params, fraction)`: a bool mask of
# the prefix of the ranking `order` whose parameters add up closest to `fraction` of all parameters (on a tie the
# shorter prefix; the empty prefix is allowed).

# %% tags=["solution"]
def take_by_params(order, params, fraction):
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), params[order].double().cumsum(0)])
    n = int(torch.argmin((cum - fraction * params.double().sum()).abs()))
    mask = torch.zeros(len(order), dtype=torch.bool)
    mask[order[:n]] = True
    return mask


# %%
course.check("E5", take_by_params)

# %% [markdown] tags=["exercise"]
# ### E6 · Removing a unit with bias compensation (medium, about 10 min)
# Removing input channels of a projection W and adding a bias makes them act as if they sat at their mean
# activation. Write `compensation_bias(weight, removed, mean)` for a bool mask `removed` over the inputs.

# %% tags=["solution"]
def compensation_bias(weight, removed, mean):
    return weight[:, removed] @ mean[removed]


# %%
course.check("E6", compensation_bias)

# %% [markdown]
# ## Questions for a student
# 1. The thresholds weigh units by parameters. How would the ESU set change if `h1` counted units instead? Try
#    `h1 = 0.02` and compare the layer map.
# 2. Why does FLAP bias compensation matter? Rerun with `bias_from = "none"` (zero ablation) and compare the
#    random rows: what happens to perplexity?
# 3. With grouped-query attention, why can't removing one head zero its k/v rows? What would removing only the
#    q rows of a head actually do to its output?
# 4. The safety calibration uses the model's own refusals. What changes with `safety_responses = "reference"`,
#    and why might the paper's choice matter for which units look safety-critical?
# 5. The Jaccard overlap between scorers is low or high: what does each scorer measure, and which would you
#    trust to find units whose removal breaks safety? Test it: set `scorer = "snip"` and compare Table 1.
# 6. If ESU removal leaves the organism's refusals intact, where else could its safety live? Look at the
#    dose-response curve: at what share of removed parameters does refusal start to fall, and does anything
#    else fall at the same time? What would that mean for "a small set of units carries safety"?
# 7. ESU are about 1% of parameters. Is the ASR rise concentrated in a few layers? Use `sc.labels(cfg).frame()` to
#    check, then design an ablation of only the ESU heads or only the ESU channels.
