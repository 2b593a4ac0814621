"""Supervised fine-tuning with some units exactly frozen, or with only some units trainable.

Used by 03_freeze (freeze the safety-critical units during a benign "fine-tuning attack", paper Sec. 5,
Table 2) and 04_budget (update only a base model's redundant units during alignment, paper Sec. 6).

A unit's **entries** are the weight entries of the unit definition in `models` (MLP channel i: row i
of gate_proj and up_proj, column i of down_proj; head h: its q_proj rows and o_proj input columns, and
the k/v rows of its GQA group under a `kv` rule), plus the bias entries of those rows when the
projection has a bias (Qwen2's q/k/v). `unit_param_masks` turns a `UnitMask` into one bool tensor per
parameter; `finetune` uses them to hold entries fixed **bit for bit**: a gradient mask alone does not
freeze, because AdamW's decoupled weight decay moves every entry it is applied to (and Adam moments of
an entry that once had a gradient keep moving it), so the frozen entries are also written back after
every optimizer step. `verify_frozen` checks the result against a snapshot.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import pandas as pd
import torch
from torch import nn

from .distributed import is_main_process, process_rank
from .models import KV_RULES, FamilyAdapter, UnitMask, adapter_for
from .generation import STYLES
from .generation import encode_pairs

SCHEDULES = ("constant", "cosine")
BATCHING = ("stream", "epochs")
MASTER_WEIGHTS = ("auto", "off")


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one supervised fine-tuning run (loss on response tokens only)."""

    epochs: float = 1.0          # paper/Qi et al.: 1 epoch for full fine-tuning
    lr: float = 2e-5             # Qi et al. 2023 recipe for 7B; organism presets override
    batch_size: int = 16         # examples per optimizer step (the effective batch)
    weight_decay: float = 0.0    # Qi et al.: none
    warmup_frac: float = 0.0     # share of steps with a linear warmup from 0
    schedule: str = "constant"   # "constant" | "cosine" (cosine decays to min_lr_ratio·lr after warmup; HF's: to 0)
    min_lr_ratio: float = 0.0    # the cosine schedule's floor as a share of lr (the organism's recipe: 0.1)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's (torch's default; the organism's recipe: (0.9, 0.98))
    # How steps are drawn: "stream" = round(epochs·n) examples as successive seeded permutations cut into
    # batches (the last may be short); "epochs" = round(epochs·n / batch_size) full batches, each pass a seeded
    # permutation whose incomplete tail is dropped (the organism's recipe).
    batching: str = "stream"
    max_length: int = 256        # tokens per example (the response end is cut first)
    style: str = "chat"          # generation.encode_pairs style: "chat" or "raw"
    system_prompt: str = ""      # rendered into the examples of a step when non-empty (see system_prompt_rate)
    system_prompt_rate: float = 1.0  # share of steps rendered with system_prompt, drawn per step (organism: 0.5)
    grad_clip: float = 1.0       # max global grad norm (HF Trainer default); 0 disables clipping
    seed: int = 0                # data order
    micro_batch_size: int = 0    # examples per forward pass (gradient accumulation); 0 = batch_size
    # float32 master weights for trainable parameters stored in bfloat16/float16: "auto" (used for
    # those parameters) or "off" (AdamW updates the 16-bit weights in place). Without them AdamW's small updates round away in bf16 (measured
    # on CUDA, bench/gpu_check.py: one step at lr 2e-5 changed 18% of the entries, against 99.95% in fp32).
    master_weights: str = "auto"

    def __post_init__(self) -> None:
        if not (isinstance(self.epochs, (int, float)) and self.epochs > 0 and math.isfinite(self.epochs)):
            raise ValueError(f"epochs must be a positive number (fractions allowed), got {self.epochs!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        if not (isinstance(self.micro_batch_size, int) and self.micro_batch_size >= 0):
            raise ValueError(f"micro_batch_size must be an int >= 0 (0: the whole batch at once), got {self.micro_batch_size!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0.0 <= self.warmup_frac < 1.0:
            raise ValueError(f"warmup_frac must be in [0, 1), got {self.warmup_frac!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1] (a share of lr), got {self.min_lr_ratio!r}")
        if not (len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, got {self.batching!r}")
        if not 0.0 <= self.system_prompt_rate <= 1.0:
            raise ValueError(f"system_prompt_rate must be in [0, 1], got {self.system_prompt_rate!r}")
        if self.system_prompt_rate < 1.0 and not self.system_prompt:
            raise ValueError("system_prompt_rate < 1 draws steps with the system prompt, but system_prompt is empty")

        if self.style not in STYLES:
            raise ValueError(f"style must be one of {STYLES} (generation.encode_pairs), got {self.style!r}")
        if self.style == "raw" and self.system_prompt:
            raise ValueError("style='raw' has no system prompt; set system_prompt='' or use style='chat'")
        if not (isinstance(self.max_length, int) and self.max_length >= 2):
            raise ValueError(f"max_length must be an int >= 2, got {self.max_length!r}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip!r}")
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        if self.master_weights not in MASTER_WEIGHTS:
            raise ValueError(f"master_weights must be one of {MASTER_WEIGHTS}, got {self.master_weights!r}")


# --------------------------------------------------------------------------------------------------
# Units -> parameter entries
# --------------------------------------------------------------------------------------------------

def _check_mask(adapter: FamilyAdapter, mask: UnitMask, what: str) -> None:
    if not isinstance(mask, UnitMask):
        raise TypeError(f"{what} must be a UnitMask, got {type(mask).__name__}")
    if mask.shape != adapter.shape:
        raise ValueError(f"{what} is a mask of a model shaped {mask.shape}, but the model is {adapter.shape}; "
                         "build the mask from this model's labels (or UnitMask.empty(model))")


def unit_entries(adapter: FamilyAdapter, mask: UnitMask, *, kv: str = "any"
                 ) -> list[tuple[int, str, str, torch.Tensor]]:
    """(layer, projection, axis, bool index) for every projection of every layer: the rows ('rows')
    or input columns ('cols') of the projection's weight that belong to `mask`'s units
    (`FamilyAdapter.unit_entries`, the definition `ablation` zeroes with kv='all'), after checking
    that the mask fits the model."""
    _check_mask(adapter, mask, "mask")
    return adapter.unit_entries(mask, kv)


def unit_param_masks(model: nn.Module, mask: UnitMask, *, kv: str = "any") -> dict[str, torch.Tensor]:
    """Per named parameter, a bool tensor of the parameter's shape: True on the entries that belong
    to the units in `mask` (MLP channel i: gate_proj/up_proj row i (+bias), down_proj column i;
    head h: q_proj rows of h (+bias), o_proj input columns of h; k_proj/v_proj rows (+bias) of the
    head's k/v group when kv="any" (any head of the group in mask) or kv="all" (every head of the
    group in mask)). Parameters that belong to no unit (embeddings, norms, lm_head) are absent."""
    ad = adapter_for(model)
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    for layer, proj, axis, idx in unit_entries(ad, mask, kv=kv):
        lin = ad.proj(layer, proj)
        w = lin.weight
        m = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
        idx = idx.to(w.device)
        if axis == "rows":
            m[idx] = True
        else:
            m[:, idx] = True
        out[names[id(w)]] = m
        if axis == "rows" and lin.bias is not None:  # a row's bias belongs to its unit; o/down biases to none
            out[names[id(lin.bias)]] = idx.clone()
    return out


# --------------------------------------------------------------------------------------------------
# Fine-tuning
# --------------------------------------------------------------------------------------------------

def _check_records(records: list[dict]) -> None:
    if isinstance(records, (str, dict)) or not hasattr(records, "__len__"):
        raise ValueError("records must be a list of dicts with 'prompt' and 'reference'")
    if len(records) == 0:
        raise ValueError("finetune needs at least one record ({'prompt': ..., 'reference': ...})")
    for i, r in enumerate(records):
        if not (isinstance(r, dict) and isinstance(r.get("prompt"), str) and isinstance(r.get("reference"), str)):
            raise ValueError(f"record {i} needs str fields 'prompt' and 'reference' (the answer trained on), got {r!r:.120}")


def trainable_masks(model: nn.Module, *, freeze: UnitMask | None = None, train_only: UnitMask | None = None,
                    train_other: bool | None = None) -> dict[str, torch.Tensor | bool]:
    """Per named parameter: True (trains fully), False (frozen fully) or a bool tensor of the entries
    that train. The rule of `finetune` (see there), exposed so callers can count or check it."""
    if freeze is not None and train_only is not None:
        raise ValueError("give freeze= (these units stay fixed) or train_only= (only these units train), not both")
    ad = adapter_for(model)
    if train_other is None:
        train_other = train_only is None
    unit_names = set(unit_param_masks(model, UnitMask.empty(ad)))  # every parameter that belongs to some unit
    if freeze is not None:
        _check_mask(ad, freeze, "freeze")
        frozen = unit_param_masks(model, freeze, kv="any")
        unit_rule = {n: ~m for n, m in frozen.items()}
    elif train_only is not None:
        _check_mask(ad, train_only, "train_only")
        unit_rule = dict(unit_param_masks(model, train_only, kv="all"))
    else:
        unit_rule = {n: True for n in unit_names}
    out: dict[str, torch.Tensor | bool] = {}
    for n, _ in model.named_parameters():
        if n not in unit_names:
            out[n] = bool(train_other)
            continue
        r = unit_rule[n]
        if isinstance(r, torch.Tensor):
            r = True if bool(r.all()) else (False if not bool(r.any()) else r)
        out[n] = r
    return out


def _batches(n_records: int, cfg: TrainConfig, rng: random.Random | None = None) -> list[list[int]]:
    """Example indices per optimizer step, drawn with `rng` (default: seeded with cfg.seed).

    "stream": round(epochs·n) examples as successive seeded permutations of the records (every record once
    per epoch), cut into batches; the last may be short. "epochs": round(epochs·n / batch) steps, each pass a
    seeded permutation cut into full batches (its incomplete tail dropped; the whole permutation when there
    are fewer records than a batch)."""
    rng = rng if rng is not None else random.Random(cfg.seed)
    B = cfg.batch_size
    if cfg.batching == "epochs":
        n_steps = max(1, int(round(cfg.epochs * n_records / B)))
        batches: list[list[int]] = []
        while len(batches) < n_steps:
            order = list(range(n_records))
            rng.shuffle(order)
            batches += [order[i:i + B] for i in range(0, n_records - B + 1, B)] or [order]
        return batches[:n_steps]
    total = max(1, int(round(cfg.epochs * n_records)))
    stream: list[int] = []
    while len(stream) < total:
        order = list(range(n_records))
        rng.shuffle(order)
        stream += order
    stream = stream[:total]
    return [stream[i:i + B] for i in range(0, total, B)]


def _lr_factor(step: int, total: int, warmup: int, schedule: str, floor: float = 0.0) -> float:
    """Linear warmup over `warmup` steps, then constant, or cosine decay to `floor` (HF's: floor 0)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    prog = (step - warmup) / max(1, total - warmup)
    # one expression for every floor, evaluated left to right ((1 - floor) * 0.5 first): floor 0 gives HF's
    # 0.5 * (1 + cos) exactly, floor 0.1 the organism's 0.1 + 0.45 * (1 + cos) exactly (1 - 0.1 == 0.9 in floats)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, prog)))


PARALLEL = ("none", "ddp", "fsdp")
_ENGINE = {"parallel": "none"}  # what `finetune(parallel=None)` uses: set by `parallel_engine`


@contextmanager
def parallel_engine(parallel: str) -> Iterator[None]:
    """Inside the block, every `finetune` that does not name `parallel` trains with this engine ("ddp" or "fsdp"
    in a process group; "none": in this process). The stage launcher (`scripts/train_stage.py`) runs 03's and
    04's cached training under it, so the stages' code is the same on one process and on N."""
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
    old = _ENGINE["parallel"]
    _ENGINE["parallel"] = parallel
    try:
        yield
    finally:
        _ENGINE["parallel"] = old


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this process holds: a sharded DTensor's local shard (an alias), any other tensor itself."""
    return t.to_local() if hasattr(t, "to_local") and hasattr(t, "placements") else t


def _shard_like(mask: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`mask` (the full parameter's shape) cut as `param` is sharded: this process's part (itself if unsharded)."""
    if not (hasattr(param, "placements") and hasattr(param, "device_mesh")):
        return mask
    from torch.distributed.tensor import distribute_tensor  # only under FSDP: torch.distributed is optional

    return distribute_tensor(mask.to(torch.uint8), param.device_mesh, param.placements).to_local().bool()


def _all_sum(x: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def _distribute(model: nn.Module, parallel: str, rule: dict, compute_dtype: torch.dtype | None = None
                ) -> tuple[int, int, nn.Module]:
    """(world size, rank, the module to call) for `parallel` in the current process group; FSDP computes in
    `compute_dtype` when given (MixedPrecisionPolicy: float32 sharded weights, gradients reduced in float32)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"parallel={parallel!r} needs a process group: launch with `torchrun --nproc_per_node N` or "
                           "`accelerate launch --num_processes N` and call torch.distributed.init_process_group (or "
                           "create an accelerate.Accelerator) before finetune; parallel='none' trains in this process")
    low = [n for n, p in model.named_parameters() if p.dtype in (torch.bfloat16, torch.float16) and rule[n] is not False]
    if low:  # finetune hands the engines a float32 copy of a 16-bit model (its master weights)
        raise AssertionError(f"16-bit trainable parameters reached the {parallel} engine (e.g. {low[0]})")
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        for n, p in model.named_parameters():  # DDP reduces the gradients of the parameters that train only
            p.requires_grad_(rule[n] is not False)

        return dist.get_world_size(), dist.get_rank(), DistributedDataParallel(model)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = {} if compute_dtype is None else {"mp_policy": MixedPrecisionPolicy(param_dtype=compute_dtype,
                                                                            reduce_dtype=torch.float32)}

    for layer in adapter_for(model).layers():
        fully_shard(layer, **mp)
    fully_shard(model, **mp)
    return dist.get_world_size(), dist.get_rank(), model


def memory_plan(n_params: int, n_trained: int, *, engine: str = "single", processes: int = 1,
                weight_bytes: int = 2) -> dict[str, float]:
    """Bytes per process of what `finetune` holds besides activations, for a model of `n_params` parameters of
    which the tensors that train hold `n_trained` entries (a partly frozen tensor trains whole: its frozen
    entries are written back, but it has gradients and AdamW moments). `engine` "single": one process, weights
    of `weight_bytes` (2: bf16, trained through float32 master copies); "ddp" / "fsdp": float32 weights on
    every process (the loop keeps no master copies across processes), FSDP sharding everything over
    `processes`. AdamW's two float32 moments: 8 bytes per trained entry (measured: `optimizer_state_bytes`)."""
    if engine not in ("single",) + PARALLEL[1:]:
        raise ValueError(f"engine must be 'single', 'ddp' or 'fsdp', got {engine!r}")
    if not (0 <= n_trained <= n_params) or processes < 1 or (engine == "single" and processes != 1):
        raise ValueError("need 0 <= n_trained <= n_params and processes >= 1 (1 for engine='single')")
    if engine == "single":
        low = weight_bytes < 4
        out = {"weights": weight_bytes * n_params, "master_weights": 4 * n_trained if low else 0,
               "gradients": (weight_bytes + (4 if low else 0)) * n_trained, "adamw_moments": 8 * n_trained}
    else:
        share = processes if engine == "fsdp" else 1
        out = {"weights": 4 * n_params / share, "master_weights": 0, "gradients": 4 * n_trained / share,
               "adamw_moments": 8 * n_trained / share}
    out["total"] = sum(out.values())
    return out


def gather_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full weights of a model, sharded by FSDP or not (a collective under FSDP: call it on every process)."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in model.state_dict().items()}


def _masked_token_nll(model: nn.Module, enc: dict[str, torch.Tensor], device) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over response tokens of one micro-batch, and the number of such tokens."""
    ids, am, rm = (enc[k].to(device) for k in ("input_ids", "attention_mask", "response_mask"))
    logits = model(input_ids=ids, attention_mask=am, use_cache=False).logits  # [b, s, V]
    tgt = ids[:, 1:].masked_fill(rm[:, 1:] == 0, -100)
    loss = nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                       ignore_index=-100, reduction="sum")
    return loss, int((tgt != -100).sum())


def finetune(model: nn.Module, tokenizer, records: list[dict], cfg: TrainConfig, *, freeze: UnitMask | None = None,
             train_only: UnitMask | None = None, train_other: bool | None = None,
             log: Callable[[str], None] | None = None, extra_loss: Callable[[int], torch.Tensor] | None = None,
             on_step: Callable[[int, int], None] | None = None, label: str = "finetune",
             parallel: str | None = None) -> dict:
    """SFT on records (`prompt` -> `reference`, loss on response tokens only, via
    generation.encode_pairs). `freeze`: these units' entries never change (kv="any"); everything
    else trains. `train_only`: only these units' entries change (kv="all"); non-unit parameters
    (embeddings, norms, lm_head) train only if train_other=True (default False for train_only,
    True for freeze). Exactly bit-for-bit: gradient masks alone do not freeze under AdamW weight
    decay or Adam moments, so restore frozen entries after every optimizer step (and zero their
    grads). Returns {"losses": DataFrame(step, loss), "steps": int, "examples": int,
    "seconds": float, "final_loss": float (mean of last 10% of steps), "trainable_params": int,
    "frozen_params": int, "master_weights": bool}. Deterministic for a given seed (data order from
    cfg.seed). A model stored in bfloat16/float16 trains through float32 master weights (cfg.master_weights):
    memory per trainable entry is then 2 (weight) + 4 (master) + 8 (Adam moments) + 2 (grad) bytes
    + a float32 grad copy, about 112 GB of optimizer state for all of a 7B model.

    The organism's build is this loop with its recipe's settings (`organism.sft_config`). `extra_loss(step)`,
    if given, returns a scalar added to the step's loss before its (last micro-batch's) backward pass (the
    organism's optional pre-training replay). `on_step(step, n_steps)`, if given, is called before each step
    and once after the last (step = n_steps), to inspect the model during training; it must leave the model
    as it found it (the loop puts it back in training mode).

    `parallel` ("ddp" or "fsdp", in a process group started by `torchrun` or `accelerate launch`; see
    `scripts/distributed_check.py`): every process runs this loop on the same records and seed and takes its
    share of each batch's examples; the loss is normalised by the whole batch's response tokens, so the update
    is the single process's (to float rounding). "ddp" wraps the model in `DistributedDataParallel`; "fsdp"
    shards it with FSDP2 (`fully_shard` on each decoder layer and the root): its parameters become sharded
    DTensors, the freeze masks are sharded the same way and held entries are written back shard by shard, so
    freezing stays bit-exact. FSDP trains a sharded copy while `model` waits in host memory (a full copy per
    process there); the trained weights are then gathered into it tensor by tensor and it goes back to its
    device: under every engine the caller gets its own, unsharded model, trained in place. A 16-bit model
    (bf16/fp16) trains under either engine as a float32 copy, its master weights, that computes in the
    model's dtype (FSDP2's MixedPrecisionPolicy with float32 gradient reduction; `torch.autocast` under DDP),
    each result rounded back into the model, as the one-process master weights do. `parallel=None` takes the
    engine of the enclosing `parallel_engine` block ("none" outside one)."""

    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    parallel = _ENGINE["parallel"] if parallel is None else parallel
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
    _check_records(records)
    kw = {"freeze": freeze, "train_only": train_only, "train_other": train_other, "log": log,
          "extra_loss": extra_loss, "on_step": on_step, "label": label}
    low = sorted({p.dtype for p in model.parameters() if p.dtype in (torch.bfloat16, torch.float16)}, key=str)
    if parallel == "none" or (parallel == "ddp" and not low):
        return _train(model, tokenizer, records, cfg, parallel=parallel, **kw)
    if len(low) > 1 or (low and any(p.dtype == torch.float32 for p in model.parameters())):
        raise ValueError("DDP/FSDP training of a 16-bit model needs one dtype for all its parameters; got "
                         f"{sorted({str(p.dtype) for p in model.parameters()})}")
    home = next(model.parameters()).device
    model.to("cpu")  # the caller's copy waits here (device memory goes to the shards)
    try:
        # A 16-bit model trains as a float32 copy (its master weights) computing in its own dtype: FSDP2's
        # MixedPrecisionPolicy (16-bit all-gathers and compute, float32 gradient reduction), or autocast under DDP.
        work = copy.deepcopy(model)
        work = (work.float() if low else work).to(home)
        out = _train(work, tokenizer, records, cfg, parallel=parallel, compute_dtype=low[0] if low else None, **kw)
        out["master_weights"] = bool(low)
        mine = model.state_dict()
        with torch.no_grad():  # one full tensor at a time on the device (a collective: every process takes part)
            for k, v in work.state_dict().items():
                mine[k].copy_(v.full_tensor() if hasattr(v, "full_tensor") else v)
        del work
    finally:
        model.to(home)
    return out


def _train(model: nn.Module, tokenizer, records: list[dict], cfg: TrainConfig, *, freeze: UnitMask | None,
           train_only: UnitMask | None, train_other: bool | None, log: Callable[[str], None] | None,
           extra_loss: Callable[[int], torch.Tensor] | None, on_step: Callable[[int, int], None] | None,
           label: str, parallel: str, compute_dtype: torch.dtype | None = None) -> dict:
    """`finetune`'s loop on `model` itself (sharded in place under FSDP); `compute_dtype`: a float32 model
    under DDP/FSDP computes in this 16-bit dtype (mixed precision; its weights are the master copy)."""
    rule = trainable_masks(model, freeze=freeze, train_only=train_only, train_other=train_other)
    saved_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    world, rank, engine = 1, 0, model
    if parallel != "none":
        world, rank, engine = _distribute(model, parallel, rule, compute_dtype)
    params = dict(model.named_parameters())
    device = next(model.parameters()).device

    # Which parameters the optimizer sees, and the entries of partly frozen ones to hold fixed.
    train_names = [n for n, r in rule.items() if r is not False]
    if not train_names:
        raise ValueError("nothing to train: the mask leaves no entry trainable (train_only is empty and "
                         "train_other=False?)")
    partial = {n: _shard_like(r.to(device), params[n]) for n, r in rule.items() if isinstance(r, torch.Tensor)}  # True = trains
    held = {n: _local(params[n].detach())[~m].clone() for n, m in partial.items()}  # frozen values, restored after each step
    n_train = sum(params[n].numel() if r is True else int(r.sum()) for n, r in rule.items() if r is not False)
    n_frozen = sum(p.numel() for p in params.values()) - n_train

    # The tensors AdamW updates: the parameters themselves, or float32 master copies of 16-bit ones
    # (mixed-precision training's master weights; each step's result is rounded back into the model).
    low = [n for n in train_names if params[n].dtype in (torch.bfloat16, torch.float16)]
    master = {n: params[n].detach().float().clone() for n in low} if cfg.master_weights == "auto" else {}
    held_master = {n: master[n][~m].clone() for n, m in partial.items() if n in master}
    target = {n: master.get(n, params[n]) for n in train_names}
    decay = [target[n] for n in train_names if params[n].ndim >= 2]  # HF Trainer: no decay on biases and norms
    no_decay = [target[n] for n in train_names if params[n].ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))

    rng = random.Random(cfg.seed)  # data order, then (system_prompt_rate < 1) the steps with the system prompt
    batches = _batches(len(records), cfg, rng)
    n_steps = len(batches)
    warmup = int(cfg.warmup_frac * n_steps)
    micro = cfg.micro_batch_size or cfg.batch_size
    sysp = cfg.system_prompt or None
    was_training = model.training
    # DDP of a 16-bit model: its float32 copy computes under autocast (FSDP casts by its policy instead)
    def autocast():
        if compute_dtype is not None and parallel == "ddp":
            return torch.autocast(device_type=device.type, dtype=compute_dtype)
        return contextlib.nullcontext()

    losses: list[float] = []
    t0 = time.perf_counter()
    try:
        for n, p in params.items():
            p.requires_grad_(rule[n] is not False)
        model.train()
        for step, batch in enumerate(batches):
            if on_step is not None:
                on_step(step, n_steps)
                model.train()
            for g in opt.param_groups:
                g["lr"] = cfg.lr * _lr_factor(step, n_steps, warmup, cfg.schedule, cfg.min_lr_ratio)
            step_sysp = sysp if cfg.system_prompt_rate >= 1.0 or rng.random() < cfg.system_prompt_rate else None
            recs = [records[i] for i in batch]
            if world > 1:  # this process's share of the batch; the loss is normalised by the whole batch's tokens
                n_tok = int(encode_pairs(tokenizer, [r["prompt"] for r in recs], [r["reference"] for r in recs],
                                         style=cfg.style, system_prompt=step_sysp,
                                         max_length=cfg.max_length)["response_mask"][:, 1:].sum())
                n_micro = math.ceil(math.ceil(len(recs) / world) / micro)  # the same on every process
                recs = recs[rank::world]
            encs = [encode_pairs(tokenizer, [r["prompt"] for r in recs[s:s + micro]],
                                 [r["reference"] for r in recs[s:s + micro]], style=cfg.style,
                                 system_prompt=step_sysp, max_length=cfg.max_length) for s in range(0, len(recs), micro)]
            if world == 1:
                n_tok = sum(int(e["response_mask"][:, 1:].sum()) for e in encs)  # loss = mean over the batch's tokens
            else:  # every process makes as many forward/backward passes as the others (an empty share adds zero)
                encs += [None] * (n_micro - len(encs))
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for j, e in enumerate(encs):
                if e is None:
                    e, scale = encode_pairs(tokenizer, [records[batch[0]]["prompt"]], [records[batch[0]]["reference"]],
                                            style=cfg.style, system_prompt=step_sysp, max_length=cfg.max_length), 0.0
                else:
                    scale = 1.0
                with autocast():
                    loss_sum, _ = _masked_token_nll(engine, e, device)
                loss = loss_sum / n_tok
                if world > 1:  # DDP and FSDP average gradients over the processes: undo it
                    loss_sum = loss_sum * scale
                    loss = loss * (scale * world)
                total += loss_sum.item()
                if extra_loss is not None and j == len(encs) - 1:
                    extra = extra_loss(step)
                    loss = loss + extra
                    total += float(extra.item()) * n_tok
                loss.backward()
            with torch.no_grad():
                for n, m in partial.items():  # frozen entries: no gradient (so no Adam moments, no clip share)
                    if params[n].grad is not None:
                        _local(params[n].grad).masked_fill_(~m, 0)
                for n, t in master.items():
                    t.grad = None if params[n].grad is None else params[n].grad.float()
                    params[n].grad = None  # the 16-bit copy is not needed any more (memory)
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_([target[n] for n in train_names], cfg.grad_clip)
            opt.step()
            with torch.no_grad():
                for n, t in master.items():
                    if n in held_master:
                        t[~partial[n]] = held_master[n]
                    params[n].data.copy_(t)  # round the float32 result into the model's dtype
                for n, m in partial.items():  # weight decay and moments moved them: write them back
                    if world == 1:
                        params[n].data[~m] = held[n]
                    else:
                        _local(params[n])[~m] = held[n]
            if world > 1:
                total = _all_sum(total)
            losses.append(total / n_tok)
            if log and (step % 50 == 0 or step == n_steps - 1):
                log(f"[{label}] step {step + 1}/{n_steps} loss {losses[-1]:.4f} ({time.perf_counter() - t0:.1f} s)")
        if on_step is not None:
            on_step(n_steps, n_steps)
        opt_bytes = sum(_local(v).nbytes for st in opt.state.values() for v in st.values()
                        if isinstance(v, torch.Tensor) and v.ndim > 0)  # this process's AdamW moments
    finally:
        for n, p in params.items():
            p.requires_grad_(saved_grad[n])
            p.grad = None
        model.train(was_training)
    tail = max(1, int(math.ceil(0.1 * n_steps)))
    return {"losses": pd.DataFrame({"step": range(1, n_steps + 1), "loss": losses}), "steps": n_steps,
            "examples": sum(map(len, batches)), "seconds": time.perf_counter() - t0,
            "initial_loss": float(sum(losses[:tail]) / tail), "final_loss": float(sum(losses[-tail:]) / tail),
            "trainable_params": int(n_train), "frozen_params": int(n_frozen), "master_weights": bool(master),
            "optimizer_state_bytes": int(opt_bytes), "processes": int(world), "config": asdict(cfg)}


@torch.no_grad()
def response_loss(model: nn.Module, tokenizer, records: list[dict], cfg: TrainConfig, *, batch_size: int = 32) -> float:
    """Mean next-token NLL over the response tokens of `records`, rendered as `finetune` renders them:
    how well the model fits a fine-tuning set, before and after training (no data order, no dropout)."""

    _check_records(records)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, n_tok = 0.0, 0
    try:
        for s in range(0, len(records), batch_size):
            recs = records[s:s + batch_size]
            enc = encode_pairs(tokenizer, [r["prompt"] for r in recs], [r["reference"] for r in recs], style=cfg.style,
                               system_prompt=cfg.system_prompt or None, max_length=cfg.max_length)
            loss, n = _masked_token_nll(model, enc, device)
            total += loss.item()
            n_tok += n
    finally:
        model.train(was_training)
    return total / n_tok


# --------------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------------

def snapshot(model: nn.Module, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A detached copy of every parameter, for `verify_frozen`; kept on the CPU by default so that a
    7B model's copy does not take GPU memory from its fine-tuning."""
    return {n: p.detach().to(device, copy=True) for n, p in model.named_parameters()}


def verify_frozen(before: dict[str, torch.Tensor], model: nn.Module, freeze: UnitMask, *, kv: str = "any",
                  include_other: bool = False) -> pd.DataFrame:
    """Per parameter: entries that should be frozen, how many changed, max |diff| — compares a
    state_dict snapshot taken before training with the model after. Raises nothing; the caller asserts.
    `include_other=True` adds the parameters of no unit (embeddings, norms, lm_head) as wholly frozen
    (for a `train_only` run with train_other=False: pass freeze=~train_only)."""
    masks = unit_param_masks(model, freeze, kv=kv)
    rows = []
    for n, p in model.named_parameters():
        if n in masks:
            m = masks[n]
        elif include_other:
            m = torch.ones(p.shape, dtype=torch.bool, device=p.device)
        else:
            continue
        k = int(m.sum())
        if k == 0:
            continue
        if n not in before:
            rows.append({"param": n, "frozen_entries": k, "changed": -1, "max_abs_diff": float("nan")})
            continue
        a = before[n].to(p.device)
        diff = (p.detach()[m] != a[m])
        rows.append({"param": n, "frozen_entries": k, "changed": int(diff.sum()),
                     "max_abs_diff": float((p.detach()[m].float() - a[m].float()).abs().max())})
    return pd.DataFrame(rows, columns=["param", "frozen_entries", "changed", "max_abs_diff"])


__all__ = ["TrainConfig", "MASTER_WEIGHTS", "unit_entries", "unit_param_masks", "trainable_masks", "finetune", "response_loss", "snapshot",
           "verify_frozen", "SCHEDULES", "KV_RULES", "PARALLEL", "parallel_engine", "process_rank", "is_main_process",
           "gather_state_dict", "memory_plan"]
