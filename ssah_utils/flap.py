"""The authors' WIFV estimator reproduced arithmetic for arithmetic (`wifv_variant="flap"`).

The paper's unit scores come from the authors' fork of FLAP (An et al. 2024), whose statistics are
gathered by FLAP's `BiasGPT` layer wrapper. That wrapper is a streaming estimator with its own
arithmetic, which this module reproduces, so that a user can score units exactly as the paper's code
does and measure how far that is from the project's default (`wifv_variant="authors"`: the authors'
z-scores and head pooling on the exact token variance, `units.wifv_authors_z`):

- **Batch of one, samples counted, not tokens.** Each calibration pair is one forward pass; the
  running mean is the average of the per-sample token means (a 3-token answer weighs what a
  300-token one does).
- **The first sample adds nothing to the fluctuation**, and after it the sum of squares of sample
  n+1 is divided by n+1 while the running value is scaled by (n-1)/n.
- **Aliased "old" mean.** The wrapper keeps `old = baseline` and then updates `baseline` in place,
  so its cross term (x - new mean)(x - old mean) is (x - new mean)²: no correction for the moving
  mean.
- **float32 accumulators**, as the wrapper's `torch.zeros` buffers.
- **Thresholds** as FLAP's global selection: units sorted by score (descending), a compression
  weight per unit (1 for an MLP channel; `int(4 * head_dim / 3)` for a head, the authors' `512 / 3`
  for head_dim 128, truncated to 170 because it is written into an int64 vector), the threshold is
  the score at the cumulative weight closest to the target, and a unit is kept only if its score is
  *strictly* above it: so the threshold unit itself falls into the lowest-share labels (RU, EUU) and
  out of the highest-share one (ESU).
- Optionally **no eos token** in the scored response (the authors' calibration text has none; the
  project's encodings close every response with one): `generation.without_final_eos`, or
  `score_eos=False` in 02_classify.

02_classify uses it with `wifv_variant="flap"` and always measures how far its labels are from the
default's (`stage_classify.estimator_comparison`); the default stays `units.wifv_authors_z` on the exact
token variance (02_classify says why).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .models import adapter_for
from .units import Labels

PROJS = ("o_proj", "down_proj")


@dataclass
class FlapRunningStats:
    """FLAP's `BiasGPT` statistics of one projection's input, fed one sample (`[tokens, d]`) at a time."""

    dim: int
    nsamples: int = 0
    baseline: torch.Tensor = field(default=None)  # [d] float32: running mean of per-sample means
    fluc: torch.Tensor = field(default=None)  # [d] float32: the wrapper's "fluctuation"

    def __post_init__(self) -> None:
        if self.baseline is None:
            self.baseline = torch.zeros(self.dim, dtype=torch.float32)
        if self.fluc is None:
            self.fluc = torch.zeros(self.dim, dtype=torch.float32)

    @torch.no_grad()
    def add_sample(self, x: torch.Tensor) -> None:
        """Fold in one sample's token rows `x` `[t, d]` (t >= 1), as the wrapper's `add_batch` with batch 1."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected one sample's rows [tokens, {self.dim}], got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("a calibration sample with no response token (empty answer without its eos?)")
        x = x.to(torch.float32).cpu()
        n = self.nsamples
        # old = baseline aliases the buffer the next two lines update in place: (x - old) == (x - new).
        self.baseline *= n / (n + 1)
        self.baseline += x.mean(dim=0) / (n + 1)
        if n == 0:
            self.fluc = torch.zeros(self.dim, dtype=torch.float32)
        else:
            self.fluc *= (n - 1) / n
            self.fluc += ((x - self.baseline) * (x - self.baseline)).sum(dim=0) / (n + 1)
        self.nsamples = n + 1


