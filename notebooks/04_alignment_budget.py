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
# # 04 · Redundant units as an alignment budget (paper Sec. 6, Table 4; Fig 6)
#
# **Question.** The paper takes a *pre-trained base* model, finds its **redundant units** (RU) with the
# utility score alone, and runs the alignment SFT updating **only those units** (20% of them). It reports a
# smaller "alignment tax" (the drop of GSM8K accuracy from the base) than full-parameter SFT (Table 4, LLaMA-7B;
# the paper's numbers are shown below from `data/paper/`).
# Is the base's redundant capacity really a free budget for alignment? Beyond the paper we ask: do **random
# units of the same size** (the null) or the **highest-utility units** do just as well? Does the RU-only
# model become *safe* (the safety benchmark reviewers asked for)? And, as in Fig 6: what do the base's units
# become after alignment?
#
# **Inputs.** The preset's base model (default: the organism's `base`, which reads the raw prompt format) and
# its aligned model (the organism's `aligned`, for reference and for 02_classify's labels); the alignment
# data (organism: `sft_instruct` then `sft_safety`, the organism's own recipe; real presets: Alpaca, as the
# paper); the calibration set `calib_utility`; the test sets `utility_test` (the GSM8K analogue),
# `benign_howto_test`, `harmful_test`, `jailbreak_test`, `borderline_test`, `ppl_heldout`.
# **Outputs.** `tables/table4_budget.*`, `tables/table4_budget_vs_paper.*`, `tables/table4_budget_masks.*`,
# `tables/fig6_budget_label_transfer.*`, `figures/fig_budget_tax.*`, `figures/fig_budget_losses.*`,
# `figures/fig6_budget_label_transfer.*`; cached results under `data/cache/budget_*` (trained weights
# included) and `data/cache/classify_*`.
# **Runtime.** About 10-15 minutes on a 2-core laptop CPU from a cold cache with the organism (3 conditions ×
# 3 seeds = 9 SFT runs at the organism's own recipe; one torch thread, `OMP_NUM_THREADS=1`); seconds when
# cached. Pass `-p epochs "1,1"` for a quicker, less aligned run.
# The measured training time is printed below. A 7B preset needs a GPU with room for full fine-tuning.

# %% tags=["parameters"]
preset = "organism"  # a name in ssah_utils.config.PRESETS
model = ""  # a Hugging Face id or local path replacing the preset's models ("" keeps them)
seed = 0  # calibration draw and evaluation sample; training seeds are seed, seed+1, ...
ru_frac = 0.20  # share of unit parameters in the budget (paper Sec. 6: 20%)
n_seeds = 3  # training seeds per condition (mean ± sd)
conditions = "full,ru_only,random_only"  # what trains: all / base RU / random units of RU's size (add top_only: the top-utility units of RU's size)
alignment = ""  # empty: the preset default (organism: instruct+safety, its recipe; real: Alpaca); "instruct": instruction SFT only (paper)
epochs = ""  # epochs per SFT stage, comma-separated ("" = the organism recipe: 2,3, so full SFT is the shipped aligned model's recipe)
lr_scale_masked = 1.0  # lr multiplier for the masked conditions (1: the recipe lr, as for full SFT)
train_other_masked = False  # masked conditions also train embeddings, norms, lm_head (paper: only the units)
n_calib = 128  # utility calibration pairs (paper: 128)
wifv_variant = "authors"  # as 02_classify: "authors" (z of WIFV² per o_proj channel, head mean) or "plain"
n_eval = 192  # prompts per evaluation set (a seeded sample; smaller sets are used whole)
batch_size = 96  # prompts per generation and scoring batch (02_classify's default, so its cache is reused)
n_train = 0  # alignment records: a seeded sample of this many (0 = all; CPU-sized real runs use fewer)

# %%
# NBVAL_IGNORE_OUTPUT
import pandas as pd
from ssah_utils import config, plots
from ssah_utils import stage_budget as sb
from ssah_utils import report_budget as rb

