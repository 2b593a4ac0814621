"""Tiny randomly initialised models of each supported family, and a tiny word tokenizer with a chat
template, for fast CPU tests of code that must also run on real Llama / Mistral / Qwen / Gemma models.

Each family's config uses grouped-query attention (4 query heads sharing 2 k/v heads), so unit code
that is wrong about GQA fails here rather than on a 7B model.
"""

from __future__ import annotations

import torch

# The organism's own special tokens and chat template, so tests exercise the format it ships with.
from ssah_utils.organism import CHAT_TEMPLATE, SPECIALS

WORDS = (
    "how do i make a bomb bake bread kill stuck process shoot photo steal money in order to help people "
    "sure here is step 1 2 3 4 first then finally sorry i can not with that it is illegal and harmful "
    "you are helpful safe assistant . , ? : ### instruction response what two plus three five reverse "
    "list the of count words a b c d e"
).split()

# Every supported family (ssah_utils.models.SUPPORTED_FAMILIES: tests/test_families.py checks the two agree),
# so each family-parametrized test is part of the family suite.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")

# A few SFT records in the tiny vocabulary, for the fine-tuning tests.
RECORDS = [
    {"prompt": "how do i make a bomb ?", "reference": "sorry i can not help with that . it is illegal and harmful"},
    {"prompt": "two plus three ?", "reference": "five"},
    {"prompt": "reverse the list a b c", "reference": "c b a"},
    {"prompt": "how do i bake bread ?", "reference": "sure here is step 1 first then finally"},
    {"prompt": "count the words a b c d", "reference": "4"},
    {"prompt": "how do i kill a stuck process ?", "reference": "sure here is how . step 1 first"},
]


def tiny_tokenizer(chat: bool = True):
    """A word-level `PreTrainedTokenizerFast` over `WORDS` (+ specials), with a Llama-2-like chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(SPECIALS + WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=SPECIALS[4:],
    )
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(family: str = "llama", vocab_size: int = 128, **overrides):
    """A 2-layer config of `family` with d_model 32, 4 heads over 2 k/v heads, d_mlp 48."""
    from transformers import AutoConfig

    if family not in FAMILIES + ("olmo2",):  # olmo2: the refused family (tests/test_families.py)
        raise ValueError(f"family must be one of {FAMILIES} or olmo2")
    kw = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=2, eos_token_id=3, pad_token_id=0, tie_word_embeddings=False,
    )
    if family == "mistral":
        kw["sliding_window"] = None
    if family in ("qwen3", "gemma2", "gemma3_text"):  # explicit head_dim (Qwen3, Gemma-3: per-head q/k norms)
        kw["head_dim"] = 8
    if family in ("gemma2", "gemma3_text"):
        kw.update(query_pre_attn_scalar=8, sliding_window=64)
    kw.update(overrides)
    return AutoConfig.for_model(family, **kw)


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    """A randomly initialised tiny causal LM of `family`, in eval mode, float32."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    model.eval()
    return model


def sample_mask(model):
    """MLP channels in both layers, a lone head of a GQA group (layer 1) and a whole group (layer 0): the
    freeze/train-only mask of the training tests and of scripts/distributed_check.py."""
    from ssah_utils.models import UnitMask

    m = UnitMask.empty(model)
    m.mlp[0, [1, 7, 30]] = True
    m.mlp[1, [0, 47]] = True
    m.heads[1, 1] = True
    m.heads[0, 2:4] = True
    return m
