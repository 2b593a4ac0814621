"""Reading the reasoning direction out of the residual stream (paper Sec. 3; Figs 2, 3, 4, 7).

- `add_hooks`: the only way hooks are put on a model here; a context manager that removes them on
  exit, error included (refusal_direction's `add_hooks`).
- `capture_residual`: the residual stream at every point (embeddings, then the output of each
  block), batched with right padding, read at the last real token or averaged over the sequence.
  Point `i` is `output_hidden_states[i]` of transformers, except that the last point is the block
  output *before* the final norm (transformers replaces `hidden_states[-1]` by the normed state).
- `continuation_distances`: the paper's protocol: cosine distance between the state of a clean
  query and that of the query followed by the first k tokens of a refusal or a compliance.
- `probe_layers`: a logistic-regression probe per layer with a held-out split by group (no prompt
  is in both halves): the "binary classifier" of SSAH made literal.
- `refusal_directions` / `direction_scores`: Arditi et al.'s difference in means, and where a state
  falls on it (0 = the benign mean, 1 = the harmful mean).
- `generate_with_residual`: greedy generation that records the residual at every generated token,
  to ask whether the fulfil/refuse choice is fixed at the first tokens or revisited.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from typing import Callable

import pandas as pd
import torch
from torch import nn

from . import generation
from .models import adapter_for

HookSpec = tuple[nn.Module, Callable]


# --------------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------------

@contextmanager
def add_hooks(
    forward_hooks: Iterable[HookSpec] = (),
    forward_pre_hooks: Iterable[HookSpec] = (),
):
    """Register forward (pre-)hooks for the duration of a `with` block; always removed on exit."""
    handles = []
    try:
        for module, fn in forward_pre_hooks:
            handles.append(module.register_forward_pre_hook(fn))
        for module, fn in forward_hooks:
            handles.append(module.register_forward_hook(fn))
        yield handles
    finally:
        for h in handles:
            h.remove()


def n_hooks(model: nn.Module) -> int:
    """Number of forward and pre-forward hooks on any module of `model` (0 when nothing leaked)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def residual_points(model: nn.Module) -> list[nn.Module]:
    """Modules whose outputs are the residual stream: the embedding, then each decoder block.

    Point 0 is the token embedding, point i (1..n_layers) the output of block i-1, so the indices
    match transformers' `output_hidden_states`.
    """
    return [model.get_input_embeddings(), *adapter_for(model).layers()]


def _tensor_of(output) -> torch.Tensor:
    # Decoder blocks return a tensor in transformers 5 and a tuple (hidden, ...) in older versions.
    return output[0] if isinstance(output, (tuple, list)) else output


# --------------------------------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------------------------------

