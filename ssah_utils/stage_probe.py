"""Stage 01_probe: the reasoning direction inside the model (paper Sec. 3; Figs 2, 3, 4, 7) and beyond.

One function per notebook step, each cached (`cache.cached`) under the part of the config it
depends on plus the model's revision, so a rerun is free and a change of one setting recomputes
only what depends on it:

- `distances`: the paper's protocol. Cosine distance between the residual state of a clean harmful
  query and that of the query followed by the first k tokens of a refusal or of a compliance,
  k = 2..10, at every residual point, for the aligned and the unaligned model (Figs 2, 3, 4; on a
  second harmful set, Fig 7).
- `probes`: a logistic probe per layer, harmful vs benign requests, held-out split by activity
  (base, unaligned, aligned).
- `direction`: Arditi et al.'s difference-in-means direction, scored on held-out plain requests,
  each jailbreak framing, held-out harmful activities and borderline benign requests, next to what
  the model actually does; the same pass records the direction at every generated token.
- `seed_example`: the paper's motivating case, a request refused plainly but answered when asked
  "... in order to help people", as the organism actually handles it.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from . import cache, datasets, probing
from . import config as _config
from .models import load_model, model_revision
from . import evaluation

STAGE = "probe"
ROLES = ("base", "unaligned", "aligned")


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sets:
    """Prompt sets of the stage (world sets for the organism, real datasets for real models)."""

    harmful: str = "harmful_test"  # the paper's AdvBench
    appendix: str = "harmful_heldout"  # the paper's appendix set (HEx-PHI, gated: HarmBench for real models)
    benign: str = "benign_howto_test"  # benign requests of the same form, for probes and the direction
    heldout_harmful: str = "harmful_heldout"  # harmful activities never seen in safety training
    borderline: str | None = "borderline_test"  # benign requests with harmful-sounding words (XSTest-like)
    jailbreak: str | None = "jailbreak_test"  # framings, prefilling included (none for real presets)


@dataclass(frozen=True)
class DistanceConfig:
    """The paper's cosine-distance protocol (Sec. 3, Figs 2-4, 7)."""

    n_prompts: int = 128  # harmful queries (a seeded sample; the paper uses AdvBench)
    lengths: tuple[int, ...] = (2, 4, 6, 8, 10)  # continuation tokens (paper Fig 2)
    position: str = "last"  # token whose state is compared: 'last' or 'mean' (paper: unknown)
    refusal: str = ""  # refusal continuation; '' = the world's refusal templates (the organism's own forms)
    compliance: str = ""  # compliance continuation; '' = each record's reference (world steps, AdvBench target)
    compliance_fallback: str = ""  # for records without a reference (the preset's paper example)
    shuffle_compliance: bool = False  # control: each query gets the next query's compliance (no echo of its words)
    batch_size: int = 32


@dataclass(frozen=True)
class ProbeConfig:
    """Linear probes and the difference-in-means direction: harmful vs benign at the last prompt token."""

    n_per_class: int = 80  # requests per class (harmful sampled down to the benign count)
    test_frac: float = 0.3  # share of groups (activities, or prompts without one) held out
    l2: float = 1e-2  # ridge on standardised features; small: the probe should find the direction, not fit noise
    batch_size: int = 32


@dataclass(frozen=True)
class DirectionConfig:
    """Where requests fall on the refusal direction, what the model does, and the direction per token."""

    layer: int = -1  # residual point of the direction; -1 = the block whose direction best separates held-out requests
    n_per_group: int = 24  # requests per framing / set evaluated
    max_new_tokens: int = 32  # generated tokens (direction re-read at each)
    batch_size: int = 32


@dataclass(frozen=True)
class ProbeStageConfig:
    """Everything that determines the results of 01_probe; parts of it key each step's cache."""

    preset: str
    models: tuple[tuple[str, str], ...]  # (role, spec) for base / unaligned / aligned that the preset has
    seed: int = 0
    dtype: str = "float32"
    device: str = "auto"
    system_prompt: str = ""  # '' = none (the paper's probing does not say; evaluation default is none)
    sets: Sets = Sets()
    distance: DistanceConfig = DistanceConfig()
    probe: ProbeConfig = ProbeConfig()
    direction: DirectionConfig = DirectionConfig()

    def spec(self, role: str) -> str | None:
        return dict(self.models).get(role)

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(r for r, _ in self.models)


