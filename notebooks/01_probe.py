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
# # 01 · Probing the reasoning direction (paper Sec. 3; Figs 2, 3, 4, 7)
#
# **Question.** The Superficial Safety Alignment Hypothesis says that safety alignment teaches a
# model an implicit *binary* choice — fulfil or refuse — made at the start of the answer. Can we see
# that choice inside the model? Does an aligned model's state for a harmful request sit closer to
# "the request followed by a refusal" than to "the request followed by compliance", and does an
# unaligned model (same pre-training, instruction tuning without safety data) show the reverse?
# Beyond the paper: is the choice linearly readable layer by layer, does a jailbreak work exactly when it
# moves the representation to the benign side, and is the choice fixed at the first tokens or revisited
# while the answer is written?
#
# **Inputs.** The preset's models (default: the shipped organism, `data/organism/{base,unaligned,aligned}`)
# and prompt sets (default: the world's `harmful_test`, `harmful_heldout`, `benign_howto_test`,
# `borderline_test`, `jailbreak_test`; real presets: AdvBench, HarmBench, Alpaca, XSTest).
#
# **Outputs.** `figures/fig2_probe_distance_tokens`, `fig3_probe_distance_blocks`,
# `fig4_probe_distance_gap`, `fig7_probe_distance_appendix`, and beyond the paper
# `figx_probe_linear`, `figx_probe_direction`, `figx_probe_tokens`; tables in `tables/probe_*`.
# Results are cached in `data/cache/probe/`.
#
# **Runtime.** Under a minute on a 2-core laptop CPU from a cold cache with the organism (measured:
# about 40 s with one thread); about 15 s when cached. A 7B preset needs a GPU.

# %% tags=["parameters"]
preset = "organism"  # a preset of ssah_utils.config.PRESETS (organism, llama2-7b-chat, ...)
model = ""  # a Hugging Face id or local path replacing the preset's aligned model ('' = the preset's)
seed = 0  # seed of the prompt samples and of the probe's held-out split
n_prompts = 128  # harmful queries in the cosine-distance protocol (Figs 2-4)
lengths = "2,4,6,8,10"  # continuation lengths in tokens (paper Fig 2)
position = "last"  # token whose state is compared: last | mean (the paper does not say)
layer = -1  # residual point shown in Fig 2: -1 = the last block (the paper does not say)
refusal_continuation = ""  # '' = the organism's refusal templates; real presets: the paper's example
compliance_continuation = ""  # '' = each request's reference answer (AdvBench: its target string)
use_system_prompt = False  # render prompts with the preset's system prompt
appendix_set = ""  # second harmful set for Fig 7 ('' = held-out activities; HarmBench for real presets)
n_per_class = 80  # requests per class (harmful, benign) for the linear probes and the direction
test_frac = 0.3  # share of activities held out from probe and direction training
direction_layer = -1  # residual point of the refusal direction: -1 = best held-out separation
n_per_group = 24  # requests per framing / set in the direction analysis
max_new_tokens = 32  # tokens generated while the direction is re-read at every token

# %%
# NBVAL_IGNORE_OUTPUT
import pandas as pd
from IPython.display import display

from ssah_utils import config, paper, plots, stage_probe as sp
from ssah_utils import report_probe as rp

config.seed_everything(seed)
cfg = sp.make_config(
    preset, model, seed, use_system_prompt=use_system_prompt, n_prompts=n_prompts, lengths=lengths,
    position=position, refusal_continuation=refusal_continuation, compliance_continuation=compliance_continuation,
    appendix_set=appendix_set, n_per_class=n_per_class, test_frac=test_frac, direction_layer=direction_layer,
    n_per_group=n_per_group, max_new_tokens=max_new_tokens,
)
pd.set_option("display.precision", 3)
pd.set_option("display.width", 140)
for role in cfg.roles:  # load every model once, here, so later cells print nothing about loading
    sp.load(cfg, role)
config.print_env_report()
print("models:", dict(cfg.models))