config.seed_everything(seed)
cfg = sb.config_from_params(dict(  # the one mapping from these parameters to the config (05_figures uses it too)
    preset=preset, model=model, seed=seed, ru_frac=ru_frac, n_seeds=n_seeds, conditions=conditions,
    alignment=alignment, epochs=epochs, lr_scale_masked=lr_scale_masked, train_other_masked=train_other_masked,
    n_calib=n_calib, wifv_variant=wifv_variant, n_eval=n_eval, batch_size=batch_size, n_train=n_train))
base_model, tokenizer = sb.load_base(cfg)  # loaded once; every step below reuses it
pd.set_option("display.precision", 2)
pd.set_option("display.width", 160)
config.print_env_report()
print(cfg)

# %% [markdown]
# The whole run is one frozen `BudgetConfig` (printed above). Each step is cached under the part of it that
# it depends on: changing an evaluation setting never retrains, and a rerun is free.
#
# ## 1. The base model's redundant units, from the utility score alone
# A base model refuses nothing, so it has no safety behaviour to score; as in the paper we score its units
# with the **utility** calibration set only (benign instructions with their answers, rendered in the base's
# own raw format `generation.RAW_TEMPLATE`), with 02_classify's WIFV scorer on response tokens,
# z-scored within each layer and module type. The budget is the **lowest `ru_frac` of unit parameters by
# z_U** (RU). The controls: **top** = the same share of the *highest*-z_U units; **random** = exactly RU's
# number of MLP channels and heads, placed uniformly (one mask per training seed).

# %%
masks_tab = sb.mask_table(cfg)
plots.save_table(masks_tab, "table4_budget_masks")
masks_tab

# %% [markdown]
# `pct_params` is the share of the units' parameters each mask trains (MLP channels and heads weigh very
# different numbers of parameters, so the unit share differs). `overlap_with_ru_pct`: how many of a mask's
# units are also RU (random masks overlap by about the budget share, by chance). Where the RU live:

# %%
sb.budget_masks(cfg)["ru"].summary()

# %% [markdown]
# Per layer: RU channels and heads and their share of the layer. A budget spread over every layer can change
# every block a little; one concentrated in a few layers can only rewrite those.
#
# ## 2. Alignment SFT under each condition
# The recipe is the organism's own (`organism.Recipe`: instruction SFT on `sft_instruct`, then safety SFT on
# `sft_safety`, each weighted by the recipe's data mix (`mix`: list-reversal records repeated); chat format;
# batch, learning rate, weight decay, warmup and cosine schedule of the recipe)
# through `training.finetune`, with the recipe's epochs, so `full` repeats the shipped aligned model's recipe
# from its base with another data order. `full` trains every
# parameter. The masked conditions train only their units' weight entries (an MLP channel's gate/up rows
# and down column; a head's q rows and o columns, and its group's k/v rows only when the whole GQA group is
# in the mask); embeddings, norms and lm_head stay fixed unless `train_other_masked`. Entries outside the
# mask are restored bit for bit after every step and verified after training.

# %%
sb.stages_table(cfg)

# %% [markdown]
# One row per SFT stage. Note the base has never seen the chat markers (`[INST]`, `[/INST]`): every aligned
# model has to learn the format as well as the behaviour, and a masked model must do it without its
# embeddings.

# %% tags=["nbval-ignore-output"]
t4 = sb.table4(cfg)  # trains and evaluates every condition and seed (each run cached)
plots.save_table(t4["summary"], "table4_budget")
sb.table4_display(t4["summary"])

# %% [markdown]
# Rows: `base` (raw prompt) and `reference` (the preset's shipped aligned model, chat) are single models;
# the conditions are mean ± sd over the training seeds. Rates in %, in the evaluation suite's vocabulary
# (`evaluation.METRICS`, the same names as in 02 and 03): `utility` = task accuracy on the exact-answer tasks
# (the GSM8K analogue), `alignment_tax` = base task accuracy minus the row's (positive = a loss),
# `howto_utility` = benign how-to requests answered correctly, `asr` = harmful requests answered (oracle),
# `refusal` = harmful requests refused, `jailbreak_asr` = harmful answers under jailbreak framings,
# `over_refusal` = borderline benign requests refused, `degenerate` = looping or empty answers, `ppl` =
# held-out perplexity, `final_loss` = the last SFT stage's training loss. Total training time of these runs (seconds, from the cache):

