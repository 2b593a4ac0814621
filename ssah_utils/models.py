"""Loading causal LMs, the family adapter (one definition of a unit) and the whole-model unit mask.

A **unit** is either an MLP intermediate channel (row i of `gate_proj` and `up_proj`, column i of
`down_proj`) or an attention head (its rows of `q_proj`, its slice of `o_proj`'s input columns; with
grouped-query attention the k/v rows are shared by the heads of a group). Scoring (`units.py`),
ablation (`ablation.py`), freezing and budget training all use this one definition through
`FamilyAdapter` and `UnitMask`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from . import config as _config

ORGANISM_NAMES = ("base", "unaligned", "aligned")
# The supported families are the tested ones (`model.config.model_type`): each passes tests/test_families.py
# (scorer against a per-token reference, head and channel ablation isolation, GQA groups, bit-exact
# freezing, batched generation equal to one by one) on a tiny random config. Any other family is refused,
# even with the same module names: OLMo-2 has them, but its q/k norms span all heads, so a head is not a unit.
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
_ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


class UnsupportedArchitectureError(ValueError):
    """The model does not have the Llama-style layout the unit definition needs."""


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------

def resolve_spec(spec: str | os.PathLike) -> tuple[str, str]:
    """Return (kind, location) for a model spec: kind is 'local' (a folder) or 'hub' (a HF id).

    `organism:<name>` maps to `config.ORGANISM_DIR/<name>`; an existing folder is local; a string that
    looks like a path (absolute, `./`, `../`, `~`) but does not exist is an error, never a hub id.
    """
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model spec must be 'organism:<name>', a local path or a Hugging Face id, got {spec!r}")
    if spec.startswith("organism:"):
        name = spec.split(":", 1)[1]
        if name not in ORGANISM_NAMES:
            raise ValueError(f"unknown organism model {name!r}; valid: {', '.join('organism:' + n for n in ORGANISM_NAMES)}")
        path = Path(_config.ORGANISM_DIR) / name
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"organism model {spec!r} not found at {path} (no config.json). "
                "Build it with `make organism` or restore data/organism/ from git."
            )
        return "local", str(path)
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"local model folder {path} has no config.json (save it with save_pretrained)")
        return "local", str(path)
    if spec.startswith(("/", "./", "../", "~", ".")) or "\\" in spec or not _looks_like_hub_id(spec):
        raise FileNotFoundError(f"local model path {spec!r} does not exist{_build_hint(path)}")
    return "hub", spec


def _build_hint(path: Path) -> str:
    """What to do about a missing local model: the build command of the preset it belongs to, if any."""
    for p in _config.PRESETS.values():
        build = p.extra.get("build")
        if build and str(path) in {p.aligned, p.base, p.unaligned}:
            return (f": it is preset {p.name!r}'s model; build it with `{build}` (or set $SSAH_MODELS_DIR to the folder "
                    "that holds the built models)")
    return " (and it is not a Hugging Face id org/name)"


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return 1 <= len(parts) <= 2 and all(p and not p.startswith(".") for p in parts)


def _as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(table)}")
    return table[dtype]


def load_model(spec: str, *, dtype: str | torch.dtype | None = None, device: str | None = None):
    """Load (model, tokenizer) for `organism:<name>`, a local folder or a Hugging Face id.

    The tokenizer gets a pad token (eos when it has none) and left padding, for batched generation;
    the model is put in eval mode and checked against the unit layout (`adapter_for`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, where = resolve_spec(spec)
    device = _config.resolve_device(device or "auto")
    torch_dtype = _as_dtype(dtype) or torch.float32
    tok = AutoTokenizer.from_pretrained(where)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype)
    adapter_for(model)  # fail early with the list of supported families
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    model.to(device)
    model.eval()
    model._ssah_spec = str(spec)
    model._ssah_revision = model_revision(spec) if kind == "local" else _hub_revision(model, where)
    return model, tok