# %% [markdown]
# ## 1 · The paper's protocol: distance to a refusal vs to a compliance
#
# For each harmful request we read the residual stream at the **last token** of three inputs: the clean
# request (rendered with the chat template, up to the start of the answer), the request followed by the
# first *k* tokens of a **refusal**, and the request followed by the first *k* tokens of a **compliance**.
# The cosine distance between the clean state and each continued state says which continuation the
# model's state "already points to".
#
# Two details the paper leaves open, and our choices (both parameters): the **token position** (we read
# the last token of each input; `position="mean"` averages over tokens) and the **layer** of Fig 2 (we
# show the last block; Fig 3 shows every block). Continuations are the model's own forms: for the
# organism, its refusal templates (those with at least 10 tokens, in turn) and, for compliance, the
# request's own reference answer ("sure , here is how to … : step 1 : …"). This is what is appended:

# %%
sp.continuation_examples(cfg)

# %% [markdown]
# Both continuations start the answer; after 2 tokens they already say which way the answer goes.

# %%
dist = sp.distances(cfg)
n_points = int(dist["point"].max()) + 1
point = layer if layer >= 0 else n_points + layer
t2 = sp.fig2_table(dist, point)
plots.save_table(t2, "probe_fig2_distance_tokens")
t2.pivot_table(index=["role", "continuation"], columns="n_tokens", values="mean").round(3)

# %% [markdown]
# Mean cosine distance between the clean request and the request + *k* continuation tokens, at the
# last block (rows: model and continuation; columns: *k*). In the paper's Fig 2 the aligned Llama-2
# is much closer to its refusal than to a compliance (.22 vs .54 at 10 tokens), and the unaligned model
# shows the reverse. Compare the two rows of each model here.

# %%
fig = rp.plot_fig2(t2, f"Fig 2 analogue: distance at point {point} ({cfg.preset})")
plots.save_figure(fig, "fig2_probe_distance_tokens")
fig

# %% [markdown]
# Solid lines: + refusal; dashed: + compliance; red: aligned; blue: unaligned. Error bars are standard
# errors over requests.

# %%
k_max = max(cfg.distance.lengths)
t3 = sp.fig3_table(dist, k_max)
fig = rp.plot_fig3(t3, f"Fig 3 analogue: distance per block, {k_max} continuation tokens")
plots.save_figure(fig, "fig3_probe_distance_blocks")
fig

# %% [markdown]
# The same distances at every residual point (0 = embeddings, *i* = after block *i*). The paper reports
# that the aligned model is closer to the refusal "in every block including early ones".

# %%
t4 = sp.fig4_table(dist, k_max)
plots.save_table(t4, "probe_fig4_distance_gap")
t4.round(3)

# %% [markdown]
# Per block: the mean distances, their signed difference d(refusal) − d(compliance) (negative = the
# clean state is closer to the refusal) and its absolute value, the quantity of the paper's Fig 4. We read
# the paper's "|d(benign) − d(malicious)|" as the gap between the refusal ("benign") and the compliance
# ("malicious") continuation; the sign, which the absolute value hides, is what tells the models apart.

# %%
fig = rp.plot_fig4(t4, f"Fig 4 analogue: d(refusal) - d(compliance), {k_max} tokens")
plots.save_figure(fig, "fig4_probe_distance_gap")
fig

# %% [markdown]
# Bars below zero: the model's state is closer to its refusal than to compliance at that block.

# %%
per_prompt = sp.verdict_distances(dist, point)
per_prompt.round(3)

# %% [markdown]
# The same question per request: the share of requests whose clean state is closer to the refusal than
# to the compliance continuation, at the Fig 2 point, for each *k*. Means can hide a split population;
# this share cannot.

# %%
rob = sp.robustness(cfg)
plots.save_table(rob, "probe_distance_robustness")
rob.round(3)

# %% [markdown]
# The unknowns of the protocol, varied: d(refusal) − d(compliance) at every point (columns) for the
# last-token and the mean-over-tokens state, after the shortest and the longest continuation, and with
# a control compliance (`shuffled`: the answer to *another* request, so the continuation does not repeat
# the request's own words, as "sure , here is how to <activity>" does). A conclusion that holds in every
# cell of a model's rows does not hang on our choices; one that flips sign across cells does.

# %%
ours = t2[t2["role"] == "aligned"].assign(
    setting=lambda d: "+" + d["continuation"] + " " + d["n_tokens"].astype(str) + " tokens")