# %%
# NBVAL_IGNORE_OUTPUT
runs = t4["runs"]
runs.groupby("condition", sort=False)["train_seconds"].sum().round(0)

# %% [markdown]
# Measured on this machine when the runs were made (a cache hit shows the original times).
# The same numbers as a figure, each seed a dot:

# %%
fig = rb.plot_tax(t4["runs"])
_ = plots.save_figure(fig, "fig_budget_tax")

# %% [markdown]
# Dashed line: the base; dotted: the shipped aligned model. The paper's claim, in this picture: the RU bar of
# task accuracy at or above the base line and above the full-SFT bar. The controls say whether that is about
# *redundant* units or about training *fewer* parameters: compare RU with random (same size) and top.
# Did the runs learn? The training loss of the first seed of each condition:

# %%
fig = rb.plot_losses(cfg)
_ = plots.save_figure(fig, "fig_budget_losses")

# %% [markdown]
# The jump is the start of the safety stage (new data: refusals). A masked condition whose loss stays high in
# that stage has not learnt the refusals, whatever its task accuracy. What the models actually say to a
# harmful request and to a task:

# %% tags=["nbval-ignore-output"]
sb.response_examples(cfg, "harmful", n=2)

# %% [markdown]
# Compare the verdicts with the table: a masked model may answer in the chat format (it learnt the format)
# and still comply with harmful requests (it did not learn to refuse).

# %% tags=["nbval-ignore-output"]
sb.response_examples(cfg, "utility", n=2)

# %% [markdown]
# ### Beside the paper's Table 4
# The paper's LLaMA-7B numbers next to ours: GSM8K against our task accuracy, and the alignment tax of each
# (base − aligned; negative = alignment *improved* the score). MMLU and MT-Bench have no analogue in the
# organism's world (NaN). The paper reports no safety metric for this experiment; ours are in Table 4 above.

# %% tags=["nbval-ignore-output"]
vs = sb.table4_vs_paper(t4["summary"])
plots.save_table(vs, "table4_budget_vs_paper")
vs

# %% [markdown]
# Different models, data and scales: compare directions (does RU-only lose less than full SFT?), not values.
#
# ## 3. Fig 6: what do the base's units become after alignment?
# The base is labelled from I_U alone (no safety behaviour to score): **RU** = the budget itself (lowest
# `ru_frac` of parameters by z_U), **EUU** = every other unit, as the paper's Fig 6 base (EUU + RU only).
# The aligned models are labelled by 02_classify's method (I_S on their own refusals, I_U on the utility
# set; RU, ESU, EUU thresholds 10%, 1%, 10% of parameters): the shipped aligned model (02_classify's cached
# labels), and the first seed of full SFT and of RU-only SFT. Each row shows where the base's units of
# that label went, in % of the row's units.

# %%
tr = sb.transfer(cfg)
plots.save_table(sb.transfer_table(tr), "fig6_budget_label_transfer")
fig = rb.plot_transfer(tr)
_ = plots.save_figure(fig, "fig6_budget_label_transfer")

# %% [markdown]
# In the paper (base Llama-2-7B → Llama-2-7B-chat) most utility units become complex units and most redundant
# units stay redundant. Two things to keep in mind when reading the RU row: the base's RU set is the budget
# (`ru_frac` of parameters) while the aligned model's RU threshold is 02_classify's `h0` (10%), so when the
# budget is larger than `h0` not all of it *can* stay RU; and the base EUU row is the control (how often a unit
# the base needed becomes RU or CU). The RU-only panel answers the stage's own question: after training *only* the RU, do
# they stay redundant or become CU/ESU (units the aligned model needs)? If a model refuses nothing, its
# safety calibration falls back to the set's reference refusals (which calibration labelled each model):

# %% tags=["nbval-ignore-output"]
pd.DataFrame({"safety_calibration": tr["safety_calibration"]}).join(tr["shares"].T.round(1))