def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `input_ids` and `attention_mask` (long `[batch, seq]`) of token-id lists."""
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("pad_right needs non-empty token lists")
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def _reduce(h: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    # h: [batch, seq, d]; mask: [batch, seq] (right padded) -> [batch, d]
    if how == "last":
        last = mask.sum(1) - 1
        return h[torch.arange(h.shape[0], device=h.device), last]
    if how == "mean":
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1)
    raise ValueError(f"position must be 'last' or 'mean', got {how!r}")


@torch.no_grad()
def capture_residual(
    model: nn.Module,
    rows: Sequence[Sequence[int]],
    *,
    position: str = "last",
    points: Sequence[int] | None = None,
    batch_size: int = 32,
    pad_id: int = 0,
) -> torch.Tensor:
    """Float32 `[n, n_points, d_model]` residual states of token-id lists, read through hooks.

    `position="last"`: the state at each sequence's last real token; `"mean"`: averaged over its
    real tokens. `points` selects residual points (default: all, 0 = embeddings ... n_layers).
    Sequences are right-padded, so positions are the natural 0..len-1 and padding (after the
    real tokens of a causal model) changes nothing.
    """
    mods = residual_points(model)
    idx = list(range(len(mods))) if points is None else [int(p) for p in points]
    if any(not 0 <= p < len(mods) for p in idx):
        raise IndexError(f"residual points must lie in [0, {len(mods)}), got {idx}")
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    store: dict[int, torch.Tensor] = {}
    mask_now: list[torch.Tensor] = []

    def make_hook(p: int):
        def hook(_module, _inputs, output):
            store[p] = _reduce(_tensor_of(output), mask_now[0], position).float().cpu()
        return hook

    was_training = model.training
    model.eval()
    try:
        with add_hooks([(mods[p], make_hook(p)) for p in idx]):
            for s in range(0, len(rows), batch_size):
                ids, mask = pad_right(rows[s : s + batch_size], pad_id)
                ids, mask = ids.to(device), mask.to(device)
                mask_now[:] = [mask]
                store.clear()
                model(input_ids=ids, attention_mask=mask, use_cache=False)
                out.append(torch.stack([store[p] for p in idx], dim=1))  # [b, n_points, d]
    finally:
        model.train(was_training)
    return torch.cat(out)


def prompt_token_ids(
    tokenizer, prompts: Sequence[str], *, style: str = "chat", system_prompt: str | None = None,
    prefill: str | Sequence[str] | None = None,
) -> list[list[int]]:
    """Token ids of each rendered prompt (+ prefill), exactly as `generation` feeds them to a model."""
    rows = []
    for s in range(0, len(prompts), 64):
        chunk = list(prompts[s : s + 64])
        pre = generation.expand_prefill(prefill, len(prompts))[s : s + 64]
        enc = generation.encode_prompts(tokenizer, chunk, style=style, system_prompt=system_prompt, prefill=pre)
        for ids, m in zip(enc["input_ids"], enc["attention_mask"]):
            rows.append(ids[m.bool()].tolist())
    return rows


def continuation_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a continuation string as it follows the answer prompt (no special tokens)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# --------------------------------------------------------------------------------------------------
# The paper's protocol: cosine distance as the continuation grows
# --------------------------------------------------------------------------------------------------

def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - cos(a, b) along the last dimension (0 = same direction, 1 = orthogonal, 2 = opposite)."""
    a, b = a.double(), b.double()
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12)
    return (1.0 - cos).float()


def continuation_distances(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    continuations: dict[str, Sequence[str]],
    lengths: Sequence[int] = (2, 4, 6, 8, 10),
    *,
    style: str = "chat",
    system_prompt: str | None = None,
    position: str = "last",
    batch_size: int = 32,
) -> pd.DataFrame:
    """Cosine distance between the clean query and the query + first k continuation tokens.

    `continuations` maps a name ("refusal", "compliance") to one string per prompt. A prompt whose
    continuation has fewer than k tokens is left out at that k (never padded with other text).
    Returns one row per (prompt, continuation, n_tokens, point): columns `prompt_idx`,
    `continuation`, `n_tokens`, `point` (0 = embeddings, i = block i) and `distance`.
    """
    lengths = sorted({int(k) for k in lengths})
    if not lengths or lengths[0] < 1:
        raise ValueError(f"continuation lengths must be positive, got {lengths}")
    base = prompt_token_ids(tokenizer, prompts, style=style, system_prompt=system_prompt)
    rows: list[list[int]] = list(base)
    meta: list[tuple[int, str, int]] = [(i, "", 0) for i in range(len(base))]
    for name, texts in continuations.items():
        if len(texts) != len(prompts):
            raise ValueError(f"continuation {name!r}: {len(texts)} strings for {len(prompts)} prompts")
        for i, text in enumerate(texts):
            cont = continuation_ids(tokenizer, text)
            for k in lengths:
                if len(cont) >= k:
                    rows.append(base[i] + cont[:k])
                    meta.append((i, name, k))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    H = capture_residual(model, rows, position=position, batch_size=batch_size, pad_id=pad)  # [n, P, d]
    clean = H[: len(base)]
    n_points = H.shape[1]
    frames = []
    for j in range(len(base), len(rows)):
        i, name, k = meta[j]
        d = cosine_distance(clean[i], H[j])  # [P]
        frames.append(pd.DataFrame({"prompt_idx": i, "continuation": name, "n_tokens": k,
                                    "point": range(n_points), "distance": d.numpy()}))
    return pd.concat(frames, ignore_index=True)