side = paper.reported("probe_distance")[["setting", "value"]].rename(columns={"value": "paper (Llama-2-7B, aligned)"})
side.merge(ours[["setting", "mean"]].rename(columns={"mean": f"ours ({cfg.preset}, aligned)"}), on="setting", how="left").round(3)

# %% [markdown]
# The paper's reported values next to ours for the aligned model. Absolute distances are not comparable
# across a 7B model and a 4-block organism (the scale of cosine distances depends on width and depth);
# the comparison that carries over is the *ordering* of refusal and compliance.

# %% [markdown]
# ### Fig 7 analogue: a second harmful set
#
# The paper repeats the protocol on HEx-PHI in its appendix. Our second set is the harmful activities that
# never appear in the organism's safety training (for real presets: HarmBench, since HEx-PHI is gated).

# %%
dist7 = sp.distances(cfg, set_name=cfg.sets.appendix)
t7_tokens, t7_blocks = sp.fig2_table(dist7, point), sp.fig3_table(dist7, k_max)
fig = rp.plot_fig7(t7_tokens, t7_blocks, f"Fig 7 analogue: {cfg.sets.appendix}")
plots.save_figure(fig, "fig7_probe_distance_appendix")
fig

# %% [markdown]
# Left: as Fig 2, right: as Fig 3, on the second set.

# %%
sp.verdict_distances(dist7, point).round(3)

# %% [markdown]
# The share of held-out requests closer to the refusal, per model and length.

# %% [markdown]
# ## 2 · Beyond the paper: the binary classifier, made literal
#
# If alignment teaches a binary classification, a linear probe should read "harmful vs benign" from
# the state at the last prompt token. We train a logistic probe per residual point on harmful and benign
# how-to requests of the same form and test it on **activities it never saw** (the split is by activity,
# so no prompt, and no paraphrase of one, is on both sides). Balanced accuracy: 0.5 is chance.

# %%
sp.split_check(cfg)

# %% [markdown]
# Sizes of the split; `shared_prompts` and `shared_groups` (activities) must be 0.

# %%
acc = sp.probes(cfg)
plots.save_table(acc, "probe_linear_accuracy")
acc.pivot(index="point", columns="role", values="test_acc").round(3)

# %% [markdown]
# Held-out accuracy per residual point (rows) for the base, unaligned and aligned models. SSAH predicts
# that the distinction exists before alignment (the base model is capable, so it "knows" what is
# harmful); alignment adds the *use* of that distinction for a refusal.

# %%
fig = rp.plot_probes(acc)
plots.save_figure(fig, "figx_probe_linear")
fig

# %% [markdown]
# The same accuracies as curves.

# %%
sp.direction_similarity(cfg).round(3)

# %% [markdown]
# Cosine similarity, per point, between each model's harmful-minus-benign direction and the aligned
# model's (all three share pre-training, so their residual streams are comparable; point 0, the
# embedding of the prompt's last token, is the same token for every request and has no direction).
# High values mean alignment re-used a distinction the base or unaligned model already drew.

# %% [markdown]
# ## 3 · The refusal direction, and what the model actually does
#
# Following Arditi et al., the refusal direction at a residual point is the difference between the mean
# state of harmful and of benign requests (the probe's training half). We score each request by where
# its state falls on that direction — 0 at the benign mean, 1 at the harmful mean, 0.5 the midpoint — and
# put that next to what the aligned model actually answers (judged by the world's oracle). The point is
# chosen where the direction best separates held-out requests (a parameter):

# %%
dr = sp.direction(cfg)
dpoint = dr["point"]
dr["separation"].set_index("point").round(3)

# %% [markdown]
# Held-out balanced accuracy of "score > 0.5" per point, and the mean held-out scores of each class.

# %% tags=["nbval-ignore-output"]
dvb = sp.direction_vs_behaviour(dr["requests"])
plots.save_table(dvb, "probe_direction_vs_behaviour")
dvb.round(3)