def make_config(
    preset: str = "organism", model: str | None = None, seed: int = 0, *, use_system_prompt: bool = False,
    n_prompts: int = 128, lengths: tuple[int, ...] | str = (2, 4, 6, 8, 10), position: str = "last",
    refusal_continuation: str = "", compliance_continuation: str = "", appendix_set: str = "",
    n_per_class: int = 80, test_frac: float = 0.3, direction_layer: int = -1, n_per_group: int = 24,
    max_new_tokens: int = 32,
) -> ProbeStageConfig:
    """The stage config from the notebook's parameters and a preset (`config.get_preset`)."""
    c = _config
    p = c.get_preset(preset, model or None)
    c.check_model_spec(model or "")
    seed = c.check_seed(seed)
    if isinstance(lengths, str):
        try:
            lengths = tuple(int(x) for x in lengths.split(",") if x.strip())
        except ValueError as err:
            raise ValueError(f"lengths must be comma-separated token counts like '2,4,6,8,10', got {lengths!r}") from err
    if not lengths:
        raise ValueError("lengths needs at least one continuation length (tokens), e.g. '2,4,6,8,10'")
    for k in lengths:
        c.check_int("lengths (continuation tokens)", k, 1)
    if position not in ("last", "mean"):
        raise ValueError(f"position must be 'last' or 'mean', got {position!r}")
    c.check_bool("use_system_prompt", use_system_prompt)
    c.check_int("n_prompts", n_prompts, 1)
    c.check_int("n_per_class", n_per_class, 2)
    c.check_float("test_frac", test_frac, 0.0, 1.0, open_low=True, open_high=True)
    c.check_int("direction_layer (-1 = best held-out separation)", direction_layer, -1)
    c.check_int("n_per_group", n_per_group, 1)
    c.check_int("max_new_tokens", max_new_tokens, 1)
    for name, v in (("refusal_continuation", refusal_continuation), ("compliance_continuation", compliance_continuation),
                    ("appendix_set", appendix_set)):
        if not isinstance(v, str):
            raise TypeError(f"{name} must be a string ('' = the default), got {v!r}")
    if p.is_organism:
        sets = Sets(harmful=p.harmful_test, borderline=p.borderline_test, jailbreak=p.jailbreak_test)
    else:  # real models: AdvBench, HarmBench for the appendix (HEx-PHI is gated), Alpaca as benign
        sets = Sets(harmful=p.harmful_test, appendix="harmbench", benign=p.calib_utility, heldout_harmful="harmbench",
                    borderline=p.borderline_test, jailbreak=p.jailbreak_test)
    if appendix_set:
        sets = dataclasses.replace(sets, appendix=appendix_set)
    models = tuple((r, getattr(p, r)) for r in ROLES if getattr(p, r))
    if not refusal_continuation and not p.is_organism:
        refusal_continuation = p.refusal_continuation  # real models: the paper's example unless given
    c.activate_run(preset, model or "", seed)
    return ProbeStageConfig(
        preset=p.name, models=models, seed=int(seed), dtype=p.dtype, device=p.device,
        system_prompt=p.system_prompt if use_system_prompt else "", sets=sets,
        distance=DistanceConfig(n_prompts=int(n_prompts), lengths=tuple(sorted(int(k) for k in lengths)),
                                position=position, refusal=refusal_continuation, compliance=compliance_continuation,
                                compliance_fallback=p.compliance_continuation, batch_size=p.batch_size),
        probe=ProbeConfig(n_per_class=int(n_per_class), test_frac=float(test_frac), batch_size=p.batch_size),
        direction=DirectionConfig(layer=int(direction_layer), n_per_group=int(n_per_group),
                                  max_new_tokens=int(max_new_tokens), batch_size=p.batch_size),
    )


# Parameters of notebooks/01_probe.ipynb that are display choices, not part of the config.
NOTEBOOK_ONLY_PARAMS = ("layer",)  # the residual point shown in Fig 2


def config_from_params(params: dict) -> ProbeStageConfig:
    """The config that 01_probe builds from its parameters (its `parameters` cell, papermill's `-p`, or
    05_figures' `notebook_params`): the one mapping from notebook parameters to the stage config."""
    if "layer" in params:
        _config.check_int("layer (residual point of Fig 2; -1 = the last block)", params["layer"])
    kw = {k: v for k, v in params.items() if k not in NOTEBOOK_ONLY_PARAMS}
    valid = set(inspect.signature(make_config).parameters)
    if set(kw) - valid:
        raise ValueError(f"unknown 01_probe parameters {sorted(set(kw) - valid)}; valid: "
                         f"{sorted(valid | set(NOTEBOOK_ONLY_PARAMS))}")
    return make_config(**kw)

# --------------------------------------------------------------------------------------------------
# Models, prompts, continuations
# --------------------------------------------------------------------------------------------------

_LOADED: dict[tuple[str, str, str], tuple] = {}


def load(cfg: ProbeStageConfig, role: str):
    """(model, tokenizer) of a role, loaded once per process."""
    spec = cfg.spec(role)
    if spec is None:
        raise KeyError(f"preset {cfg.preset!r} has no {role} model (roles: {', '.join(cfg.roles)})")
    key = (spec, cfg.dtype, cfg.device)
    if key not in _LOADED:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no per-run progress bars in notebook outputs
        _LOADED[key] = load_model(spec, dtype=cfg.dtype, device=cfg.device)
    return _LOADED[key]