def _hash_folder(path: Path, full_limit: int = 512 * 2**20) -> str:
    """SHA-256 over config and weight files: full content up to `full_limit` bytes in total; above it
    (multi-GB checkpoints) the safetensors headers, sizes and first/last MiB of each file."""
    files = sorted(
        p for p in path.iterdir()
        if p.is_file() and (p.suffix in {".safetensors", ".bin"} or p.name in {"config.json", "generation_config.json"})
    )
    if not any(p.suffix in {".safetensors", ".bin"} for p in files):
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin) in {path}")
    total = sum(p.stat().st_size for p in files)
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        size = p.stat().st_size
        h.update(str(size).encode())
        with open(p, "rb") as f:
            if total <= full_limit:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            else:
                h.update(f.read(1 << 20))
                f.seek(max(0, size - (1 << 20)))
                h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def _hub_revision(model: nn.Module, repo_id: str) -> str:
    commit = getattr(model.config, "_commit_hash", None)
    return f"{repo_id}@{commit}" if commit else f"{repo_id}@unknown"


def forget_revision(model: nn.Module) -> None:
    """Drop the revision `load_model` recorded on `model` (a copy that is then trained is not the model
    it was loaded as: its revision must come from its weights, never from the original's record)."""
    model._ssah_revision = None


def model_revision(model_or_spec: Any) -> str:
    """A short string that changes whenever the weights change: for cache keys.

    Local folders (the organism included): a hash of the weight files. Hub ids: `<id>@<commit>`.
    A loaded model: the revision recorded by `load_model`, else that of `config._name_or_path`.
    """
    if isinstance(model_or_spec, nn.Module):
        rev = getattr(model_or_spec, "_ssah_revision", None)
        if rev:
            return rev
        name = getattr(model_or_spec.config, "_name_or_path", "")
        if name and Path(name).is_dir():
            return _hash_folder(Path(name))
        if name:
            return _hub_revision(model_or_spec, name)
        raise ValueError("model has no recorded origin; load it with load_model or pass its spec")
    kind, where = resolve_spec(model_or_spec)
    if kind == "local":
        return _hash_folder(Path(where))
    try:
        from huggingface_hub import HfApi

        return f"{where}@{HfApi().model_info(where).sha}"
    except Exception:
        return f"{where}@unknown"


# --------------------------------------------------------------------------------------------------
# Family adapter: one definition of a unit
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class UnitShape:
    """The sizes that define a model's units and their parameter counts."""

    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int
    n_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    @property
    def group_size(self) -> int:
        """Query heads per k/v head (1 without GQA)."""
        return self.n_heads // self.n_kv_heads

    @property
    def params_per_channel(self) -> int:
        """An MLP channel: a row of gate_proj, a row of up_proj, a column of down_proj = 3·d_model."""
        return 3 * self.d_model

    @property
    def params_per_head(self) -> float:
        """A head: its q rows and o_proj columns (2·d_model·head_dim) plus an equal share of its group's
        k and v rows (2·d_model·head_dim / group_size). Without GQA that is all of q, k, v, o of the
        head; with GQA the shares of a group's heads add up to the group's k/v rows, so the units'
        parameters sum to all attention and MLP weights. Biases are not counted."""
        dh = self.d_model * self.head_dim
        return 2 * dh + 2 * dh / self.group_size

    @property
    def total_params(self) -> float:
        return self.n_layers * (self.d_mlp * self.params_per_channel + self.n_heads * self.params_per_head)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _get_layers(model: nn.Module):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None) if inner is not None else None
    if layers is None or len(layers) == 0:
        return None
    return layers


