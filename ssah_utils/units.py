"""Scoring, standardising and labelling units (ESU / EUU / CU / RU), and label transfer matrices.

Every scorer works at the granularity of `models.py`'s units (an MLP channel, an attention head) and
counts **response tokens only**: calibration pairs come from `generation.encode_pairs`, whose
`response_mask` is 1 exactly on the answer (eos included), so prompt and padding never enter a
statistic.

- **WIFV** (the paper's score, from the authors' FLAP-style code): for the output projection B of a
  block (o_proj, down_proj), score of input channel j = Var_t[x_j] · ‖B[:, j]‖²; a head's score is
  the mean over its head dimensions. One forward pass per batch, streaming float64 statistics
  (`RunningStats`, Chan et al.'s parallel mean/variance update), no stored activations.
- **Wanda** (Sun et al. 2023, as used by Wei et al. 2024): |W_ij| · ‖X_j‖₂ per weight, summed over
  the weights of a unit.
- **SNIP** (Lee et al. 2019, as used by Wei et al. 2024): |W_ij · ∂L/∂W_ij| per weight with L the
  summed next-token NLL of the response tokens, summed over the weights of a unit.

Weights of a unit: an MLP channel owns row i of gate_proj and up_proj and column i of down_proj; a
head owns its q_proj rows, its o_proj columns and 1/group_size of its group's k_proj/v_proj rows
(the shares of a group add up to the group's rows).

Scores are flat float64 vectors in `models.unit_order` (all MLP channels layer by layer, then all
heads layer by layer).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from .models import FamilyAdapter, UnitMask, UnitShape, adapter_for, unit_params
from .models import unit_order

SCORERS = ("wifv", "wanda", "snip")
LABELS = ("ESU", "EUU", "CU", "RU")
# The authors' thresholds (paper Sec. 4 / their code): RU = lowest 10% of I_S + I_U, ESU = highest
# 1% of I_S - I_U, EUU = lowest 10% of I_S - I_U, fractions weighted by parameter count.
DEFAULT_H = (0.10, 0.01, 0.10)

# Inputs whose statistics each scorer needs: the projection whose *input* is recorded.
_OUT_INPUTS = ("o_proj", "down_proj")
_ALL_INPUTS = ("q_proj", "o_proj", "gate_proj", "down_proj")  # q/k/v share an input, as do gate/up


# --------------------------------------------------------------------------------------------------
# Streaming statistics
# --------------------------------------------------------------------------------------------------

@dataclass
class RunningStats:
    """Count, mean and sum of squared deviations (M2) of a stream of `[n, d]` rows, in float64.

    `update` merges a batch with Chan et al.'s parallel formula, so memory is O(d) whatever the number
    of tokens and the result equals the two-pass statistics of all rows up to rounding.
    """

    dim: int
    count: int = 0
    mean: torch.Tensor = field(default=None)  # [d] float64
    m2: torch.Tensor = field(default=None)  # [d] float64

    def __post_init__(self) -> None:
        if self.mean is None:
            self.mean = torch.zeros(self.dim, dtype=torch.float64)
        if self.m2 is None:
            self.m2 = torch.zeros(self.dim, dtype=torch.float64)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add rows `x` `[n, d]` (any float dtype; converted to float64 on its device)."""
        n_b = int(x.shape[0])
        if n_b == 0:
            return
        x = x.to(torch.float64)
        if self.mean.device != x.device:
            self.mean, self.m2 = self.mean.to(x.device), self.m2.to(x.device)
        var_b, mean_b = torch.var_mean(x, dim=0, correction=0)
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean += delta * (n_b / n)
        self.m2 += var_b * n_b + delta.square() * (n_a * n_b / n)
        self.count = n

    def merge(self, other: "RunningStats") -> "RunningStats":
        """The statistics of both streams together (a new object)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge stats of dims {self.dim} and {other.dim}")
        out = RunningStats(self.dim, self.count, self.mean.clone().cpu(), self.m2.clone().cpu())
        if other.count == 0:
            return out
        n_a, n_b = out.count, other.count
        n = n_a + n_b
        delta = other.mean.cpu() - out.mean
        out.mean += delta * (n_b / n)
        out.m2 += other.m2.cpu() + delta.square() * (n_a * n_b / n)
        out.count = n
        return out

    @property
    def var(self) -> torch.Tensor:
        """Population variance (ddof 0; a constant factor per layer that z-scoring removes)."""
        if self.count == 0:
            raise ValueError("no rows were recorded (empty response mask?)")
        return self.m2 / self.count

    @property
    def sumsq(self) -> torch.Tensor:
        """Σ_t x_t² = M2 + n·mean², for Wanda's ‖X_j‖₂²."""
        return self.m2 + self.count * self.mean.square()

    def cpu(self) -> "RunningStats":
        return RunningStats(self.dim, self.count, self.mean.cpu(), self.m2.cpu())