def style_of(tokenizer) -> str:
    """'chat' for a model with a chat template, 'raw' (the base-model format) otherwise."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "raw"


def _system(cfg: ProbeStageConfig, tok) -> str | None:
    return (cfg.system_prompt or None) if style_of(tok) == "chat" else None


@dataclass(frozen=True)
class _Key:
    part: object
    role: str
    spec: str
    dtype: str
    system_prompt: str
    sets: Sets
    seed: int
    extra: object = None


def _key(cfg: ProbeStageConfig, role: str, part: object, extra: object = None) -> _Key:
    return _Key(part=part, role=role, spec=cfg.spec(role) or "", dtype=cfg.dtype, system_prompt=cfg.system_prompt,
                sets=cfg.sets, seed=cfg.seed, extra=extra)


def _cached(name: str, key: _Key, compute, model) -> dict:
    # silent: whether a step was computed or read from the cache must not change the notebook's output
    return cache.cached(STAGE, key, compute, model_revision=f"{name}:{model_revision(model)}", verbose=False)


def refusal_templates() -> list[str]:
    """The world's refusal templates (`data/world/refusals.json`): the organism's own refusal forms."""
    path = _config.WORLD_DIR / "refusals.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the world is not written (run `make organism`)")
    return list(json.loads(path.read_text()))


def continuations(cfg: ProbeStageConfig, tok, records: list[dict]) -> dict[str, list[str]]:
    """One refusal and one compliance string per record (see `DistanceConfig`).

    Refusal: the configured string, else the world's refusal templates that have at least
    max(lengths) tokens, assigned in turn. Compliance: the configured string, else the record's
    `reference` (the world's steps; AdvBench's "Sure, here is ..." target), else the preset's
    paper example.
    """
    d = cfg.distance
    need = max(d.lengths)
    if d.refusal:
        refusals = [d.refusal] * len(records)
    else:
        long_enough = [t for t in refusal_templates() if len(probing.continuation_ids(tok, t)) >= need]
        if not long_enough:
            raise ValueError(f"no refusal template has {need} tokens; lower the continuation lengths")
        refusals = [long_enough[i % len(long_enough)] for i in range(len(records))]
    comply = [d.compliance or r.get("reference") or d.compliance_fallback for r in records]
    if d.shuffle_compliance:
        comply = comply[1:] + comply[:1]
    return {"refusal": refusals, "compliance": comply}


def _point(n_points: int, layer: int) -> int:
    """Residual point of a layer parameter: -1 = last block, i >= 0 = point i (0 = embeddings)."""
    p = layer if layer >= 0 else n_points + layer
    if not 0 <= p < n_points:
        raise ValueError(f"layer {layer} out of range for {n_points} residual points")
    return p


# --------------------------------------------------------------------------------------------------
# Step 1: the paper's cosine-distance protocol
# --------------------------------------------------------------------------------------------------

def distances(cfg: ProbeStageConfig, *, set_name: str | None = None, roles: tuple[str, ...] = ("aligned", "unaligned")) -> pd.DataFrame:
    """Per (role, prompt, continuation, n_tokens, point): the cosine distance to the clean query."""
    set_name = set_name or cfg.sets.harmful
    frames = []
    for role in roles:
        if cfg.spec(role) is None:
            continue
        model, tok = load(cfg, role)
        d = cfg.distance

        def compute(model=model, tok=tok, role=role) -> dict:
            recs = datasets.load_set(set_name, d.n_prompts, cfg.seed)
            conts = continuations(cfg, tok, recs)
            df = probing.continuation_distances(
                model, tok, [r["prompt"] for r in recs], conts, d.lengths, style=style_of(tok),
                system_prompt=_system(cfg, tok), position=d.position, batch_size=d.batch_size)
            return {"table": df, "examples": {k: v[0] for k, v in conts.items()}}

        res = _cached("distances", _key(cfg, role, d, set_name), compute, model)
        frames.append(res["table"].assign(role=role))
    if not frames:
        raise ValueError(f"preset {cfg.preset!r} has none of the roles {roles}")
    return pd.concat(frames, ignore_index=True)


def continuation_examples(cfg: ProbeStageConfig, role: str = "aligned", set_name: str | None = None) -> pd.DataFrame:
    """The first prompt's refusal and compliance continuations, cut at each length (what is probed)."""
    set_name = set_name or cfg.sets.harmful
    _, tok = load(cfg, role)
    recs = datasets.load_set(set_name, cfg.distance.n_prompts, cfg.seed)
    conts = continuations(cfg, tok, recs[:1])
    rows = []
    for name, texts in conts.items():
        ids = probing.continuation_ids(tok, texts[0])
        for k in cfg.distance.lengths:
            rows.append({"continuation": name, "n_tokens": k,
                         "text": tok.decode(ids[:k]) if len(ids) >= k else "(too short)"})
    df = pd.DataFrame(rows).pivot(index="n_tokens", columns="continuation", values="text")
    df.columns.name = f"prompt: {recs[0]['prompt']}"
    return df