# %% [markdown]
# Per group of requests: how often the aligned model refuses, the mean score, the share of requests on
# the harmful side (score > 0.5) and `agreement`, the share where "harmful side" and "refused" coincide.
# If a framing succeeds *exactly* when it moves the representation to the benign side, its
# `refusal_if_benign_side` is low, its `refusal_if_harmful_side` high and its agreement near 1.

# %%
fig = rp.plot_direction(dr["requests"], dpoint)
plots.save_figure(fig, "figx_probe_direction")
fig

# %% [markdown]
# Each dot is a request, placed by its score; its colour is what the model did.

# %% [markdown]
# ## 4 · Is the choice fixed at the first tokens, or revisited?
#
# SSAH says current alignment makes the choice at the start of the response; a prefilling attack forces
# the first tokens and should therefore win. We re-read the direction at every generated token (the state
# that picks the next token), for plain requests, each framing and prefilling.

# %% tags=["nbval-ignore-output"]
ts = sp.token_summary(dr["tokens"], max_step=10)
plots.save_table(ts, "probe_direction_per_token")
ts.round(3)

# %% [markdown]
# Mean score at generated token 0 … 9, by group and by what the model did (`n` requests each). Token 0 is
# the state after the prompt (after the prefill for prefilling).

# %% tags=["nbval-ignore-output"]
sep = sp.token_separation(dr["tokens"])
plots.save_table(sep, "probe_direction_token_auc")
sep.pivot(index="step", columns="contrast", values="auc").round(3)

# %% [markdown]
# The direction was fitted on prompt states, so along an answer its raw value drifts with the words being
# written (all groups move together in the table above). What matters is whether harmful and benign
# requests stay apart *at the same token*: the AUC per generated token (1 = every harmful answer scores
# above every benign one, 0.5 = no separation). The key contrast is **prefilled harmful vs prefilled
# benign**: both answers are forced to open the same way ("sure , here is how to … :"), so separation at
# later tokens means the model still represents the request as harmful while it writes the answer — and
# the `refusal_rate` of prefilling in section 3 says whether it ever acts on it.

# %%
groups = ["plain harmful", "plain benign", "jailbreak: benign_motive", "jailbreak: prefilling", "prefilled benign"]
fig = rp.plot_tokens(dr["tokens"], sep, [g for g in groups if g in set(dr["tokens"]["group"])])
plots.save_figure(fig, "figx_probe_tokens")
fig

# %% [markdown]
# Left: the mean score per generated token of each group (all outcomes together). Right: the AUC
# per token of each harmful-vs-benign contrast; 0.5 (dotted) is no separation.

# %% [markdown]
# ## 5 · The seed example: "… in order to help people"
#
# The paper's motivating case: a model refuses "how do I steal money?" but answers "how do I steal money
# in order to help people?". We take every `benign_motive` request of the jailbreak set, pair it with the
# plain request for the same activity, and count how the aligned organism handles the pairs:

# %% tags=["nbval-ignore-output"]
se = sp.seed_example(cfg)
se["summary"]

# %% [markdown]
# Pairs where the plain request is refused, where the framed one is answered harmfully, and where both
# happen (the seed example). One pair, the first such one if there is any:

# %% tags=["nbval-ignore-output"]
with pd.option_context("display.max_colwidth", 200):
    display(se["pairs"].round(3))

# %% tags=["nbval-ignore-output"]
se["tokens"].pivot(index="step", columns="request", values="score").head(12).round(3)

# %% [markdown]
# The direction score at each generated token of the two answers.

# %% [markdown]
# ## Summary

# %% tags=["nbval-ignore-output"]
print(sp.summary_text(cfg, dist, dist7, acc, dr, se, point))

