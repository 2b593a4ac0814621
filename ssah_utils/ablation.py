"""Removing units from a model, with FLAP bias compensation, reversibly or on a copy.

Removing ("pruning") a unit, as in the authors' FLAP-style code (paper Sec. 4):
- an **MLP channel** i: zero row i of gate_proj and up_proj (and column i of down_proj, which makes the
  removal exact for any activation, not only SiLU(0) = 0);
- an **attention head** h: zero its o_proj input columns and its q_proj rows. Its k/v rows are zeroed
  only when every head of its GQA group is removed, since other heads still read them. Zeroing the
  o_proj columns is what removes the head's output: zeroing q alone would leave a uniform average of
  v, which is not zero;
- **bias compensation**: add to the output projection's bias the removed channels' mean calibration
  input times their weight columns, b += W[:, removed] @ mean[removed], so the block's output keeps its
  average. A removed unit is thus replaced by its mean activation (mean ablation); without
  compensation it is zero ablation.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .models import UnitMask, adapter_for
from .units import ActivationStats


def _compensation(weight: torch.Tensor, removed: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """W[:, removed] @ mean[removed] in float64, returned in the weight's dtype. weight [out, in]."""
    w = weight.detach()[:, removed.to(weight.device)].to(torch.float64).cpu()
    return (w @ mean.to(torch.float64).cpu()[removed.cpu()]).to(weight.dtype)


def compensation_biases(model: nn.Module, mask: UnitMask, means: ActivationStats) -> dict[tuple[str, int], torch.Tensor]:
    """The bias added to o_proj / down_proj of each layer when `mask` is removed: {(proj, layer): [d_model]}."""
    ad = adapter_for(model)
    out = {}
    for layer in range(ad.n_layers):
        ch = mask.mlp[layer]
        if ch.any():
            out[("down_proj", layer)] = _compensation(ad.proj(layer, "down_proj").weight, ch, means.mean("down_proj", layer))
        hd = ad.head_channels(mask.heads[layer])
        if hd.any():
            out[("o_proj", layer)] = _compensation(ad.proj(layer, "o_proj").weight, hd, means.mean("o_proj", layer))
    return out


def _apply(model: nn.Module, mask: UnitMask, means: ActivationStats | None) -> list:
    """Modify the weights in place; return what is needed to undo it."""
    ad = adapter_for(model)
    if mask.shape != ad.shape:
        raise ValueError(f"mask of a model shaped {mask.shape}, model is {ad.shape}")
    biases = compensation_biases(model, mask, means) if means is not None else {}
    undo: list = []

    def save_rows(lin: nn.Linear, rows: torch.Tensor) -> None:
        undo.append(("weight_rows", lin, rows, lin.weight.data[rows].clone()))
        lin.weight.data[rows] = 0
        if lin.bias is not None:
            undo.append(("bias_rows", lin, rows, lin.bias.data[rows].clone()))
            lin.bias.data[rows] = 0

    def save_cols(lin: nn.Linear, cols: torch.Tensor) -> None:
        undo.append(("weight_cols", lin, cols, lin.weight.data[:, cols].clone()))
        lin.weight.data[:, cols] = 0

    def add_bias(lin: nn.Linear, b: torch.Tensor) -> None:
        b = b.to(device=lin.weight.device, dtype=lin.weight.dtype)
        if lin.bias is None:
            undo.append(("new_bias", lin, None, None))
            lin.bias = nn.Parameter(b.clone(), requires_grad=False)
        else:
            undo.append(("bias", lin, None, lin.bias.data.clone()))
            lin.bias.data += b

    with torch.no_grad():
        for layer, proj, axis, idx in ad.unit_entries(mask, kv="all"):  # k/v rows only of whole groups
            if idx.any():
                lin = ad.proj(layer, proj)
                idx = idx.to(lin.weight.device)
                if axis == "rows":
                    save_rows(lin, idx)
                else:
                    save_cols(lin, idx)
        for (proj, layer), b in biases.items():
            add_bias(ad.proj(layer, proj), b)
    return undo


def _undo(undo: list) -> None:
    with torch.no_grad():
        for kind, lin, idx, value in reversed(undo):
            if kind == "weight_rows":
                lin.weight.data[idx] = value
            elif kind == "bias_rows":
                lin.bias.data[idx] = value
            elif kind == "weight_cols":
                lin.weight.data[:, idx] = value
            elif kind == "bias":
                lin.bias.data.copy_(value)
            elif kind == "new_bias":
                lin.bias = None


@contextmanager
def ablate(model: nn.Module, mask: UnitMask, means: ActivationStats | None = None) -> Iterator[nn.Module]:
    """Remove `mask`'s units inside a `with` block, restoring the model bit for bit on exit (errors
    included). `means`: o_proj/down_proj input statistics (`units.activation_stats`) for FLAP bias
    compensation; None removes without compensation (zero ablation)."""
    undo = _apply(model, mask, means)
    try:
        yield model
    finally:
        _undo(undo)


def ablated_copy(model: nn.Module, mask: UnitMask, means: ActivationStats | None = None) -> nn.Module:
    """A deep copy of `model` with `mask`'s units removed (the original is untouched)."""
    clone = copy.deepcopy(model)
    _apply(clone, mask, means)
    return clone
