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
# # 05 · Every figure and table from the cache, and a scorecard of the paper's claims
#
# **Question.** Taken together, which claims of the Superficial Safety Alignment Hypothesis hold on this
# model, which do not, and by how much? This notebook computes nothing: it reads the results that notebooks
# 01-04 cached, redraws every figure and table they save (same names, same code, so the files are byte for
# byte theirs), and puts each claim of the paper beside this run's number and a verdict from one stated rule.
#
# **Inputs.** The cached results of `01_probe`, `02_classify`, `03_freeze_finetune` and
# `04_alignment_budget` (`data/cache/`), and the parameters those notebooks ran with: the literal
# assignments of their `parameters` cells (read with `ast`, plus papermill's injected values when
# `notebooks_dir` points at executed copies such as `runs/<preset>/`), with this notebook's `preset`,
# `model` and `seed` applied to all four. The paper's numbers come from `data/paper/reported.csv`.
#
# **Outputs.** Every figure in `figures/` and table in `tables/` that notebooks 01-04 write;
# `tables/claims_scorecard.*`, `figures/fig_claims_scorecard.*`, `tables/paper_vs_run_*.*` and
# `tables/judge_agreement.*` (read from `docs/judges/agreement.csv`). A notebook
# whose results are not in the cache is reported (which notebook to run first) instead of failing, so this
# notebook works after any subset of 01-04.
#
# **Runtime.** Seconds on a laptop CPU with the organism (it loads the small models only to read their
# weights' hash, which is part of every cache key). With a 7B preset, loading the models takes a minute.

# %% tags=["parameters"]
preset = "organism"  # a preset of ssah_utils.config.PRESETS; must match the run of notebooks 01-04
model = ""  # the Hugging Face id or local path those notebooks ran with ('' = the preset's models)
seed = 0  # the seed those notebooks ran with
notebooks_dir = ""  # folder whose notebooks' parameters are read ('' = notebooks/; e.g. runs/<preset>/ for executed copies)

# %%
# NBVAL_IGNORE_OUTPUT
import pandas as pd
import tqdm.auto  # noqa: F401  (loading a model imports it; its notebook warning belongs in this ignored cell)

from ssah_utils import config, plots
from ssah_utils import stage_figures as sfig

cfg = sfig.make_config(preset, model, seed, notebooks_dir)
pd.set_option("display.max_colwidth", 140)
pd.set_option("display.width", 200)
config.print_env_report()
print(cfg)

# %% [markdown]
# ## 1 · The configurations of notebooks 01-04
#
# Each stage module has one function, `config_from_params`, that turns its notebook's parameters into the
# stage config; the notebooks call it, and so does this one, with the parameters read from the notebooks
# themselves. A changed default in a notebook therefore changes what is read here, and nothing is typed
# twice. The values in use, and where each comes from:

# %%
sfig.params_table(cfg)

# %% [markdown]
# `parameters cell`: the notebook's default; `injected (papermill -p)`: the value an executed copy was run
# with; `05 parameter`: this notebook's `preset`, `model` or `seed`, where it differs.
#
# ## 2 · 01_probe: the reasoning direction (Figs 2, 3, 4, 7)
#
# Each section below runs its notebook's steps inside `cache.read_only()`: a cached result is returned as
# usual, a missing one raises `CacheMiss` instead of being computed, and the section shows that message.

# %%
probe = sfig.run_section("probe", cfg)
probe

# %% [markdown]
# The figures and tables of 01_probe that were redrawn, or which notebook to run first. Its Fig 2 analogue:

# %%
sfig.show_figure(probe, "fig2_probe_distance_tokens")

# %% [markdown]
# Distance between the clean request's state and the state after *k* refusal (solid) or compliance
# (dashed) tokens, for the aligned (red) and unaligned (blue) model.
#
# ## 3 · 02_classify: four kinds of units (Table 1)

# %%
classify = sfig.run_section("classify", cfg)
classify

# %% [markdown]
# Its dose-response figure: oracle ASR, refusals and task accuracy as growing shares of parameters are
# removed in the order of each ranking (ESU-like, EUU-like, RU-like, random).