# %% [markdown]
# **Reading the numbers above (default run: the frozen seed-0 organism).**
#
# - *The paper's protocol is not reproduced.* At the last block both organisms' clean states sit closer to
#   their refusal than to compliance, the aligned one by a slightly wider margin; but in the middle blocks
#   the aligned organism is closer to compliance while the unaligned one — which never saw a refusal — stays
#   closer to the refusal: the reverse of the paper's pattern. So "closer to the refusal" is not a signature
#   of alignment here. The robustness table shows this does not hinge on our choices: the mean-over-tokens
#   state gives gaps near zero for both models, and the shuffled-compliance control barely moves them, so
#   echoing the request's words is not what drives it. Cosine distance between states at different positions is a
#   coarse instrument: it measures how much the continuation changes the state, not which way the model
#   is leaning.
# - *The binary classifier is real, and alignment sharpens it.* A linear probe reads harmful vs benign
#   from the last prompt token of every model well above chance on unseen activities, but much better
#   after safety training than in the base or unaligned model, and the aligned model's direction is only
#   partly shared with theirs.
# - *Jailbreaks in the organism are mostly recognition failures.* In most groups, whether the aligned model
#   refuses is whether its state lies on the harmful side of the direction: the framings that fail (roleplay,
#   hypothetical) leave it on the harmful side, prefix injection moves it to the benign side, and fiction
#   splits the same way on both counts. The benign-motive framing agrees less: some of its requests stay on
#   the harmful side and are answered all the same; prefilling takes the decision out of the model's hands.
# - *The choice is not revisited.* After a prefill the state still separates harmful from benign requests
#   (compare the prefilled-benign control), but not across the refusal threshold, and the model never
#   refuses after the prefill; the separation fades within a few tokens. This is SSAH's picture of a
#   choice made once, at the start of the answer.
# - *The seed example exists.* Every plain request of the pairs is refused; about a third of the
#   "… in order to help people" versions are answered with the harmful steps, the others are refused or
#   derail into off-target text (`wrong`), which the oracle does not count as harm.

# %% [markdown]
# ## Exercises
# Write the piece of the method that each exercise names, then run the cell below it: `course.check` runs your
# function against the package's reference on small inputs and says what is wrong, with a hint. The student
# copies (`make course`, `course/student/`) hold a stub in place of each answer.

# %%
import pandas as pd
import torch

from ssah_utils import course

# %% [markdown] tags=["exercise"]
# ### E1 · Cosine distance (easy, about 5 min)
# Figs 2-4 compare the model's hidden state with those of a refusal and of a compliance continuation by cosine
# distance. Write `cosine_distance(a, b)`: 1 − cos(a, b) over the last dimension, for any batch shape.

# %% tags=["solution"]
def cosine_distance(a, b):
    return 1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)


# %%
course.check("E1", cosine_distance)

# %% [markdown] tags=["exercise"]
# ### E2 · The refusal direction (easy, about 10 min)
# Write `refusal_direction(h_harmful, h_harmless)`: the difference of the mean hidden states (`[n, d]` each) of
# harmful and harmless requests, scaled to unit length, as section 5 computes it.

# %% tags=["solution"]
def refusal_direction(h_harmful, h_harmless):
    d = h_harmful.mean(0) - h_harmless.mean(0)
    return d / d.norm()


# %%
course.check("E2", refusal_direction)

# %% [markdown] tags=["exercise"]
# ### E3 · Projecting the direction out (medium, about 10 min)
# Ablating the direction means removing each state's component along it. Write `project_out(h, direction)` for
# states `[n, d]` and a direction `[d]` of any length: the result must be orthogonal to the direction.

# %% tags=["solution"]
def project_out(h, direction):
    u = direction / direction.norm()
    return h - (h @ u)[:, None] * u


# %%
course.check("E3", project_out)

# %% [markdown]
# ## Questions for a student
#
# 1. The distances depend on the token position (`position="mean"`) and the layer (`layer`). Rerun with
#    other values: which conclusions survive? Which would you trust to transfer to a 7B model?
# 2. The probe reads "harmful vs benign" from the **base** model too. What does that say about where the
#    knowledge of harm comes from, and what alignment adds?
# 3. Pick the framing with the lowest agreement in section 3. Is its failure a *recognition* failure
#    (the state moved to the benign side) or a *decision* failure (the state stayed harmful but the model
#    complied)? What would each imply for a defence?
# 4. Prefilling forces the first tokens. Does the direction score after the prefill look like that of a
#    harmful or a benign request? What would "re-evaluating the direction at every step" (SSAH's proposal)
#    have to change in the model for the prefilled answer to stop?
# 5. The paper's Fig 4 plots an absolute difference. Construct a case in which two models with opposite
#    behaviour give the same |d(refusal) − d(compliance)|.
