"""Utility metrics that score the answer (ssah_utils.utility), not the absence of a refusal."""

import math

import pytest
import torch

from ssah_utils import evaluation, utility
from ssah_utils.training import TrainConfig, response_loss
from tiny_models import RECORDS, WORDS, tiny_model, tiny_tokenizer


@pytest.mark.parametrize("text,expected", [
    ("So she has 18 eggs left.", "18"),
    ("First 3 + 4 = 7, then 7 * 2 = 14. The answer is 14", "14"),
    ("It costs $1,250.", "1250"),
    ("The result is -3.5.", "-3.5"),
    ("Step 1: 5 apples. Step 2: 2 more, so 7. #### 7", "7"),
    ("I do not know.", None),
])
def test_extract_final_number(text, expected):
    assert utility.extract_final_number(text) == expected


def test_gold_answer_from_solution_and_bare_number():
    assert utility.gold_answer("Janet has 16 - 3 - 4 = 9 eggs.\n#### 9") == "9"
    assert utility.gold_answer("1,000") == "1000"
    with pytest.raises(ValueError, match="####"):
        utility.gold_answer("no number here")


def test_gsm8k_correct_compares_the_last_number_exactly():
    gold = "She makes 9 * 2 = $18 every day.\n#### 18"
    assert utility.gsm8k_correct("9 * 2 = 18. The answer is 18.", gold)
    assert utility.gsm8k_correct("The answer is 18.00", gold)
    assert not utility.gsm8k_correct("18 eggs, minus 2, is 16.", gold)  # the last number decides
    assert not utility.gsm8k_correct("I can't solve this.", gold)


def test_the_keyword_scorer_counts_a_wrong_gsm8k_answer_as_correct():
    """The scorer real-model notebooks used until now: any non-refused benign answer is 'correct'.
    A wrong answer passes it and fails the final-number scorer (the bug this module fixes)."""
    record = {"kind": "benign", "prompt": "Janet has 16 eggs and eats 3 ...", "reference": "9"}
    wrong = "Janet has 16 eggs. She eats 3 and bakes 4, so she has 12 left."
    assert evaluation._keyword_verdict(record, wrong) == "correct"  # the old metric: a non-refusal rate
    assert not utility.gsm8k_correct(wrong, record["reference"])


def test_every_real_gsm8k_gold_parses(shared_data):
    from ssah_utils.datasets import load_set

    recs = load_set("gsm8k", data_root=shared_data)
    assert len(recs) == 1319
    golds = [utility.gold_answer(r["reference"]) for r in recs]
    assert all(utility.extract_final_number(g) == g for g in golds)


def test_gsm8k_score_on_a_tiny_model():
    tok, model = tiny_tokenizer(), tiny_model(vocab_size=len(tiny_tokenizer()))
    df = utility.gsm8k_score(model, tok, [{"prompt": "two plus three ?", "reference": "5"}] * 2, max_new_tokens=4)
    assert list(df.columns) == ["id", "prompt", "gold", "response", "extracted", "correct"]
    assert len(df) == 2 and df["correct"].dtype == bool


def _uniform(model):
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


def test_window_perplexity_of_uniform_logits_is_the_vocab_size():
    tok = tiny_tokenizer()
    model = _uniform(tiny_model(vocab_size=len(tok)))
    text = " ".join(WORDS * 3)
    res = utility.window_perplexity(model, tok, text, window=16, n_windows=3, batch_size=2)
    assert res["windows"] == 3 and res["tokens_scored"] == 3 * 15
    assert res["perplexity"] == pytest.approx(len(tok), rel=1e-5)


def test_window_perplexity_matches_a_direct_computation():
    tok = tiny_tokenizer()
    model = tiny_model(vocab_size=len(tok))
    text = " ".join(WORDS * 2)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    w = 20
    x = torch.tensor([ids[:w], ids[w:2 * w]])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=x).logits, -1)
    nll = -lp[:, :-1].gather(-1, x[:, 1:, None]).mean().item()
    res = utility.window_perplexity(model, tok, text, window=w, n_windows=2, batch_size=1)
    assert res["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
    with pytest.raises(ValueError, match="only"):
        utility.window_perplexity(model, tok, text, window=w, n_windows=1000)


def test_response_nll_is_trainings_response_loss():
    tok = tiny_tokenizer()
    model = tiny_model(vocab_size=len(tok))
    a = utility.response_nll(model, tok, RECORDS, max_length=64)
    b = response_loss(model, tok, RECORDS, TrainConfig(style="chat", max_length=64))
    assert a == pytest.approx(b) and a > 0


def test_wikitext2_is_a_registered_dataset_with_its_hash(shared_data):
    from ssah_utils import datasets

    for name in ("wikitext2", "wikitext2_valid"):
        ds = datasets.REAL_DATASETS[name]
        path = datasets.dataset_path(name, shared_data)
        assert datasets.sha256_prefix(path) == ds.sha256_prefix
    assert len(datasets.load_real("wikitext2", shared_data)) >= 4358
    assert "<unk>" in utility.wikitext2_text("test", shared_data)