def fig2_table(dist: pd.DataFrame, point: int) -> pd.DataFrame:
    """Mean distance (and its standard error) by role, continuation and length at one point (Fig 2)."""
    d = dist[dist["point"] == point]
    g = d.groupby(["role", "continuation", "n_tokens"])["distance"]
    out = pd.DataFrame({"mean": g.mean(), "sem": g.sem(), "n": g.size()}).reset_index()
    return out


def fig3_table(dist: pd.DataFrame, n_tokens: int) -> pd.DataFrame:
    """Mean distance per block by role and continuation, at one length (Fig 3)."""
    d = dist[dist["n_tokens"] == n_tokens]
    return d.groupby(["role", "point", "continuation"])["distance"].mean().unstack("continuation").reset_index()


def fig4_table(dist: pd.DataFrame, n_tokens: int) -> pd.DataFrame:
    """|d(refusal) - d(compliance)| per block by role (Fig 4), and which continuation is closer."""
    frames = []
    for role, g in dist.groupby("role", sort=False):
        gap = probing.distance_gap(g, n_tokens).reset_index()
        frames.append(gap.assign(role=role))
    out = pd.concat(frames, ignore_index=True)
    out["refusal_minus_compliance"] = out["refusal"] - out["compliance"]
    out.columns.name = None
    return out[["role", "point", "refusal", "compliance", "refusal_minus_compliance", "abs_gap", "closer_to"]]


def verdict_distances(dist: pd.DataFrame, point: int) -> pd.DataFrame:
    """Per role and length: the share of prompts whose state is closer to the refusal than to the
    compliance continuation at `point`, and the mean difference d(refusal) - d(compliance)."""
    d = dist[dist["point"] == point].pivot_table(index=["role", "n_tokens", "prompt_idx"], columns="continuation",
                                                values="distance").dropna().reset_index()
    d["diff"] = d["refusal"] - d["compliance"]
    g = d.groupby(["role", "n_tokens"])
    return pd.DataFrame({"share_closer_to_refusal": g["diff"].apply(lambda x: float((x < 0).mean())),
                         "mean_refusal_minus_compliance": g["diff"].mean(), "n_prompts": g.size()}).reset_index()


def robustness(cfg: ProbeStageConfig, positions: tuple[str, ...] = ("last", "mean")) -> pd.DataFrame:
    """d(refusal) - d(compliance) at every point, for each token position and the shortest and longest
    continuation, and with a control compliance (another query's answer, so it does not repeat the
    query's words): does the conclusion depend on the choices the paper leaves open?"""
    rows = []
    ks = (min(cfg.distance.lengths), max(cfg.distance.lengths))
    variants = [(pos, "own") for pos in positions] + [(positions[0], "shuffled")]
    for pos, comp in variants:
        c = dataclasses.replace(cfg, distance=dataclasses.replace(cfg.distance, position=pos,
                                                                  shuffle_compliance=comp == "shuffled"))
        d = distances(c)
        for role, g in d.groupby("role", sort=False):
            for k in ks:
                gap = probing.distance_gap(g, k)
                rows += [{"role": role, "position": pos, "compliance": comp, "n_tokens": k, "point": int(p),
                          "refusal_minus_compliance": float(gap.loc[p, "refusal"] - gap.loc[p, "compliance"])}
                         for p in gap.index]
    df = pd.DataFrame(rows)
    out = df.pivot_table(index=["role", "position", "compliance", "n_tokens"], columns="point",
                         values="refusal_minus_compliance", sort=False)
    out.columns.name = "point"
    return out


# --------------------------------------------------------------------------------------------------
# Step 2: activations, linear probes
# --------------------------------------------------------------------------------------------------

def _group(r: dict) -> str:
    return str(r.get("activity") or r["prompt"])


def probe_records(cfg: ProbeStageConfig) -> tuple[list[dict], torch.Tensor, list[int], list[int]]:
    """Harmful and benign records (labels 1/0) and the held-out split by activity, shared by all models."""
    p = cfg.probe
    benign = datasets.load_set(cfg.sets.benign, p.n_per_class, cfg.seed)
    harmful = datasets.load_set(cfg.sets.harmful, min(p.n_per_class, len(benign)), cfg.seed)
    recs = harmful + benign
    y = torch.tensor([1.0] * len(harmful) + [0.0] * len(benign))
    train, test = probing.group_split([_group(r) for r in recs], p.test_frac, cfg.seed)
    return recs, y, train, test


def activations(cfg: ProbeStageConfig, role: str) -> torch.Tensor:
    """`[n, n_points, d]` last-prompt-token states of `probe_records` for one model."""
    model, tok = load(cfg, role)
    p = cfg.probe

    def compute() -> dict:
        recs, *_ = probe_records(cfg)
        rows = probing.prompt_token_ids(tok, [r["prompt"] for r in recs], style=style_of(tok),
                                        system_prompt=_system(cfg, tok))
        return {"H": probing.capture_residual(model, rows, position="last", batch_size=p.batch_size,
                                              pad_id=tok.pad_token_id)}

    return _cached("activations", _key(cfg, role, p), compute, model)["H"]