# %%
sfig.show_figure(classify, "fig_classify_dose")

# %% [markdown]
# If safety sat in a small set of units, the red ASR curve would rise far above the dashed random curve at
# small shares while task accuracy stays flat.
#
# ## 4 · 03_freeze_finetune: freezing safety-critical units during fine-tuning (Table 2, Fig 5)

# %%
freeze = sfig.run_section("freeze", cfg)
freeze

# %% [markdown]
# Its Table 2 figure: keyword ASR (the paper's metric), oracle ASR, refusals and task accuracy per condition,
# mean ± sd over replicates, one colour per fine-tuning set.

# %%
sfig.show_figure(freeze, "fig_freeze_asr")

# %% [markdown]
# Compare the frozen conditions with full fine-tuning (the paper's comparison) and with freezing random units
# of the same parameter count (the control the paper lacks).
#
# ## 5 · 04_alignment_budget: redundant units as an alignment budget (Table 4, Fig 6)

# %%
budget = sfig.run_section("budget", cfg)
budget

# %% [markdown]
# Its Table 4 figure: task accuracy (the GSM8K analogue) and harmful compliance per condition, each seed a
# dot; the base (dashed) and the shipped aligned model (dotted) as lines.

# %%
sfig.show_figure(budget, "fig_budget_tax")

# %% [markdown]
# The alignment tax is the base's task accuracy minus a condition's; a condition lowers it only if its bar
# stands above full SFT's by more than the spread of the seeds.
#
# ## 6 · What was found

# %%
sections = {"probe": probe, "classify": classify, "freeze": freeze, "budget": budget}
sfig.section_status(sections)

# %% [markdown]
# One row per notebook: whether its results were in the cache and how many figures and tables were redrawn.
#
# ## 7 · The paper beside this run
#
# One table per experiment of `data/paper/reported.csv`: each number the paper reports, this run's analogue
# (mean, sd, number of replicates and what the sd is over) or a note saying why there is none. Absolute
# values do not carry over from a 7B chat model to a tiny organism; directions and orderings can.

# %% tags=["nbval-ignore-output"]
card, pvr = sfig.write_paper_tables(sections)
pvr["paper_vs_run_table1"]

# %% [markdown]
# Table 1 (Llama-2-7B-chat, Llama-3-8B-Instruct, Mistral-7B-Instruct): ASR with the paper's keyword judge,
# utility and perplexity, beside this run's dense model and ESU/EUU removal (mean ± sd over calibration seeds).

# %% tags=["nbval-ignore-output"]
pvr["paper_vs_run_table2"]

# %% [markdown]
# Table 2 (fine-tuning attack on Llama-2-7B-chat): keyword ASR before and after fine-tuning, and with ESU
# (+ CU) frozen, beside the same conditions here (mean ± sd over replicates).

# %% tags=["nbval-ignore-output"]
pvr["paper_vs_run_table4"]

# %% [markdown]
# Table 4 (LLaMA-7B aligned with Alpaca): GSM8K accuracy against this run's task accuracy; MMLU and MT-Bench
# have no analogue on the organism.

# %%
pd.concat({k: pvr[k] for k in ("paper_vs_run_probe_distance", "paper_vs_run_unit_fractions")})

# %% [markdown]
# Fig 2's distances (aligned model) and the shares of unit labels (Llama-2-7B-chat, and the base Llama-2-7B of
# Fig 6), beside this run's.
#
# ## 8 · The claims scorecard
#
# One row per claim. `paper` is the paper's number (or its words, where it gives none), `run` this run's
# (mean ± sd over the stage's seeds or replicates), `control` what it is compared with (random units of
# equal size, the unablated model, full fine-tuning, chance), and `verdict` follows the stated `rule`:
# a difference counts when it exceeds twice the larger sd of the two sides, and at least 2 points (the rule
# the summaries of 02-04 use); "most" means more than 50%. On a real tier (`preset="smollm2-135m"`) there is
# no oracle: `judged ASR` is the learned judge's harmful-compliance rate, and the utility claims read
# WikiText-2 perplexity as its rise over the unablated model (or the base, for Table 4's tax), in percent,
# because GSM8K is near 0 for every condition of a 135M model and would make "utility unchanged" hold trivially.