# %% [markdown]
# Label shares (% of units) of each aligned model beside the calibration used. With the model's own refusals
# the safety score reads the circuits that produce them; with reference refusals it reads how the model
# processes text it would not write.
#
# ## Summary
# Every number below is read from the cached results above.

# %% tags=["nbval-ignore-output"]
print(sb.summary_text(cfg, tr))

# %% [markdown]
# "Not distinguishable from the null" means the RU-only and random-unit task accuracies differ by less than
# twice the larger sd (and less than 2 points). Read the safety columns too: a small alignment tax is only
# a win if the model is also aligned (it refuses harmful requests).

# %% [markdown]
# ## Exercises
# Write the piece of the method that each exercise names, then run the cell below it: `course.check` runs your
# function against the package's reference on small inputs and says what is wrong, with a hint. The student
# copies (`make course`, `course/student/`) hold a stub in place of each answer.

# %%
import pandas as pd
import torch

from ssah_utils import course, units

# %% [markdown] tags=["exercise"]
# ### E10 · The redundant-unit budget (medium, about 10 min)
# Write `ru_budget(z_safety, z_utility, params, fraction)`: the redundant units, the lowest `fraction` of the
# parameters ranked by z_safety + z_utility (use `units.take_by_params` for the threshold).

# %% tags=["solution"]
def ru_budget(z_safety, z_utility, params, fraction):
    return units.take_by_params(torch.argsort(z_safety + z_utility, stable=True), params, fraction)


# %%
course.check("E10", ru_budget)

# %% [markdown] tags=["exercise"]
# ### E11 · Where the units go (medium, about 10 min)
# Fig 6 is a transfer matrix. Write `transfer_matrix(before, after)` for two lists of labels: rows the labels before,
# columns after, each of ESU, EUU, CU, RU present, as percent of each row (an empty row is all 0).

# %% tags=["solution"]
def transfer_matrix(before, after):
    labels = ["ESU", "EUU", "CU", "RU"]
    tab = pd.crosstab(pd.Categorical(before, labels), pd.Categorical(after, labels), dropna=False)
    return 100 * tab.div(tab.sum(axis=1).replace(0, 1), axis=0)


# %%
course.check("E11", transfer_matrix)

# %% [markdown] tags=["exercise"]
# ### E12 · Training only chosen rows (easy, about 5 min)
# RU-only alignment trains only the budget's rows. Write `train_only_grad(grad, trained_rows)`: the gradient with
# every row outside `trained_rows` set to 0.

# %% tags=["solution"]
def train_only_grad(grad, trained_rows):
    out = torch.zeros_like(grad)
    out[trained_rows] = grad[trained_rows]
    return out


# %%
course.check("E12", train_only_grad)

# %% [markdown]
# ## Questions for a student
# 1. The masked runs use the same learning rate as full SFT. A smaller trainable set often needs a larger
#    one: rerun with `lr_scale_masked = 3` and compare harmful compliance and the tax. Is the comparison with
#    full SFT fair at equal lr, at equal final loss, or at equal steps?
# 2. The paper's alignment was Alpaca SFT only. Set `alignment = "instruct"` (`epochs = "1"`): the models then
#    never see a refusal. What does "aligned" mean for the table in that case, and what does the tax measure?
# 3. Why is `random_only` the right null for "redundant units are a free budget", and what does `top_only`
#    add? If RU-only and random are indistinguishable, what has the experiment shown?
# 4. The masked models keep the base's embeddings, so the chat markers `[INST]`/`[/INST]` keep their
#    untrained vectors. Try `train_other_masked = True`: how much of the gap to full SFT was about the format?
# 5. Table 4's base is evaluated with the raw prompt and the aligned models with the chat template. How
#    could the prompt format alone change task accuracy? Design a check.
# 6. In Fig 6, which of the base's RU became CU or ESU after RU-only SFT, and which after full SFT? Use
#    `sb.base_labels(cfg).frame()` and `sb.labels_after(cfg, "ru_only")[0].frame()` to find them by layer.
# 7. `ru_frac = 0.2` follows the paper. Try 0.1 and 0.4: is there a budget size at which RU-only SFT learns to
#    refuse, and what does it cost in task accuracy?