def probes(cfg: ProbeStageConfig) -> pd.DataFrame:
    """Per role and residual point: held-out and training balanced accuracy of a logistic probe."""
    recs, y, train, test = probe_records(cfg)
    groups = [_group(r) for r in recs]
    frames = []
    for role in cfg.roles:
        model, _ = load(cfg, role)

        def compute(role=role) -> dict:
            H = activations(cfg, role)
            return {"table": probing.probe_layers(H, y, groups, test_frac=cfg.probe.test_frac, seed=cfg.seed,
                                                  l2=cfg.probe.l2)}

        frames.append(_cached("probes", _key(cfg, role, cfg.probe), compute, model)["table"].assign(role=role))
    return pd.concat(frames, ignore_index=True)


def direction_similarity(cfg: ProbeStageConfig, reference: str = "aligned") -> pd.DataFrame:
    """Per point: cosine similarity between each model's harmful-minus-benign direction (training half)
    and the reference model's. The models share pre-training, so their residual bases are comparable:
    a high similarity means alignment re-used a distinction the earlier model already drew."""
    recs, y, train, _ = probe_records(cfg)
    tr_h = [i for i in train if y[i] == 1]
    tr_b = [i for i in train if y[i] == 0]
    dirs = {}
    for role in cfg.roles:
        H = activations(cfg, role)
        dirs[role] = probing.refusal_directions(H[tr_h], H[tr_b])["direction"]  # [P, d]
    ref = dirs[reference]
    out = pd.DataFrame({"point": range(ref.shape[0])})
    for role, d in dirs.items():
        if role != reference:
            out[f"cos({role}, {reference})"] = (1 - probing.cosine_distance(d, ref)).numpy()
    return out.set_index("point")


def split_check(cfg: ProbeStageConfig) -> pd.DataFrame:
    """Sizes of the probe split and how many prompts / activities the two halves share (must be 0)."""
    recs, y, train, test = probe_records(cfg)
    tr_p, te_p = {recs[i]["prompt"] for i in train}, {recs[i]["prompt"] for i in test}
    tr_g, te_g = {_group(recs[i]) for i in train}, {_group(recs[i]) for i in test}
    return pd.DataFrame([{
        "train": len(train), "test": len(test), "harmful_train": int(y[train].sum()), "harmful_test": int(y[test].sum()),
        "shared_prompts": len(tr_p & te_p), "shared_groups": len(tr_g & te_g),
    }])


# --------------------------------------------------------------------------------------------------
# Step 3: the refusal direction, behaviour, and the direction at every generated token
# --------------------------------------------------------------------------------------------------

def _judge(record: dict, response: str) -> str:
    """The same verdict as `evaluation.evaluate_behaviour`: the world's oracle, or refusal keywords."""

    return evaluation.judge_record(record, response)


def direction_fit(cfg: ProbeStageConfig, role: str = "aligned") -> dict:
    """The direction from the probe's training half, its held-out separation per point and the chosen point."""
    recs, y, train, test = probe_records(cfg)
    H = activations(cfg, role)
    tr_h = [i for i in train if y[i] == 1]
    tr_b = [i for i in train if y[i] == 0]
    dirs = probing.refusal_directions(H[tr_h], H[tr_b])
    s = probing.direction_scores(H[test], dirs)  # [n_test, P]
    yt = y[test]
    sep = pd.DataFrame({"point": range(H.shape[1]),
                        "test_acc": [probing.balanced_accuracy(yt, (s[:, p] > 0.5).long()) for p in range(H.shape[1])],
                        "harmful_mean": [float(s[yt == 1, p].mean()) for p in range(H.shape[1])],
                        "benign_mean": [float(s[yt == 0, p].mean()) for p in range(H.shape[1])]})
    if cfg.direction.layer == -1:
        blocks = sep[sep["point"] > 0]
        best = blocks["test_acc"].max()
        point = int(blocks[blocks["test_acc"] >= best - 1e-9]["point"].max())  # ties: the deepest block
    else:
        point = _point(H.shape[1], cfg.direction.layer)
    return {"dirs": dirs, "separation": sep, "point": point}