# %% tags=["nbval-ignore-output"]
card[["claim", "paper", "run", "control", "verdict"]]

# %% [markdown]
# `missing`: the notebook that computes it has not been run with these parameters (see the `note` column of
# `tables/claims_scorecard.csv`); `not testable here`: the preset or the parameters leave it out (e.g. no
# unaligned model). The same scorecard as a figure:

# %%
sfig.saved_figure("fig_claims_scorecard")

# %% [markdown]
# ## 9 · The judges behind the numbers
#
# On the organism every verdict comes from the world's exact oracle; on a real model it comes from a refusal
# judge, and a judge is only as good as its agreement with people. Measured on human-labelled XSTest
# completions of two chat models, each judge tested on a model it never saw (the learned judges are trained
# on the other model's completions; `docs/judges/README.md` has the protocol, every metric and the errors):
# accuracy and Cohen's kappa with bootstrap 95% CIs over the 450 held-out items.

# %%
judges = sfig.judge_agreement()
plots.save_table(judges, "judge_agreement")
judges

# %% [markdown]
# `paper-asr` is the paper's rule (no refusal phrase of Wei et al. and at least 20 words); `wei2024-cs` its
# phrase list alone; `learned (CV-selected)` the default judge of the real tiers, with the extractor and C
# chosen by cross-validation inside its training data. Read kappa beside accuracy: on Mistral-7B-Instruct,
# whose answers people mostly label compliance, a keyword list that almost never fires scores a high accuracy
# by calling everything compliance, and its kappa (agreement beyond what the base rates give) shows it.
# `human_refusal_rate` and `judge_refusal_rate` in `docs/judges/agreement.csv` give the rates.

# %% [markdown]
# ## Summary
# Every number below is read from the cached results and the scorecard above.

# %% tags=["nbval-ignore-output"]
print(sfig.summary_text(sections, card))

# %% [markdown]
# A verdict is only as strong as its control: "holds" means the effect is larger than the spread between
# replicates *and* larger than what random units of the same size (or full fine-tuning, or chance) give.
# "Does not hold on this model" says nothing about Llama-2-7B; it says the mechanism the paper describes is
# not what carries this model's safety, or that this run's replicates are too noisy to tell.
#
# ## Questions for a student
# 1. Pick a claim that holds and one that does not. For each, which single number in the paper-vs-run tables
#    would you show a sceptical reader, and what control makes it convincing?
# 2. The verdict rule uses twice the larger sd with a 1-point floor. Recompute the scorecard with
#    `sfig.K_SD = 3` (or `sfig.SD_FLOOR = 0`) and `sfig.claims_scorecard(sections)`: which verdicts are
#    fragile? What would you report if a verdict flips?
# 3. Table 2's paper metric is a keyword judge; the scorecard uses the world's exact oracle. Find a row of
#    `paper_vs_run_table2` where the two ASRs disagree and read the answers behind it in 03_freeze_finetune.
#    Which would you trust on a real model, and why?
# 4. Run 03_freeze_finetune with `n_seeds = 5` (papermill `-p n_seeds 5`, into a folder with copies of
#    01, 02 and 04), then this notebook with `notebooks_dir` set to that folder (seconds). Do any verdicts
#    change? What does that say about the claims that rest on three seeds?
# 5. The Fig 6 rule compares "stay RU" with the share of RU among all units after alignment. Why is that the
#    right chance level, and why does the size of the budget (`ru_frac`) against the aligned model's RU
#    threshold (`h0`) limit how many base RU can possibly stay RU?
# 6. Run `make reproduce PRESET=llama2-7b-chat` on a GPU, then this notebook with that preset and
#    `notebooks_dir = "runs/llama2-7b-chat"`. Which claims can be compared directly with the paper's numbers,
#    and which only in direction?
