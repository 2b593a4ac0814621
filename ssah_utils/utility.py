"""Utility metrics that measure utility, for real models.

`evaluation._keyword_verdict` calls any benign answer that does not refuse "correct", so on real data
the "accuracy" it reports is a non-refusal rate. The metrics here score the answer itself:

- **GSM8K by the final number** (`gsm8k_score`): the gold answer is the number after `####` in the
  dataset's solution; a response is correct when the last number it writes equals it, as lm-eval's
  gsm8k `flexible-extract` filter does (last match of a number pattern; `$` and thousands commas
  removed; a trailing period dropped). Numbers are compared as exact decimals ("18" == "18.00").
  On a 135M model GSM8K accuracy is near 0 and says little: perplexity and response NLL carry utility.
- **WikiText-2 perplexity** (`wikitext2_perplexity`): the paper's utility metric. The test split is
  joined into one token stream and cut into **fixed, non-overlapping windows** of `window` tokens
  (no stride; the first token of each window is context only); perplexity is exp of the mean NLL over
  the scored tokens of the first `n_windows` windows (all windows when None). The file is the
  tokenised v1 variant with `<unk>`, so compare changes between models, not absolute values.
- **Response NLL** on held-out Alpaca answers (`response_nll`): `training.response_loss`, the mean
  next-token NLL of the reference answers given the prompt, in the chat format the model is tuned in.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path

import pandas as pd
import torch
from .generation import generate
from .datasets import dataset_path
from .training import TrainConfig, response_loss

# lm-eval gsm8k flexible-extract: r"(-?[$0-9.,]{2,})|(-?[0-9]+)", last match.
_NUMBER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_GOLD = re.compile(r"####\s*(-?[$0-9.,]+)")


def _to_decimal(s: str) -> Decimal | None:
    s = s.replace("$", "").replace(",", "").rstrip(".")
    if not re.fullmatch(r"-?\d+(\.\d+)?|-?\.\d+", s):
        return None
    try:
        return Decimal(s)
    except InvalidOperation:
        return None


def gold_answer(solution: str) -> str:
    """The number after `####` in a GSM8K solution (or the string itself when it is a bare number)."""
    m = _GOLD.search(str(solution))
    s = m.group(1) if m else str(solution).strip()
    if _to_decimal(s) is None:
        raise ValueError(f"no gold number in {solution!r:.80}: expected a GSM8K solution ending '#### <number>'")
    return s.replace("$", "").replace(",", "").rstrip(".")


def extract_final_number(response: str) -> str | None:
    """The last number in `response` (lm-eval's flexible extract), normalised; None when there is none."""
    for m in reversed(list(_NUMBER.finditer(str(response)))):
        s = m.group(0)
        if _to_decimal(s) is not None:
            return s.replace("$", "").replace(",", "").rstrip(".")
    return None


def gsm8k_correct(response: str, gold: str) -> bool:
    """True when the response's last number equals the gold answer (exact decimal equality)."""
    got = extract_final_number(response)
    if got is None:
        return False
    return _to_decimal(got) == _to_decimal(gold_answer(gold))


def gsm8k_score(model, tokenizer, records: Sequence[dict], *, max_new_tokens: int = 256, batch_size: int = 16,
                system_prompt: str | None = None) -> pd.DataFrame:
    """One row per GSM8K record (`prompt`, `reference` = gold number or solution): the greedy response
    (chat format, zero-shot), the extracted number and whether it is correct."""

    records = list(records)
    if not records:
        raise ValueError("no GSM8K records")
    golds = [gold_answer(r["reference"]) for r in records]  # fail on a bad record before generating
    responses = generate(model, tokenizer, [r["prompt"] for r in records], style="chat", system_prompt=system_prompt,
                         max_new_tokens=max_new_tokens, batch_size=batch_size)
    return pd.DataFrame([{"id": r.get("id", ""), "prompt": r["prompt"], "gold": g, "response": resp,
                          "extracted": extract_final_number(resp), "correct": gsm8k_correct(resp, g)}
                         for r, g, resp in zip(records, golds, responses)])


def wikitext2_text(split: str = "test", data_root: str | Path | None = None) -> str:
    """The WikiText-2 split as one string (its lines joined by newlines)."""

    if split not in ("test", "valid"):
        raise ValueError(f"split must be 'test' or 'valid', got {split!r}")
    path = dataset_path("wikitext2" if split == "test" else "wikitext2_valid", data_root)
    return path.read_text(encoding="utf-8")


@torch.no_grad()
def window_perplexity(model, tokenizer, text: str, *, window: int = 512, n_windows: int | None = None,
                      batch_size: int = 4) -> dict:
    """exp(mean NLL) over fixed, non-overlapping `window`-token windows of `text` (tokenised once, no
    special tokens); the first `n_windows` windows (all full windows when None). Returns
    {"perplexity", "nll", "tokens_scored", "windows", "window"}."""
    if window < 2:
        raise ValueError("window must be >= 2")
    if n_windows is not None and n_windows < 1:
        raise ValueError("n_windows must be >= 1 (or None for all)")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    avail = len(ids) // window
    if avail == 0:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one window of {window}")
    n = avail if n_windows is None else n_windows
    if n > avail:
        raise ValueError(f"asked for {n} windows of {window} tokens but the text has only {avail}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        for s in range(0, n, batch_size):
            rows = [ids[(s + k) * window:(s + k + 1) * window] for k in range(min(batch_size, n - s))]
            x = torch.tensor(rows, dtype=torch.long, device=device)
            logits = model(input_ids=x, use_cache=False).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     x[:, 1:].reshape(-1), reduction="sum")
            nll += loss.item()
            count += x[:, 1:].numel()
    finally:
        model.train(was_training)
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens_scored": count, "windows": n,
            "window": window}


def wikitext2_perplexity(model, tokenizer, *, window: int = 512, n_windows: int | None = 64,
                         data_root: str | Path | None = None, batch_size: int = 4) -> dict:
    """WikiText-2 test perplexity over the first `n_windows` fixed windows (see module docstring)."""
    return window_perplexity(model, tokenizer, wikitext2_text("test", data_root), window=window,
                             n_windows=n_windows, batch_size=batch_size)


def response_nll(model, tokenizer, records: Sequence[dict], *, max_length: int = 256, system_prompt: str = "",
                 batch_size: int = 16, style: str = "chat") -> float:
    """Mean NLL of the reference answers (`training.response_loss`) in the model's format: "chat" (a chat
    model, as it is tuned) or "raw" (a base model's instruction format, no system prompt)."""

    cfg = TrainConfig(style=style, max_length=max_length, system_prompt=system_prompt)
    return response_loss(model, tokenizer, list(records), cfg, batch_size=batch_size)


__all__ = ["gold_answer", "extract_final_number", "gsm8k_correct", "gsm8k_score", "wikitext2_text",
           "window_perplexity", "wikitext2_perplexity", "response_nll"]