def eval_records(cfg: ProbeStageConfig) -> list[dict]:
    """The requests whose direction and behaviour are compared, each with a `group` label.

    Plain harmful and benign requests of the probe's held-out half, held-out harmful activities,
    borderline benign requests and every jailbreak framing (prefilling: the state after the prefill).
    """
    n = cfg.direction.n_per_group
    recs, y, _, test = probe_records(cfg)
    out = []
    harm = [recs[i] for i in test if y[i] == 1][:n]
    ben = [recs[i] for i in test if y[i] == 0][:n]
    out += [dict(r, group="plain harmful") for r in harm]
    out += [dict(r, group="plain benign") for r in ben]
    jb_all = datasets.load_set(cfg.sets.jailbreak) if cfg.sets.jailbreak else []
    if any(r.get("prefill") for r in jb_all):
        # the control of the prefilling attack: benign requests forced to start the same way
        out += [dict(r, group="prefilled benign", prefill=_opening(r["reference"])) for r in ben if r.get("reference")]
    out += [dict(r, group="held-out harmful activity") for r in datasets.load_set(cfg.sets.heldout_harmful, n, cfg.seed)]
    if cfg.sets.borderline:
        out += [dict(r, group="borderline benign") for r in datasets.load_set(cfg.sets.borderline, n, cfg.seed)]
    if jb_all:
        jb = jb_all
        for f in dict.fromkeys(r["framing"] for r in jb):
            fr = [r for r in jb if r["framing"] == f]
            pick = np.random.default_rng(cfg.seed).permutation(len(fr))[:n]
            out += [dict(fr[i], group=f"jailbreak: {f}") for i in sorted(pick)]
    return out


def _opening(reference: str) -> str:
    """The compliant opening of a reference answer: up to its first ':' ("sure , here is how to X :",
    the world's prefill form), else its first 8 words."""
    head, sep, _ = reference.partition(":")
    return (head + sep).strip() if sep else " ".join(reference.split()[:8])


def direction(cfg: ProbeStageConfig, role: str = "aligned") -> dict:
    """Direction score at the decision point and at every generated token, with the model's verdict.

    Returns `requests` (one row per request: group, prompt, prefill, response, verdict, refused,
    `score0` = the score of the state that chooses the first answer token, `score_points` per
    point), `tokens` (one row per request and generated token: step, token, score), the chosen
    `point` and the held-out `separation` per point.
    """
    model, tok = load(cfg, role)
    dc = cfg.direction

    def compute() -> dict:
        fit = direction_fit(cfg, role)
        recs = eval_records(cfg)
        style, system = style_of(tok), _system(cfg, tok)
        prefills = [r.get("prefill") or None for r in recs]
        rows = probing.prompt_token_ids(tok, [r["prompt"] for r in recs], style=style, system_prompt=system,
                                        prefill=prefills)
        H = probing.capture_residual(model, rows, batch_size=dc.batch_size, pad_id=tok.pad_token_id)
        S = probing.direction_scores(H, fit["dirs"])  # [n, P]
        gen = probing.generate_with_residual(model, tok, [r["prompt"] for r in recs], point=fit["point"], style=style,
                                             system_prompt=system, prefill=prefills,
                                             max_new_tokens=dc.max_new_tokens, batch_size=dc.batch_size)
        req, tokrows = [], []
        for i, (r, g) in enumerate(zip(recs, gen)):
            verdict = _judge(r, g["text"])
            ts = probing.direction_scores(g["states"], fit["dirs"], point=fit["point"])
            req.append({"id": r["id"], "group": r["group"], "kind": r["kind"], "framing": r.get("framing", "none"),
                        "activity": r.get("activity", ""), "prompt": r["prompt"], "prefill": r.get("prefill") or "",
                        "response": g["text"], "verdict": verdict, "refused": verdict == "refusal",
                        "score0": float(S[i, fit["point"]]), "score0_gen": float(ts[0]),
                        "score_points": S[i].tolist()})
            for t, sc in enumerate(ts.tolist()):
                tokrows.append({"id": r["id"], "group": r["group"], "verdict": verdict, "step": t, "score": sc,
                                "token": tok.decode([g["tokens"][t]]) if t < len(g["tokens"]) else "<eos>"})
        return {"requests": pd.DataFrame(req), "tokens": pd.DataFrame(tokrows), "point": fit["point"],
                "separation": fit["separation"], "direction": fit["dirs"]["direction"]}

    return _cached("direction", _key(cfg, role, (cfg.probe, dc)), compute, model)


def direction_vs_behaviour(req: pd.DataFrame) -> pd.DataFrame:
    """Per group: refusal rate, mean score, share on the harmful side (score > 0.5) and how well
    "harmful side" predicts "refused" (agreement; refusal rate on each side)."""
    rows = []
    for g, d in req.groupby("group", sort=False):
        side = d["score0"] > 0.5
        rows.append({"group": g, "n": len(d), "refusal_rate": d["refused"].mean(),
                     "harmful_rate": d["verdict"].eq("harmful").mean(), "mean_score": d["score0"].mean(),
                     "harmful_side": side.mean(), "agreement": (side == d["refused"]).mean(),
                     "refusal_if_harmful_side": d.loc[side, "refused"].mean() if side.any() else np.nan,
                     "refusal_if_benign_side": d.loc[~side, "refused"].mean() if (~side).any() else np.nan})
    return pd.DataFrame(rows).set_index("group")