@torch.no_grad()
def flap_stats(model: nn.Module, enc: dict[str, torch.Tensor]) -> dict[tuple[str, int], FlapRunningStats]:
    """FLAP's streaming statistics of the o_proj and down_proj inputs over the response tokens of `enc`
    (`generation.encode_pairs`; `generation.without_final_eos` leaves each closing eos out), one sample
    per forward pass, in row order."""
    for k in ("input_ids", "attention_mask", "response_mask"):
        if k not in enc:
            raise KeyError(f"calibration encoding lacks {k!r}: build it with generation.encode_pairs")
    ad = adapter_for(model)
    device = next(model.parameters()).device
    stats = {(p, layer): FlapRunningStats(ad.proj(layer, p).in_features) for layer in range(ad.n_layers) for p in PROJS}
    state: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(proj: str, layer: int):
        def hook(_mod, args):
            stats[(proj, layer)].add_sample(args[0][0].index_select(0, state["idx"]))
        return hook

    was_training = model.training
    model.eval()
    try:
        for layer in range(ad.n_layers):
            for p in PROJS:
                handles.append(ad.proj(layer, p).register_forward_pre_hook(make_hook(p, layer)))
        for i in range(enc["input_ids"].shape[0]):
            width = int(enc["attention_mask"][i].sum())
            ids = enc["input_ids"][i, :width]
            resp = enc["response_mask"][i, :width]
            state["idx"] = resp.nonzero().squeeze(1).to(device)
            if state["idx"].numel() == 0:
                raise ValueError(f"calibration row {i} has no response token")
            model.model(input_ids=ids[None].to(device), attention_mask=torch.ones(1, width, dtype=torch.long, device=device),
                        use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return stats


def _standardize(x: torch.Tensor) -> torch.Tensor:
    """The authors' `standarlization`: per row, (x - mean) / std with torch's sample std, in float32."""
    return (x - x.mean(dim=-1, keepdim=True)) / x.std(dim=-1, keepdim=True)


def flap_z(model: nn.Module, stats: dict[tuple[str, int], FlapRunningStats]) -> torch.Tensor:
    """The authors' standardised unit scores [n_units] (float32 values in a float64 vector, `unit_order`):
    per layer, WIFV = fluctuation · ‖column‖² of o_proj / down_proj; o_proj's metric squared, z-scored over
    the layer's channels and averaged per head; down_proj's z-scored over the layer's channels."""
    ad = adapter_for(model)
    mlp, heads = [], []
    for layer in range(ad.n_layers):
        w_o = ad.proj(layer, "o_proj").weight.detach().to(torch.float32).cpu()
        att = (stats[("o_proj", layer)].fluc * w_o.pow(2).sum(dim=0)) ** 2
        heads.append(_standardize(att[None])[0].view(ad.n_heads, ad.head_dim).mean(dim=1))
        w_d = ad.proj(layer, "down_proj").weight.detach().to(torch.float32).cpu()
        mlp.append(_standardize((stats[("down_proj", layer)].fluc * w_d.pow(2).sum(dim=0))[None])[0])
    z = torch.cat([torch.stack(mlp).reshape(-1), torch.stack(heads).reshape(-1)])
    if not bool(torch.isfinite(z).all()):
        raise ValueError("non-finite FLAP z-scores: a layer's scores are all equal (too few calibration samples?)")
    return z.to(torch.float64)


def head_weight(head_dim: int) -> int:
    """The authors' compression weight of a head against an MLP channel: 4·head_dim/3 (q, k, v, o against
    gate, up, down for multi-head attention; 512/3 at head_dim 128), truncated by the int64 vector it is
    written into. It ignores grouped k/v heads, as their constant does."""
    return int(4 * head_dim / 3)


def keep_above(score: torch.Tensor, n_mlp: int, head_w: int, keep: float) -> torch.Tensor:
    """Bool [n_units] (`unit_order`): FLAP's global threshold. Units in FLAP's order (heads, then MLP
    channels) sorted by `score` descending; the threshold is the score where the cumulative compression
    weight is closest to `keep` of the total (first such position); kept = score strictly above it."""
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must be in [0, 1], got {keep}")
    flap_order = torch.cat([score[n_mlp:], score[:n_mlp]])
    n_att = flap_order.numel() - n_mlp
    sorted_s, idx = torch.sort(flap_order, descending=True)
    w = torch.ones_like(idx)
    w[idx < n_att] = head_w
    thr = sorted_s[torch.argmin(torch.abs(torch.cumsum(w, 0) - w.sum() * keep))]
    kept = flap_order > thr
    return torch.cat([kept[n_att:], kept[:n_att]])


def flap_labels(z_safety: torch.Tensor, z_utility: torch.Tensor, shape, h: tuple[float, float, float] = (0.10, 0.01, 0.10)
                ) -> Labels:
    """ESU / EUU / CU / RU from the authors' z-scores with FLAP's thresholds: RU = not kept at 1 - h0 of
    z_S + z_U, ESU = kept at h1 of z_S - z_U, EUU = not kept at 1 - h2 of z_S - z_U (written after RU)."""
    h0, h1, h2 = (float(x) for x in h)
    n_mlp = shape.n_layers * shape.d_mlp
    hw = head_weight(shape.head_dim)
    total, diff = z_safety + z_utility, z_safety - z_utility
    ru = ~keep_above(total, n_mlp, hw, 1 - h0)
    esu = keep_above(diff, n_mlp, hw, h1)
    euu = ~keep_above(diff, n_mlp, hw, 1 - h2)
    if bool((esu & euu).any()):
        raise ValueError(f"h1 + h2 = {h1 + h2} is so large that ESU and EUU overlap")
    labels = ["CU"] * z_safety.numel()
    for sel, name in ((ru, "RU"), (esu, "ESU"), (euu, "EUU")):
        for i in sel.nonzero().squeeze(1).tolist():
            labels[i] = name
    return Labels(shape, labels, z_safety.to(torch.float64), z_utility.to(torch.float64), (h0, h1, h2), "flap")