def _family(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", type(model).__name__))


KV_RULES = ("any", "all")  # which GQA k/v groups a set of heads owns (FamilyAdapter.kv_groups)


def _cross_head_norm(model: nn.Module, attn: nn.Module) -> str | None:
    """Why heads are not separable units in `attn`, or None. A norm inside attention whose weight spans
    more than one head's dimensions (OLMo-2's q_norm/k_norm over all heads) mixes the heads: removing one
    changes the others' outputs. Per-head norms (Qwen3, Gemma-3: head_dim entries) keep heads separate."""
    cfg = model.config
    n_heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(attn, "head_dim", None) or getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
    for name, sub in attn.named_modules():
        w = getattr(sub, "weight", None)
        if name and "norm" in name.lower() and isinstance(w, torch.Tensor) and w.numel() != head_dim:
            return (f"its attention norm self_attn.{name} has {w.numel()} weights, not head_dim={head_dim}: it "
                    "normalises across heads, so removing one head would change the others' outputs")
    return None


class FamilyAdapter:
    """Uniform access to the layers, projections, head counts and GQA groups of a Llama-style model."""

    def __init__(self, model: nn.Module):
        layers = _get_layers(model)
        fam = _family(model)
        problem = None
        if layers is None:
            problem = "it has no model.model.layers"
        else:
            l0 = layers[0]
            attn, mlp = getattr(l0, "self_attn", None), getattr(l0, "mlp", None)
            missing = [f"self_attn.{p}" for p in _ATTN_PROJ if not isinstance(getattr(attn, p, None), nn.Linear)]
            missing += [f"mlp.{p}" for p in _MLP_PROJ if not isinstance(getattr(mlp, p, None), nn.Linear)]
            if missing:
                problem = f"its layers lack {', '.join(missing)}"
        if problem is None:
            problem = _cross_head_norm(model, layers[0].self_attn)
        if problem is None and fam not in SUPPORTED_FAMILIES:
            problem = ("it is not a tested family" + (" (Gemma-3 with vision: load its text model, Gemma3ForCausalLM)"
                                                       if fam == "gemma3" else ""))
        if problem:
            raise UnsupportedArchitectureError(
                f"unsupported architecture {fam!r} ({type(model).__name__}): {problem}. Supported families (each "
                f"passes tests/test_families.py): {', '.join(SUPPORTED_FAMILIES)}; they need "
                "model.model.layers[i].self_attn.{q,k,v,o}_proj and .mlp.{gate,up,down}_proj, and no normalisation "
                "across heads."
            )
        self.model = model
        self.family = fam
        self._layers = layers
        cfg = model.config
        attn0 = layers[0].self_attn
        n_heads = int(cfg.num_attention_heads)
        n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
        head_dim = int(getattr(attn0, "head_dim", None) or getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
        self.shape = UnitShape(
            n_layers=len(layers), d_model=int(cfg.hidden_size), d_mlp=int(layers[0].mlp.down_proj.in_features),
            n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
        )
        if attn0.q_proj.out_features != n_heads * head_dim or attn0.k_proj.out_features != n_kv * head_dim:
            raise UnsupportedArchitectureError(
                f"{fam}: q/k projections ({attn0.q_proj.out_features}, {attn0.k_proj.out_features}) do not match "
                f"n_heads·head_dim={n_heads * head_dim} / n_kv_heads·head_dim={n_kv * head_dim}"
            )

    # sizes
    n_layers = property(lambda self: self.shape.n_layers)
    d_model = property(lambda self: self.shape.d_model)
    d_mlp = property(lambda self: self.shape.d_mlp)
    n_heads = property(lambda self: self.shape.n_heads)
    n_kv_heads = property(lambda self: self.shape.n_kv_heads)
    head_dim = property(lambda self: self.shape.head_dim)
    group_size = property(lambda self: self.shape.group_size)

    # modules
    def layers(self):
        return self._layers

    def attn(self, layer: int) -> nn.Module:
        return self._layers[layer].self_attn

    def mlp(self, layer: int) -> nn.Module:
        return self._layers[layer].mlp

    def proj(self, layer: int, name: str) -> nn.Linear:
        """One of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj of `layer`."""
        if name in _ATTN_PROJ:
            return getattr(self.attn(layer), name)
        if name in _MLP_PROJ:
            return getattr(self.mlp(layer), name)
        raise ValueError(f"unknown projection {name!r}; one of {_ATTN_PROJ + _MLP_PROJ}")

    def out_proj(self, layer: int, module: str) -> nn.Linear:
        """The output projection whose input channels are the units: o_proj ('attn') or down_proj ('mlp')."""
        return self.proj(layer, {"attn": "o_proj", "mlp": "down_proj"}[module])

    # GQA
    def kv_head(self, head: int) -> int:
        """The k/v head used by query head `head` (transformers' repeat_kv: kv = head // group_size)."""
        if not 0 <= head < self.n_heads:
            raise IndexError(f"head {head} out of range [0, {self.n_heads})")
        return head // self.group_size

    def group_heads(self, kv_head: int) -> range:
        """The query heads that share k/v head `kv_head`."""
        g = self.group_size
        return range(kv_head * g, (kv_head + 1) * g)

    def head_slice(self, head: int) -> slice:
        """Rows of q_proj / columns of o_proj belonging to `head`."""
        return slice(head * self.head_dim, (head + 1) * self.head_dim)

    def head_channels(self, heads: torch.Tensor) -> torch.Tensor:
        """Bool [n_heads] -> bool [n_heads·head_dim] over q rows / o_proj columns."""
        return heads.repeat_interleave(self.head_dim)

    def full_kv_groups(self, heads: torch.Tensor) -> torch.Tensor:
        """Bool [n_heads] -> bool [n_kv_heads]: groups all of whose query heads are in `heads`."""
        return heads.view(self.n_kv_heads, self.group_size).all(dim=1)

    def kv_groups(self, heads: torch.Tensor, kv: str) -> torch.Tensor:
        """Bool [n_heads] -> bool [n_kv_heads]: the k/v groups that belong to `heads` under rule `kv`
        ("any": a group counts if any of its query heads is in `heads`; "all": only if every one is)."""
        if kv not in KV_RULES:
            raise ValueError(f"kv must be one of {KV_RULES} ('any': a group counts if any of its heads is in the mask; "
                             f"'all': only if every head is), got {kv!r}")
        grouped = heads.view(self.n_kv_heads, self.group_size)
        return grouped.any(dim=1) if kv == "any" else grouped.all(dim=1)

    def unit_entries(self, mask: "UnitMask", kv: str = "any") -> list[tuple[int, str, str, torch.Tensor]]:
        """The one definition of which weights a unit owns: (layer, projection, axis, bool index) for
        every projection of every layer, the rows ('rows') or input columns ('cols') of the weight
        that belong to `mask`'s units. MLP channel i: row i of gate_proj and up_proj, column i of
        down_proj; head h: its q_proj rows and o_proj columns, and the k_proj/v_proj rows of its GQA
        group under rule `kv`. Used by `ablation` (zeroes them, kv="all") and `training` (freezes or
        trains them)."""
        out = []
        for layer in range(self.n_layers):
            ch = mask.mlp[layer]  # [d_mlp]
            hd = self.head_channels(mask.heads[layer])  # [n_heads * head_dim]
            kv_rows = self.kv_groups(mask.heads[layer], kv).repeat_interleave(self.head_dim)  # [n_kv_heads * head_dim]
            out += [(layer, "gate_proj", "rows", ch), (layer, "up_proj", "rows", ch), (layer, "down_proj", "cols", ch),
                    (layer, "q_proj", "rows", hd), (layer, "k_proj", "rows", kv_rows), (layer, "v_proj", "rows", kv_rows),
                    (layer, "o_proj", "cols", hd)]
        return out

    def __repr__(self) -> str:
        s = self.shape
        return (f"FamilyAdapter({self.family}: {s.n_layers} layers, d_model={s.d_model}, d_mlp={s.d_mlp}, "
                f"heads={s.n_heads}, kv_heads={s.n_kv_heads}, head_dim={s.head_dim})")


def adapter_for(model: nn.Module) -> FamilyAdapter:
    """The family adapter of `model` (cached on the model); raises UnsupportedArchitectureError."""
    ad = getattr(model, "_ssah_adapter", None)
    if isinstance(ad, FamilyAdapter) and ad.model is model:
        return ad
    ad = FamilyAdapter(model)
    try:
        object.__setattr__(model, "_ssah_adapter", ad)
    except Exception:
        pass
    return ad


# --------------------------------------------------------------------------------------------------
# Unit mask
# --------------------------------------------------------------------------------------------------

class UnitMask:
    """A set of units of one model: bool `mlp` [n_layers, d_mlp] and bool `heads` [n_layers, n_heads].

    `mask.mlp[l]` / `mask.heads[l]` are the per-layer vectors. Supports |, &, - (difference), ~,
    equality, counts by unit and by parameter, safetensors round trip and a per-layer summary.
    """

    def __init__(self, shape: UnitShape, mlp: torch.Tensor, heads: torch.Tensor):
        mlp = torch.as_tensor(mlp).to("cpu")
        heads = torch.as_tensor(heads).to("cpu")
        if mlp.dtype != torch.bool or heads.dtype != torch.bool:
            raise TypeError(f"UnitMask wants bool tensors, got mlp {mlp.dtype}, heads {heads.dtype}")
        if tuple(mlp.shape) != (shape.n_layers, shape.d_mlp):
            raise ValueError(f"mlp mask shape {tuple(mlp.shape)} != (n_layers, d_mlp) = {(shape.n_layers, shape.d_mlp)}")
        if tuple(heads.shape) != (shape.n_layers, shape.n_heads):
            raise ValueError(f"heads mask shape {tuple(heads.shape)} != (n_layers, n_heads) = {(shape.n_layers, shape.n_heads)}")
        self.shape = shape
        self.mlp = mlp.clone()
        self.heads = heads.clone()

    # constructors
    @classmethod
    def empty(cls, shape: UnitShape | FamilyAdapter | nn.Module) -> "UnitMask":
        shape = _shape_of(shape)
        return cls(shape, torch.zeros(shape.n_layers, shape.d_mlp, dtype=torch.bool),
                   torch.zeros(shape.n_layers, shape.n_heads, dtype=torch.bool))

    @classmethod
    def full(cls, shape: UnitShape | FamilyAdapter | nn.Module) -> "UnitMask":
        return ~cls.empty(shape)

    @classmethod
    def from_flat(cls, shape: UnitShape | FamilyAdapter | nn.Module, flat: torch.Tensor) -> "UnitMask":
        """From a bool vector in `unit_order` (all MLP channels layer by layer, then all heads)."""
        shape = _shape_of(shape)
        n_mlp = shape.n_layers * shape.d_mlp
        flat = torch.as_tensor(flat, dtype=torch.bool)
        if flat.numel() != n_mlp + shape.n_layers * shape.n_heads:
            raise ValueError(f"flat mask has {flat.numel()} entries, the model has {n_mlp + shape.n_layers * shape.n_heads} units")
        return cls(shape, flat[:n_mlp].view(shape.n_layers, shape.d_mlp), flat[n_mlp:].view(shape.n_layers, shape.n_heads))

    def flat(self) -> torch.Tensor:
        """Bool [n_units] in `unit_order`: MLP channels (layer-major), then heads (layer-major)."""
        return torch.cat([self.mlp.reshape(-1), self.heads.reshape(-1)])

    @classmethod
    def random(cls, shape: UnitShape | FamilyAdapter | nn.Module, *, n_mlp: int | None = None, n_heads: int | None = None,
               n_params: float | None = None, n_units: int | None = None, seed: int = 0) -> "UnitMask":
        """A uniformly random mask: with `n_mlp`/`n_heads` exactly that many channels and heads;
        with `n_units` that many units of either kind; with `n_params` units drawn in random order
        until adding the next would exceed `n_params` parameters."""
        shape = _shape_of(shape)
        g = torch.Generator().manual_seed(int(seed))
        L = shape.n_layers
        given = [n_mlp is not None or n_heads is not None, n_params is not None, n_units is not None]
        if sum(given) != 1:
            raise ValueError("give exactly one of (n_mlp, n_heads), n_params, n_units")
        n_tot_mlp, n_tot_heads = L * shape.d_mlp, L * shape.n_heads
        if given[0]:
            n_mlp, n_heads = int(n_mlp or 0), int(n_heads or 0)
            if not (0 <= n_mlp <= n_tot_mlp and 0 <= n_heads <= n_tot_heads):
                raise ValueError(f"n_mlp must be in [0, {n_tot_mlp}] and n_heads in [0, {n_tot_heads}]")
            flat_m = torch.zeros(n_tot_mlp, dtype=torch.bool)
            flat_m[torch.randperm(n_tot_mlp, generator=g)[:n_mlp]] = True
            flat_h = torch.zeros(n_tot_heads, dtype=torch.bool)
            flat_h[torch.randperm(n_tot_heads, generator=g)[:n_heads]] = True
            return cls(shape, flat_m.view(L, shape.d_mlp), flat_h.view(L, shape.n_heads))
        n_all = n_tot_mlp + n_tot_heads
        order = torch.randperm(n_all, generator=g)
        flat = torch.zeros(n_all, dtype=torch.bool)
        if n_units is not None:
            if not 0 <= n_units <= n_all:
                raise ValueError(f"n_units must be in [0, {n_all}]")
            flat[order[:n_units]] = True
        else:
            if not 0 <= n_params <= shape.total_params:
                raise ValueError(f"n_params must be in [0, {shape.total_params:.0f}]")
            w = unit_params(shape)[order]
            take = torch.cumsum(w, 0) <= n_params + 1e-6
            flat[order[take]] = True
        return cls.from_flat(shape, flat)

    def random_like(self, seed: int = 0, *, by: str = "composition") -> "UnitMask":
        """A random control mask of the same size: `by='composition'` keeps the number of MLP channels
        and of heads (hence the parameter count exactly), placed uniformly over layers; `'params'`
        matches the parameter count with units of either kind; `'units'` the unit count."""
        if by == "composition":
            return UnitMask.random(self.shape, n_mlp=int(self.mlp.sum()), n_heads=int(self.heads.sum()), seed=seed)
        if by == "params":
            return UnitMask.random(self.shape, n_params=self.n_params, seed=seed)
        if by == "units":
            return UnitMask.random(self.shape, n_units=self.n_units, seed=seed)
        raise ValueError(f"by must be 'composition', 'params' or 'units', got {by!r}")

    # set algebra
    def _check(self, other: "UnitMask") -> None:
        if not isinstance(other, UnitMask):
            raise TypeError(f"expected a UnitMask, got {type(other).__name__}")
        if other.shape != self.shape:
            raise ValueError(f"masks of different models: {self.shape} vs {other.shape}")

    def __or__(self, other: "UnitMask") -> "UnitMask":
        self._check(other)
        return UnitMask(self.shape, self.mlp | other.mlp, self.heads | other.heads)

    def __and__(self, other: "UnitMask") -> "UnitMask":
        self._check(other)
        return UnitMask(self.shape, self.mlp & other.mlp, self.heads & other.heads)

    def __sub__(self, other: "UnitMask") -> "UnitMask":
        self._check(other)
        return UnitMask(self.shape, self.mlp & ~other.mlp, self.heads & ~other.heads)

    def __invert__(self) -> "UnitMask":
        return UnitMask(self.shape, ~self.mlp, ~self.heads)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, UnitMask) and other.shape == self.shape
                and torch.equal(self.mlp, other.mlp) and torch.equal(self.heads, other.heads))

    __hash__ = None  # mutable tensors

    def is_empty(self) -> bool:
        return not (bool(self.mlp.any()) or bool(self.heads.any()))

    # counts
    @property
    def n_mlp(self) -> int:
        return int(self.mlp.sum())

    @property
    def n_heads(self) -> int:
        return int(self.heads.sum())

    @property
    def n_units(self) -> int:
        return self.n_mlp + self.n_heads

    @property
    def n_params(self) -> float:
        return self.n_mlp * self.shape.params_per_channel + self.n_heads * self.shape.params_per_head

    def fraction(self, by: str = "units") -> float:
        """Share of the model's units (`by='units'`, as the paper reports) or unit parameters (`'params'`)."""
        if by == "units":
            return self.n_units / (self.shape.n_layers * (self.shape.d_mlp + self.shape.n_heads))
        if by == "params":
            return self.n_params / self.shape.total_params
        raise ValueError(f"by must be 'units' or 'params', got {by!r}")

    def counts(self) -> dict[str, float]:
        return {"mlp_channels": self.n_mlp, "heads": self.n_heads, "units": self.n_units, "params": self.n_params,
                "frac_units": self.fraction("units"), "frac_params": self.fraction("params")}

    def summary(self) -> pd.DataFrame:
        """Per layer: channels and heads in the mask, their parameters and shares of the layer."""
        s = self.shape
        m = self.mlp.sum(1).numpy()
        h = self.heads.sum(1).numpy()
        params = m * s.params_per_channel + h * s.params_per_head
        layer_params = s.d_mlp * s.params_per_channel + s.n_heads * s.params_per_head
        return pd.DataFrame({
            "layer": range(s.n_layers), "mlp_channels": m, "heads": h,
            "frac_mlp": m / s.d_mlp, "frac_heads": h / s.n_heads,
            "params": params, "frac_params": params / layer_params,
        }).set_index("layer")

    # persistence
    def save(self, path: str | Path) -> Path:
        """Write the mask to safetensors (uint8 tensors; the shape in the metadata)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"mlp": self.mlp.to(torch.uint8).contiguous(), "heads": self.heads.to(torch.uint8).contiguous()},
                  str(path), metadata={"format": "ssah.UnitMask/1", "shape": json.dumps(self.shape.to_dict())})
        return path

    @classmethod
    def load(cls, path: str | Path, expect: UnitShape | FamilyAdapter | nn.Module | None = None) -> "UnitMask":
        """Read a mask written by `save`; with `expect`, check it belongs to a model of that shape."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no unit mask at {path}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "ssah.UnitMask/1":
                raise ValueError(f"{path} is not a UnitMask file (format {meta.get('format')!r})")
            shape = UnitShape(**json.loads(meta["shape"]))
            if expect is not None and _shape_of(expect) != shape:
                raise ValueError(f"{path} holds a mask of a model shaped {shape}, not {_shape_of(expect)}")
            return cls(shape, f.get_tensor("mlp").bool(), f.get_tensor("heads").bool())

    def __repr__(self) -> str:
        return (f"UnitMask({self.n_mlp} MLP channels + {self.n_heads} heads = {self.fraction('units'):.2%} of units, "
                f"{self.fraction('params'):.2%} of params)")