@dataclass
class ActivationStats:
    """Running statistics of the inputs of chosen projections, per layer: `stats[(proj, layer)]`."""

    stats: dict[tuple[str, int], RunningStats]
    n_tokens: int = 0

    def __getitem__(self, key: tuple[str, int]) -> RunningStats:
        if key not in self.stats:
            have = sorted({p for p, _ in self.stats})
            raise KeyError(f"no statistics for {key}; recorded projections: {have}")
        return self.stats[key]

    def mean(self, proj: str, layer: int) -> torch.Tensor:
        return self[(proj, layer)].mean

    def merge(self, other: "ActivationStats") -> "ActivationStats":
        if set(self.stats) != set(other.stats):
            raise ValueError("cannot merge statistics of different projections")
        return ActivationStats({k: v.merge(other.stats[k]) for k, v in self.stats.items()}, self.n_tokens + other.n_tokens)

    def cpu(self) -> "ActivationStats":
        return ActivationStats({k: v.cpu() for k, v in self.stats.items()}, self.n_tokens)


@contextmanager
def _input_hooks(adapter: FamilyAdapter, projs: tuple[str, ...], callback) -> Iterator[None]:
    """Forward pre-hooks calling `callback(proj, layer, x)` with each projection's input; always removed."""
    handles = []
    try:
        for layer in range(adapter.n_layers):
            for proj in projs:
                def hook(_mod, args, _p=proj, _l=layer):
                    callback(_p, _l, args[0])
                handles.append(adapter.proj(layer, proj).register_forward_pre_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def _batches(enc: dict[str, torch.Tensor], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    n = enc["input_ids"].shape[0]
    for s in range(0, n, batch_size):
        b = {k: v[s : s + batch_size] for k, v in enc.items()}
        # Trim trailing all-padding columns so a batch costs what its longest row costs.
        width = int(b["attention_mask"].sum(1).max())
        yield {k: v[:, :width] for k, v in b.items()}


def _check_enc(enc: dict[str, torch.Tensor]) -> None:
    for k in ("input_ids", "attention_mask", "response_mask"):
        if k not in enc:
            raise KeyError(f"calibration encoding lacks {k!r}: build it with generation.encode_pairs")
    if not bool((enc["response_mask"].bool() <= enc["attention_mask"].bool()).all()):
        raise ValueError("response_mask marks padding tokens")
    if int(enc["response_mask"].sum()) == 0:
        raise ValueError("response_mask is empty: no response token to score on")


@torch.no_grad()
def activation_stats(model: nn.Module, enc: dict[str, torch.Tensor], *, batch_size: int = 16,
                     projs: tuple[str, ...] = _OUT_INPUTS) -> ActivationStats:
    """Streaming float64 mean/variance of the inputs of `projs` over response tokens.

    One forward pass of the decoder stack (no lm_head, no KV cache) per batch; each hook keeps only
    the response-token rows of its input and folds them into a `RunningStats`.
    """
    _check_enc(enc)
    adapter = adapter_for(model)
    device = next(model.parameters()).device
    stats: dict[tuple[str, int], RunningStats] = {}
    for layer in range(adapter.n_layers):
        for p in projs:
            stats[(p, layer)] = RunningStats(adapter.proj(layer, p).in_features)
    state: dict[str, torch.Tensor] = {}

    def record(proj: str, layer: int, x: torch.Tensor) -> None:
        stats[(proj, layer)].update(x.reshape(-1, x.shape[-1]).index_select(0, state["idx"]))

    n_tokens = 0
    was_training = model.training
    model.eval()
    try:
        with _input_hooks(adapter, projs, record):
            for b in _batches(enc, batch_size):
                state["idx"] = b["response_mask"].reshape(-1).nonzero().squeeze(1).to(device)
                n_tokens += int(state["idx"].numel())
                model.model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                            use_cache=False)
    finally:
        model.train(was_training)
    out = ActivationStats({k: v.cpu() for k, v in stats.items()}, n_tokens)
    return out


def _head_pool(channel_scores: torch.Tensor, adapter: FamilyAdapter) -> torch.Tensor:
    """[n_heads·head_dim] -> [n_heads] mean over each head's dimensions."""
    return channel_scores.view(adapter.n_heads, adapter.head_dim).mean(dim=1)


def _flat(adapter: FamilyAdapter, mlp: list[torch.Tensor], heads: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([torch.stack(mlp).reshape(-1), torch.stack(heads).reshape(-1)]).to(torch.float64)


def wifv_from_stats(model: nn.Module, stats: ActivationStats) -> torch.Tensor:
    """WIFV unit scores [n_units] from recorded o_proj/down_proj input statistics."""
    ad = adapter_for(model)
    mlp, heads = [], []
    for layer in range(ad.n_layers):
        w_d = ad.proj(layer, "down_proj").weight.detach().to(torch.float64).cpu()
        mlp.append(stats[("down_proj", layer)].var * w_d.square().sum(0))
        w_o = ad.proj(layer, "o_proj").weight.detach().to(torch.float64).cpu()
        heads.append(_head_pool(stats[("o_proj", layer)].var * w_o.square().sum(0), ad))
    return _flat(ad, mlp, heads)


def _zscore_rows(x: torch.Tensor) -> torch.Tensor:
    """z-score each row [.., n] with the sample std (ddof 1, torch.std's default as in the authors'
    `standarlization`); a constant row gives zeros rather than NaN."""
    std = x.std(dim=-1, keepdim=True)
    return torch.where(std > 0, (x - x.mean(dim=-1, keepdim=True)) / std.clamp_min(1e-300), torch.zeros_like(x))


def wifv_authors_z(model: nn.Module, stats: ActivationStats) -> torch.Tensor:
    """Standardised WIFV unit scores [n_units] with the authors' standardisation and head pooling (their
    fork of FLAP, `prune_fluctuation_decouple_utility_and_safety`) on the exact token variance of
    `stats`: the o_proj channel metric is WIFV squared, z-scored over the layer's channels, and a head's
    score is the mean of its channels' z-scores; an MLP channel's score is its WIFV z-scored over the
    layer's channels. Their statistics are not these: FLAP's streaming wrapper weighs samples, not
    tokens, and skips the first (`ssah_utils.flap` reproduces it). The plain variant
    (`wifv_from_stats` + `standardize`) pools raw channel scores into heads first, then z-scores heads."""
    ad = adapter_for(model)
    mlp, heads = [], []
    for layer in range(ad.n_layers):
        w_d = ad.proj(layer, "down_proj").weight.detach().to(torch.float64).cpu()
        mlp.append(_zscore_rows(stats[("down_proj", layer)].var * w_d.square().sum(0)))
        w_o = ad.proj(layer, "o_proj").weight.detach().to(torch.float64).cpu()
        ch = _zscore_rows((stats[("o_proj", layer)].var * w_o.square().sum(0)).square())
        heads.append(_head_pool(ch, ad))
    return _flat(ad, mlp, heads)


def _pool_weight_scores(ad: FamilyAdapter, layer: int, per_weight) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum per-weight scores `per_weight(proj) -> [out, in]` over each unit's weights of `layer`."""
    g = per_weight("gate_proj").sum(1) + per_weight("up_proj").sum(1) + per_weight("down_proj").sum(0)  # [d_mlp]
    q = per_weight("q_proj").sum(1).view(ad.n_heads, ad.head_dim).sum(1)
    o = per_weight("o_proj").sum(0).view(ad.n_heads, ad.head_dim).sum(1)
    kv = (per_weight("k_proj").sum(1) + per_weight("v_proj").sum(1)).view(ad.n_kv_heads, ad.head_dim).sum(1)
    kv_share = kv.repeat_interleave(ad.group_size) / ad.group_size  # each head's share of its group
    return g, q + o + kv_share


def wanda_from_stats(model: nn.Module, stats: ActivationStats) -> torch.Tensor:
    """Wanda unit scores [n_units]: Σ over a unit's weights of |W_ij|·‖X_j‖₂ (response tokens)."""
    ad = adapter_for(model)
    src = {"q_proj": "q_proj", "k_proj": "q_proj", "v_proj": "q_proj", "o_proj": "o_proj",
           "gate_proj": "gate_proj", "up_proj": "gate_proj", "down_proj": "down_proj"}
    mlp, heads = [], []
    for layer in range(ad.n_layers):
        norms = {p: stats[(p, layer)].sumsq.sqrt() for p in _ALL_INPUTS}

        def per_weight(proj: str, _l=layer, _n=norms) -> torch.Tensor:
            w = ad.proj(_l, proj).weight.detach().to(torch.float64).cpu()
            return w.abs() * _n[src[proj]].unsqueeze(0)

        m, h = _pool_weight_scores(ad, layer, per_weight)
        mlp.append(m)
        heads.append(h)
    return _flat(ad, mlp, heads)


def snip_scores(model: nn.Module, enc: dict[str, torch.Tensor], *, batch_size: int = 8) -> torch.Tensor:
    """SNIP unit scores [n_units]: Σ over a unit's weights of |W_ij · ∂L/∂W_ij|, L = summed NLL of
    the response tokens over the whole calibration set (gradients accumulated over batches)."""
    _check_enc(enc)
    ad = adapter_for(model)
    device = next(model.parameters()).device
    projs = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    weights = {(p, l): ad.proj(l, p).weight for l in range(ad.n_layers) for p in projs}
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    grads: dict[tuple[str, int], torch.Tensor] = {}
    was_training = model.training
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
            w.grad = None
        for b in _batches(enc, batch_size):
            ids, att, resp = (b[k].to(device) for k in ("input_ids", "attention_mask", "response_mask"))
            logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits  # [b, s, V]
            loss = response_nll(logits, ids, resp)
            loss.backward()  # gradients accumulate in .grad over batches (no extra copy of the weights)
        for k, w in weights.items():
            grads[k] = w.grad.detach()
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
            p.grad = None
        model.train(was_training)
    mlp, heads = [], []
    for layer in range(ad.n_layers):
        def per_weight(proj: str, _l=layer) -> torch.Tensor:
            return (weights[(proj, _l)].detach() * grads[(proj, _l)]).abs().to(torch.float64).cpu()

        m, h = _pool_weight_scores(ad, layer, per_weight)
        mlp.append(m)
        heads.append(h)
    return _flat(ad, mlp, heads)


def response_nll(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL over response tokens: position t predicts token t+1 where that token is a
    response token. logits [b, s, V], input_ids/response_mask [b, s] -> scalar."""
    target = input_ids[:, 1:]
    keep = response_mask[:, 1:].bool()
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tok_lp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return -(tok_lp * keep).sum()


def score_units(model: nn.Module, enc: dict[str, torch.Tensor], scorer: str = "wifv", *, batch_size: int = 16
                ) -> tuple[torch.Tensor, ActivationStats | None]:
    """Unit scores [n_units] (float64, `unit_order`) of one calibration encoding, and the activation
    statistics behind them (o_proj/down_proj inputs, for bias compensation; None for SNIP)."""
    if scorer == "wifv":
        st = activation_stats(model, enc, batch_size=batch_size, projs=_OUT_INPUTS)
        return wifv_from_stats(model, st), st
    if scorer == "wanda":
        st = activation_stats(model, enc, batch_size=batch_size, projs=_ALL_INPUTS)
        return wanda_from_stats(model, st), st
    if scorer == "snip":
        return snip_scores(model, enc, batch_size=max(1, batch_size // 2)), None
    raise ValueError(f"unknown scorer {scorer!r}; one of {SCORERS}")


# --------------------------------------------------------------------------------------------------
# Standardising and labelling
# --------------------------------------------------------------------------------------------------

def unit_groups(shape: UnitShape) -> torch.Tensor:
    """Long [n_units]: the (layer, module type) group of each unit in `unit_order`: MLP of layer l is
    group l, attention of layer l is group n_layers + l."""
    L = shape.n_layers
    return torch.cat([torch.arange(L).repeat_interleave(shape.d_mlp), L + torch.arange(L).repeat_interleave(shape.n_heads)])


def standardize(scores: torch.Tensor, shape: UnitShape) -> torch.Tensor:
    """z-score within each layer and module type (paper Sec. 4): (s − mean) / std, the sample std
    (ddof 1) as in the authors' code. A group whose scores are all equal gets z = 0 (not NaN)."""
    scores = scores.to(torch.float64)
    if scores.numel() != shape.n_layers * (shape.d_mlp + shape.n_heads):
        raise ValueError(f"{scores.numel()} scores for a model of {shape.n_layers * (shape.d_mlp + shape.n_heads)} units")
    groups = unit_groups(shape)
    z = torch.empty_like(scores)
    for g in range(2 * shape.n_layers):
        sel = groups == g
        z[sel] = _zscore_rows(scores[sel])
    return z


THRESHOLD_RULES = ("nearest", "floor")


def take_by_params(order: torch.Tensor, params: torch.Tensor, fraction: float, rule: str = "nearest") -> torch.Tensor:
    """Bool [n_units]: the prefix of the ranking `order` whose parameters make up `fraction` of all
    parameters (the paper's parameter-weighted thresholds).

    `rule="nearest"` (default) is FLAP's global threshold, which the authors' code builds on: the prefix
    whose cumulative parameter count is closest to the target (ties: the shorter). It matters when one
    unit is large next to the target (an organism head is 1.6% of the parameters, more than h1 = 1%):
    `"floor"` (never exceed the target) would then select nothing.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"threshold fractions must be in [0, 1], got {fraction}")
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"rule must be one of {THRESHOLD_RULES}, got {rule!r}")
    budget = fraction * float(params.sum())
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(params[order].to(torch.float64), 0)])
    if rule == "floor":
        n = int((cum[1:] <= budget * (1 + 1e-12)).sum())
    else:
        n = int(torch.argmin((cum - budget).abs()))  # first minimum: the shorter prefix on ties
    out = torch.zeros(order.numel(), dtype=torch.bool)
    out[order[:n]] = True
    return out


@dataclass
class Labels:
    """The ESU / EUU / CU / RU labelling of one model: one mask per label and the scores behind it."""

    shape: UnitShape
    labels: list[str]  # per unit, in unit_order
    z_safety: torch.Tensor
    z_utility: torch.Tensor
    h: tuple[float, float, float]
    rule: str = "nearest"

    def mask(self, label: str) -> UnitMask:
        if label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}, got {label!r}")
        flat = torch.tensor([x == label for x in self.labels], dtype=torch.bool)
        return UnitMask.from_flat(self.shape, flat)

    def masks(self) -> dict[str, UnitMask]:
        return {k: self.mask(k) for k in LABELS}

    def fractions(self) -> pd.DataFrame:
        """Per label: units, MLP channels, heads, share of units (as the paper reports) and of params."""
        rows = []
        for k, m in self.masks().items():
            rows.append({"label": k, "units": m.n_units, "mlp_channels": m.n_mlp, "heads": m.n_heads,
                         "pct_units": 100 * m.fraction("units"), "pct_params": 100 * m.fraction("params")})
        return pd.DataFrame(rows).set_index("label")

    def frame(self) -> pd.DataFrame:
        """One row per unit: module, layer, index, params, z-scores and label."""

        df = unit_order(self.shape)
        df["z_safety"] = self.z_safety.numpy()
        df["z_utility"] = self.z_utility.numpy()
        df["label"] = self.labels
        return df


def label_units(score_safety: torch.Tensor, score_utility: torch.Tensor, shape: UnitShape,
                h: tuple[float, float, float] = DEFAULT_H, rule: str = "nearest", *,
                standardized: bool = False) -> Labels:
    """Label units from raw safety and utility scores (paper Sec. 4, the authors' order).

    z-score each within layer and module type; RU = lowest h0 of z_S + z_U, then ESU = highest h1 of
    z_S − z_U and EUU = lowest h2 of z_S − z_U (written after RU, so they win); CU = the rest.
    Each threshold is a share of parameters (`take_by_params`, `rule`); units are taken in ranked
    order (ties: unit order). `standardized=True`: the scores are already z-scores (`wifv_authors_z`).
    """
    h0, h1, h2 = (float(x) for x in h)
    if standardized:
        zs, zu = score_safety.to(torch.float64), score_utility.to(torch.float64)
    else:
        zs, zu = standardize(score_safety, shape), standardize(score_utility, shape)
    params = unit_params(shape)
    labels = ["CU"] * zs.numel()
    total, diff = zs + zu, zs - zu
    ru = take_by_params(torch.argsort(total, stable=True), params, h0, rule)
    esu = take_by_params(torch.argsort(diff, descending=True, stable=True), params, h1, rule)
    euu = take_by_params(torch.argsort(diff, stable=True), params, h2, rule)
    if bool((esu & euu).any()):
        raise ValueError(f"h1 + h2 = {h1 + h2} is so large that ESU and EUU overlap")
    for sel, name in ((ru, "RU"), (esu, "ESU"), (euu, "EUU")):
        for i in sel.nonzero().squeeze(1).tolist():
            labels[i] = name
    return Labels(shape, labels, zs, zu, (h0, h1, h2), rule)


def ranked_mask(score: torch.Tensor, shape: UnitShape, fraction: float, *, descending: bool,
                rule: str = "nearest") -> UnitMask:
    """The top (or bottom) `fraction` of parameters by a flat score: for dose-response curves."""
    order = torch.argsort(score.to(torch.float64), descending=descending, stable=True)
    return UnitMask.from_flat(shape, take_by_params(order, unit_params(shape), fraction, rule))


def jaccard(a: UnitMask, b: UnitMask) -> float:
    """|a ∩ b| / |a ∪ b| by unit count (1.0 for two empty masks)."""
    union = (a | b).n_units
    return 1.0 if union == 0 else (a & b).n_units / union


def transfer_matrix(before: Labels, after: Labels, *, by: str = "units") -> pd.DataFrame:
    """Cross-tabulation of labels before (rows) and after (columns) a model changes (paper Figs 5, 6),
    as percent of each row (`by='units'` counts, `'params'` parameters)."""
    if before.shape != after.shape:
        raise ValueError("label sets of different models")
    w = unit_params(before.shape).numpy() if by == "params" else None
    tab = pd.crosstab(pd.Categorical(before.labels, LABELS), pd.Categorical(after.labels, LABELS),
                      values=w, aggfunc="sum" if w is not None else None, dropna=False).fillna(0.0)
    tab.index.name, tab.columns.name = "before", "after"
    return 100 * tab.div(tab.sum(1).replace(0, 1), axis=0)