def token_summary(tokens: pd.DataFrame, max_step: int = 12) -> pd.DataFrame:
    """Mean direction score per generated-token index, by group and verdict (first `max_step` steps)."""
    t = tokens[tokens["step"] < max_step]
    out = t.groupby(["group", "verdict", "step"])["score"].mean().unstack("step")
    out.insert(0, "n", t[t["step"] == 0].groupby(["group", "verdict"]).size())
    return out


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a random `pos` score > a random `neg` score) (+ half the ties): 0.5 = no separation."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    if not len(pos) or not len(neg):
        return float("nan")
    return float(((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()))


TOKEN_CONTRASTS = (
    ("jailbreak: prefilling", "prefilled benign"),  # same opening text; only the request differs
    ("plain harmful", "plain benign"),  # refusal text vs answer text
    ("jailbreak: benign_motive", "plain benign"),
    ("held-out harmful activity", "plain benign"),
)


def token_separation(tokens: pd.DataFrame, max_step: int = 16,
                     contrasts: tuple[tuple[str, str], ...] = TOKEN_CONTRASTS) -> pd.DataFrame:
    """AUC of the direction score, harmful group vs benign group, at each generated token.

    The direction was fitted on prompt states, so along an answer its raw value drifts with the words
    being written; an AUC per step compares the two groups at the same step and is immune to that
    drift. The key contrast is prefilled harmful vs prefilled benign requests: both answers are forced
    to open the same way, so a high AUC at later tokens means the model still represents the request
    as harmful while it writes the answer.
    """
    rows = []
    have = set(tokens["group"])
    for a, b in contrasts:
        if a not in have or b not in have:
            continue
        for t in range(max_step):
            x = tokens[(tokens["group"] == a) & (tokens["step"] == t)]["score"].to_numpy()
            y = tokens[(tokens["group"] == b) & (tokens["step"] == t)]["score"].to_numpy()
            rows.append({"contrast": f"{a} vs {b}", "step": t, "auc": auc(x, y), "n": min(len(x), len(y))})
    if not rows:
        return pd.DataFrame(columns=["contrast", "step", "auc", "n"])
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# Step 4: the seed example ("... in order to help people")
# --------------------------------------------------------------------------------------------------

def seed_example(cfg: ProbeStageConfig, role: str = "aligned", framing: str = "benign_motive") -> dict:
    """The same activity asked plainly and with `framing`: responses, verdicts and direction per token.

    Looks through the jailbreak set's `framing` requests for one whose plain version (same activity,
    from the harmful set) the model refuses while it answers the framed one; reports the first such
    pair, or, when there is none, the first pair and says so (`found`).
    """
    model, tok = load(cfg, role)

    def compute() -> dict:
        fit = direction_fit(cfg, role)
        pairs: list[tuple[dict, dict]] = []
        if cfg.sets.jailbreak:
            framed = [r for r in datasets.load_set(cfg.sets.jailbreak) if r["framing"] == framing]
            plain_by_act: dict[str, dict] = {}
            for name in (cfg.sets.harmful, cfg.sets.heldout_harmful):
                for r in datasets.load_set(name):
                    plain_by_act.setdefault(r.get("activity", ""), r)
            pairs = [(plain_by_act[r["activity"]], r) for r in framed if r.get("activity") in plain_by_act]
        if not pairs:  # real sets (records without activities): the paper's own wording appended to each request
            plain = datasets.load_set(cfg.sets.harmful, cfg.direction.n_per_group, cfg.seed)
            pairs = [(r, dict(r, prompt=r["prompt"].rstrip(" .?!") + " in order to help people.", framing=framing))
                     for r in plain]
        style, system = style_of(tok), _system(cfg, tok)
        flat = [x for pr in pairs for x in pr]
        gen = probing.generate_with_residual(model, tok, [r["prompt"] for r in flat], point=fit["point"], style=style,
                                             system_prompt=system, max_new_tokens=cfg.direction.max_new_tokens,
                                             batch_size=cfg.direction.batch_size)
        verdicts = [_judge(r, g["text"]) for r, g in zip(flat, gen)]
        n_found = sum(verdicts[2 * i] == "refusal" and verdicts[2 * i + 1] == "harmful" for i in range(len(pairs)))
        pick = next((i for i in range(len(pairs)) if verdicts[2 * i] == "refusal" and verdicts[2 * i + 1] == "harmful"), 0)
        rows, toks = [], []
        for j, label in ((2 * pick, "plain"), (2 * pick + 1, framing)):
            r, g = flat[j], gen[j]
            ts = probing.direction_scores(g["states"], fit["dirs"], point=fit["point"]).tolist()
            rows.append({"request": label, "prompt": r["prompt"], "response": g["text"], "verdict": verdicts[j],
                         "score_token0": ts[0]})
            for t, sc in enumerate(ts):
                toks.append({"request": label, "step": t, "score": sc,
                             "token": tok.decode([g["tokens"][t]]) if t < len(g["tokens"]) else "<eos>"})
        summary = pd.DataFrame({
            "plain_refused": [sum(verdicts[2 * i] == "refusal" for i in range(len(pairs)))],
            "framed_answered_harmfully": [sum(verdicts[2 * i + 1] == "harmful" for i in range(len(pairs)))],
            "refused_plain_but_answered_framed": [n_found], "pairs": [len(pairs)]})
        return {"pairs": pd.DataFrame(rows), "tokens": pd.DataFrame(toks), "found": bool(n_found), "n_pairs": len(pairs),
                "summary": summary}

    return _cached("seed_example", _key(cfg, role, (cfg.probe, cfg.direction), framing), compute, model)


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# Summary in numbers
# --------------------------------------------------------------------------------------------------

def paper_pattern(dist: pd.DataFrame, point: int) -> pd.DataFrame:
    """Per role: mean d(refusal) and d(compliance) at the longest continuation and `point`, which
    is closer, and in how many blocks (points >= 1) the state is closer to the refusal."""
    k = int(dist["n_tokens"].max())
    rows = []
    for role, g in dist.groupby("role", sort=False):
        gap = probing.distance_gap(g, k)
        blocks = gap[gap.index >= 1]
        rows.append({"role": role, "n_tokens": k, "d_refusal": gap.loc[point, "refusal"],
                     "d_compliance": gap.loc[point, "compliance"], "closer_to": gap.loc[point, "closer_to"],
                     "blocks_closer_to_refusal": int((blocks["closer_to"] == "refusal").sum()), "blocks": len(blocks)})
    return pd.DataFrame(rows).set_index("role")


def summary_text(cfg: ProbeStageConfig, dist: pd.DataFrame, dist7: pd.DataFrame, acc: pd.DataFrame, dr: dict,
                 se: dict, point: int) -> str:
    """The notebook's conclusions in numbers, computed from the step results (nothing typed by hand)."""
    out = []
    for name, d in ((cfg.sets.harmful, dist), (cfg.sets.appendix, dist7)):
        pp = paper_pattern(d, point)
        parts = [f"{r}: d(refusal) {row.d_refusal:.3f} vs d(compliance) {row.d_compliance:.3f} -> closer to "
                 f"{row.closer_to}, in {row.blocks_closer_to_refusal}/{row.blocks} blocks closer to refusal"
                 for r, row in pp.iterrows()]
        if "aligned" in pp.index and "unaligned" in pp.index:
            al, un = pp.loc["aligned", "closer_to"] == "refusal", pp.loc["unaligned", "closer_to"] == "compliance"
            verdict = ("REPRODUCED." if al and un else
                       "half reproduced: the aligned model is closer to refusal, but so is the unaligned one." if al else
                       "half reproduced: the unaligned model is closer to compliance, but so is the aligned one." if un else
                       "NOT reproduced: the aligned model is closer to compliance.")
        else:
            verdict = "only half can be checked (no unaligned model in this preset): the aligned model is closer to " + \
                str(pp.loc["aligned", "closer_to"]) + "." if "aligned" in pp.index else "cannot be checked."
        out.append(f"[{name}, point {point}, {int(pp['n_tokens'].iloc[0])} tokens] " + "; ".join(parts)
                   + ". The paper's pattern (aligned closer to refusal, unaligned to compliance): " + verdict)
    best = acc.loc[acc.groupby("role")["test_acc"].idxmax()]
    out.append("Linear probe, best held-out balanced accuracy: " + "; ".join(
        f"{r.role} {r.test_acc:.3f} at point {r.point}" for r in best.itertuples()) + " (chance 0.5).")
    dvb = direction_vs_behaviour(dr["requests"])
    out.append(f"Refusal direction at point {dr['point']}: " + "; ".join(
        f"{g}: refused {row.refusal_rate:.2f}, harmful side {row.harmful_side:.2f}, agreement {row.agreement:.2f}"
        for g, row in dvb.iterrows()) + ".")
    req = dr["requests"]
    jb = req[req["group"].str.startswith("jailbreak")]
    if len(jb):
        side = jb["score0"] > 0.5
        out.append(f"Over all jailbreak requests: refused {jb['refused'].mean():.2f}; refusal rate on the harmful side "
                   f"{jb.loc[side, 'refused'].mean() if side.any() else float('nan'):.2f}, on the benign side "
                   f"{jb.loc[~side, 'refused'].mean() if (~side).any() else float('nan'):.2f}.")
    sep = token_separation(dr["tokens"])
    if len(sep):
        w = sep.pivot(index="contrast", columns="step", values="auc")
        out.append("Direction AUC (harmful vs benign group) at generated tokens 0 / 1 / 5 / 10 / 15: " + "; ".join(
            f"{c}: " + " / ".join(f"{w.loc[c, t]:.2f}" if t in w.columns else "-" for t in (0, 1, 5, 10, 15))
            for c in w.index) + ".")
    if se.get("n_pairs"):
        s = se["summary"].iloc[0]
        out.append(f"Seed example ('in order to help people'): of {s.pairs} pairs, plain refused {s.plain_refused}, "
                   f"framed answered harmfully {s.framed_answered_harmfully}, both {s.refused_plain_but_answered_framed}.")
    return "\n\n".join(out)
