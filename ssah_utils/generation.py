"""Prompt rendering, supervised pair encoding and batched greedy generation, for any causal LM.

One place decides what a model sees before its answer, so probing, scoring, fine-tuning and
evaluation agree on it:
- `style="chat"`: the tokenizer's own chat template with `add_generation_prompt=True` (as the
  paper's chat models are used), with an optional system prompt;
- `style="raw"`: `RAW_TEMPLATE`, the plain-text instruction format a *base* model is prompted with
  (an Alpaca-like format; the organism's pre-training corpus uses the same string).

Generation is greedy (the paper's Table 1 setting) with left padding; encodings for training and
scoring are right-padded with a `response_mask` that is 1 exactly on response tokens (eos included).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# The base-model prompt format. Lower-case and space-separated so that a word-level tokenizer (the
# organism's) and a subword one (Llama's) both read it; `{prompt}` is replaced by the request.
RAW_TEMPLATE = "### instruction : {prompt} ### response :"

STYLES = ("chat", "raw")


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")


def render(tokenizer, prompt: str, *, style: str = "chat", system_prompt: str | None = None) -> str:
    """The text a model sees up to the start of its answer."""
    _check_style(style)
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if style == "raw":
        if system_prompt:
            raise ValueError("style='raw' has no system prompt; pass system_prompt=None or use style='chat'")
        return RAW_TEMPLATE.format(prompt=prompt)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template: it is probably a base "
            "model; use style='raw' (the base-model format) or a chat model"
        )
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of `text` with no special tokens added (templates and callers place their own)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prompt_ids(tokenizer, text: str, style: str) -> list[int]:
    ids = text_ids(tokenizer, text)
    # Chat templates of real models and the organism write their own bos; the raw format does not.
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos) and (style == "raw" or tokenizer.bos_token not in text):
        ids = [bos] + ids
    return ids


def pad_token_id(tokenizer) -> int:
    """The id to pad with: the pad token, else eos (as for Llama models, which have no pad token)."""
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither a pad nor an eos token; set tokenizer.pad_token first")
    return int(pad)


def encode_pairs(
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    style: str = "chat",
    system_prompt: str | None = None,
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask`, `response_mask` (all long `[batch, seq]`).

    Prompt and response are tokenized separately (no special tokens added), an eos closes the
    response, so `response_mask` marks exactly the answer the model is trained or scored on.
    `max_length` truncates from the right (the response end); a pair whose response would be cut
    away entirely is an error, never a silent empty row.
    """
    _check_style(style)
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        raise ValueError("encode_pairs needs at least one (prompt, response) pair")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos token; the response end cannot be marked")
    rows, masks = [], []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        p_ids = _prompt_ids(tokenizer, render(tokenizer, p, style=style, system_prompt=system_prompt), style)
        r_ids = text_ids(tokenizer, r) + [eos]
        ids, rm = p_ids + r_ids, [0] * len(p_ids) + [1] * len(r_ids)
        if max_length is not None and len(ids) > max_length:
            ids, rm = ids[:max_length], rm[:max_length]
            if not any(rm):
                raise ValueError(f"pair {i}: prompt has {len(p_ids)} tokens, max_length={max_length} leaves no response")
        rows.append(ids)
        masks.append(rm)
    width = max(map(len, rows))
    pad = pad_token_id(tokenizer)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, rm) in enumerate(zip(rows, masks)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        response_mask[i, : len(ids)] = torch.tensor(rm)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


def without_final_eos(enc: dict[str, torch.Tensor], eos_id: int) -> dict[str, torch.Tensor]:
    """`enc` (from `encode_pairs`) with each response's closing eos token taken out of `response_mask`
    (the token stays in the input: it is last, so no other position sees it). A row truncated before its
    eos keeps its mask; a row whose response is only the eos is an error (nothing would be left)."""
    resp = enc["response_mask"].clone()
    for i in range(resp.shape[0]):
        pos = resp[i].nonzero().squeeze(1)
        if pos.numel() == 0:
            raise ValueError(f"row {i} has no response token")
        last = int(pos[-1])
        if int(enc["input_ids"][i, last]) == int(eos_id):
            if pos.numel() == 1:
                raise ValueError(f"row {i}: the response is only its eos; nothing is left to score without it")
            resp[i, last] = 0
    return {**enc, "response_mask": resp}


def encode_prompts(
    tokenizer,
    prompts: Sequence[str],
    *,
    style: str = "chat",
    system_prompt: str | None = None,
    prefill: str | Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Left-padded `input_ids` and `attention_mask` of rendered prompts (+ prefill), ready to generate
    from or to read the hidden state of the last prompt token at position -1."""
    _check_style(style)
    prefills = expand_prefill(prefill, len(prompts))
    rows = []
    for p, pre in zip(prompts, prefills):
        ids = _prompt_ids(tokenizer, render(tokenizer, p, style=style, system_prompt=system_prompt), style)
        rows.append(ids + (text_ids(tokenizer, pre) if pre else []))
    width = max(map(len, rows))
    pad = pad_token_id(tokenizer)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids):] = torch.tensor(ids)
        attention_mask[i, width - len(ids):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def expand_prefill(prefill: str | Sequence[str] | None, n: int) -> list[str]:
    """One prefill string per prompt ("" for none) from None, one string for all, or a list."""
    if prefill is None:
        return [""] * n
    if isinstance(prefill, str):
        return [prefill] * n
    prefill = ["" if x is None else x for x in prefill]
    if len(prefill) != n:
        raise ValueError(f"{n} prompts but {len(prefill)} prefills")
    return list(prefill)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    style: str = "chat",
    system_prompt: str | None = None,
    prefill: str | Sequence[str] | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 32,
) -> list[str]:
    """Greedy answers to `prompts`, batched with left padding; each answer includes its prefill.

    Greedy decoding makes evaluations exactly repeatable (paper Table 1: greedy, 256 new tokens for
    real models). A prefill is appended after the generation prompt, as in a prefilling attack.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not a single string")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be positive")
    prompts = list(prompts)
    prefills = expand_prefill(prefill, len(prompts))
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    eos = tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for s in range(0, len(prompts), batch_size):
            chunk, pre = prompts[s : s + batch_size], prefills[s : s + batch_size]
            enc = encode_prompts(tokenizer, chunk, style=style, system_prompt=system_prompt, prefill=pre)
            width = enc["input_ids"].shape[1]
            gen = model.generate(
                input_ids=enc["input_ids"].to(device),
                attention_mask=enc["attention_mask"].to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad,
                eos_token_id=eos,
            )
            for p_text, row in zip(pre, gen[:, width:].tolist()):
                if eos is not None and eos in row:
                    row = row[: row.index(eos)]
                ids = (text_ids(tokenizer, p_text) if p_text else []) + row
                out.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return out