def distance_gap(distances: pd.DataFrame, n_tokens: int | None = None) -> pd.DataFrame:
    """Per point: mean distance to the refusal and the compliance continuation and |difference|
    (paper Fig 4). `n_tokens` picks one continuation length (default: the longest)."""
    k = int(distances["n_tokens"].max()) if n_tokens is None else int(n_tokens)
    d = distances[distances["n_tokens"] == k]
    wide = d.groupby(["point", "continuation"])["distance"].mean().unstack("continuation")
    wide["abs_gap"] = (wide["refusal"] - wide["compliance"]).abs()
    wide["closer_to"] = wide[["refusal", "compliance"]].idxmin(axis=1)
    return wide


# --------------------------------------------------------------------------------------------------
# Linear probes
# --------------------------------------------------------------------------------------------------

def group_split(groups: Sequence, test_frac: float = 0.3, seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices of a train/test split in which no group (prompt, activity) is on both sides.

    Groups are shuffled with `seed` and whole groups go to the test side until `test_frac` of the
    groups is there (at least one group on each side).
    """
    if not 0 < test_frac < 1:
        raise ValueError(f"test_frac must be in (0, 1), got {test_frac}")
    uniq = sorted(set(map(str, groups)))
    if len(uniq) < 2:
        raise ValueError("a held-out split needs at least two distinct groups")
    random.Random(seed).shuffle(uniq)
    n_test = min(max(1, round(test_frac * len(uniq))), len(uniq) - 1)
    test_groups = set(uniq[:n_test])
    train = [i for i, g in enumerate(groups) if str(g) not in test_groups]
    test = [i for i, g in enumerate(groups) if str(g) in test_groups]
    return train, test


def fit_logistic(
    X: torch.Tensor, y: torch.Tensor, *, l2: float = 1e-2, max_iter: int = 200,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """L2-regularised logistic regression on standardised features, fitted full-batch with L-BFGS.

    Returns (w [d], b [], mean [d], std [d]); predict with `predict_logistic`. The classes are
    weighted equally, so an imbalanced set does not reward the majority guess.
    """
    X = X.double()
    y = y.double()
    if set(y.unique().tolist()) - {0.0, 1.0}:
        raise ValueError("labels must be 0/1")
    mu, sd = X.mean(0), X.std(0).clamp_min(1e-6)
    Z = (X - mu) / sd
    pos = y.mean().clamp(1e-6, 1 - 1e-6)
    weight = torch.where(y > 0, 0.5 / pos, 0.5 / (1 - pos))
    w = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (weight * nn.functional.binary_cross_entropy_with_logits(Z @ w + b, y, reduction="none")).mean()
        loss = loss + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach(), mu, sd


def predict_logistic(params, X: torch.Tensor) -> torch.Tensor:
    """P(y=1) under `fit_logistic`'s parameters."""
    w, b, mu, sd = params
    return torch.sigmoid(((X.double() - mu) / sd) @ w + b)


def balanced_accuracy(y: torch.Tensor, pred: torch.Tensor) -> float:
    """Mean of the per-class recalls (0.5 = chance for two classes, whatever the class sizes)."""
    y, pred = y.long(), pred.long()
    recalls = [float((pred[y == c] == c).float().mean()) for c in y.unique().tolist()]
    return sum(recalls) / len(recalls)


def probe_layers(
    H: torch.Tensor, y: torch.Tensor, groups: Sequence, *, test_frac: float = 0.3, seed: int = 0,
    l2: float = 1e-2,
) -> pd.DataFrame:
    """Per residual point, a logistic probe's held-out balanced accuracy (`H`: `[n, P, d]`, `y`: 0/1).

    The split is by group (`group_split`), so no prompt or activity is both trained and tested on.
    """
    train, test = group_split(groups, test_frac, seed)
    ytr, yte = y[train], y[test]
    if len(ytr.unique()) < 2 or len(yte.unique()) < 2:
        raise ValueError("both classes must be on both sides of the split; use more groups or another seed")
    rows = []
    for p in range(H.shape[1]):
        params = fit_logistic(H[train, p], ytr, l2=l2)
        pr_tr = (predict_logistic(params, H[train, p]) > 0.5).long()
        pr_te = (predict_logistic(params, H[test, p]) > 0.5).long()
        rows.append({"point": p, "train_acc": balanced_accuracy(ytr, pr_tr), "test_acc": balanced_accuracy(yte, pr_te),
                     "n_train": len(train), "n_test": len(test)})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# Difference-in-means refusal direction
# --------------------------------------------------------------------------------------------------

def refusal_directions(H_harmful: torch.Tensor, H_benign: torch.Tensor) -> dict[str, torch.Tensor]:
    """Arditi et al.'s direction per point: mean(harmful) - mean(benign), with both means.

    Inputs `[n, P, d]`; returns `direction`, `mu_harmful`, `mu_benign`, each `[P, d]`.
    """
    mu_h, mu_b = H_harmful.double().mean(0), H_benign.double().mean(0)
    return {"direction": (mu_h - mu_b).float(), "mu_harmful": mu_h.float(), "mu_benign": mu_b.float()}


def direction_scores(H: torch.Tensor, dirs: dict[str, torch.Tensor], point: int | None = None) -> torch.Tensor:
    """Where states fall on the direction: 0 at the benign mean, 1 at the harmful mean.

    `H`: `[n, P, d]` -> `[n, P]`; or, with `point`, `H`: `[..., d]` states of that point -> `[...]`.
    Score = (h - mu_benign)·r / (r·r), r = mu_harmful - mu_benign: a projection on r rescaled so
    the two training means sit at 0 and 1 (0.5 is the midpoint threshold).
    """
    r, mu_b = dirs["direction"].double(), dirs["mu_benign"].double()
    if point is not None:
        r, mu_b = r[point], mu_b[point]
        return ((H.double() - mu_b) @ r / (r @ r)).float()
    return (((H.double() - mu_b) * r).sum(-1) / (r * r).sum(-1)).float()


# --------------------------------------------------------------------------------------------------
# The direction at every generated token
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def generate_with_residual(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    point: int,
    style: str = "chat",
    system_prompt: str | None = None,
    prefill: str | Sequence[str] | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 32,
) -> list[dict]:
    """Greedy answers with the residual state (at residual point `point`) that chose each token.

    Per prompt: `tokens` (generated ids, eos excluded), `text` (prefill + answer, as
    `generation.generate` returns it) and `states` `[len(tokens) + 1, d]` where row t is the
    state at the position that predicts generated token t (row 0: the last prompt/prefill token,
    the point where SSAH says the choice is made). Rows stop at eos.
    """
    mods = residual_points(model)
    if not 0 < point < len(mods):
        raise IndexError(f"point must be a block output in [1, {len(mods)}), got {point}")
    device = next(model.parameters()).device
    pad = generation.pad_token_id(tokenizer)
    eos = tokenizer.eos_token_id
    prefills = generation.expand_prefill(prefill, len(prompts))
    steps: list[torch.Tensor] = []

    def hook(_m, _i, output):
        steps.append(_tensor_of(output)[:, -1, :].float().cpu())  # [b, d]: the newest position

    results: list[dict] = []
    was_training = model.training
    model.eval()
    try:
        with add_hooks([(mods[point], hook)]):
            for s in range(0, len(prompts), batch_size):
                chunk, pre = list(prompts[s : s + batch_size]), prefills[s : s + batch_size]
                enc = generation.encode_prompts(tokenizer, chunk, style=style, system_prompt=system_prompt, prefill=pre)
                width = enc["input_ids"].shape[1]
                steps.clear()
                gen = model.generate(
                    input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                    max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=eos,
                )
                S = torch.stack(steps, dim=1)  # [b, n_forward, d]
                for b, (p_text, row) in enumerate(zip(pre, gen[:, width:].tolist())):
                    if eos is not None and eos in row:
                        row = row[: row.index(eos)]
                        n_states = len(row) + 1  # the state that chose eos is kept
                    else:
                        n_states = len(row)
                    ids = (generation.text_ids(tokenizer, p_text) if p_text else []) + row
                    results.append({"tokens": row, "text": tokenizer.decode(ids, skip_special_tokens=True).strip(),
                                    "states": S[b, :n_states].clone()})
    finally:
        model.train(was_training)
    return results