def _shape_of(obj: UnitShape | FamilyAdapter | nn.Module) -> UnitShape:
    if isinstance(obj, UnitShape):
        return obj
    if isinstance(obj, FamilyAdapter):
        return obj.shape
    if isinstance(obj, nn.Module):
        return adapter_for(obj).shape
    raise TypeError(f"expected a UnitShape, FamilyAdapter or model, got {type(obj).__name__}")


def unit_params(shape: UnitShape) -> torch.Tensor:
    """Float64 [n_units] parameter count of each unit in `unit_order`."""
    n_mlp = shape.n_layers * shape.d_mlp
    n_h = shape.n_layers * shape.n_heads
    return torch.cat([torch.full((n_mlp,), float(shape.params_per_channel), dtype=torch.float64),
                      torch.full((n_h,), float(shape.params_per_head), dtype=torch.float64)])


def unit_order(shape: UnitShape) -> pd.DataFrame:
    """The canonical flat order of units: columns module ('mlp'|'attn'), layer, index, params."""
    L = shape.n_layers
    mlp = pd.DataFrame({"module": "mlp", "layer": torch.arange(L).repeat_interleave(shape.d_mlp).numpy(),
                        "index": torch.arange(shape.d_mlp).repeat(L).numpy(), "params": float(shape.params_per_channel)})
    att = pd.DataFrame({"module": "attn", "layer": torch.arange(L).repeat_interleave(shape.n_heads).numpy(),
                        "index": torch.arange(shape.n_heads).repeat(L).numpy(), "params": float(shape.params_per_head)})
    return pd.concat([mlp, att], ignore_index=True)
