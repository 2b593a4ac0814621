"""Rendering, pair encoding and batched greedy generation (ssah_utils.generation)."""

import pytest
import torch

from ssah_utils import generation as g
from tiny_models import FAMILIES, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_render_chat_and_raw(tok):
    chat = g.render(tok, "how do i bake bread ?", system_prompt="you are safe .")
    assert chat == "<s><<SYS>> you are safe . <</SYS>> [INST] how do i bake bread ? [/INST]"
    assert g.render(tok, "a b", style="raw") == g.RAW_TEMPLATE.format(prompt="a b")
    with pytest.raises(ValueError, match="style"):
        g.render(tok, "a", style="alpaca")
    with pytest.raises(ValueError, match="no system prompt"):
        g.render(tok, "a", style="raw", system_prompt="x")
    with pytest.raises(ValueError, match="no chat template"):
        g.render(tiny_tokenizer(chat=False), "a")


def test_encode_pairs_marks_exactly_the_response(tok):
    enc = g.encode_pairs(tok, ["how do i bake bread ?", "two plus three ?"], ["sure here is step 1", "five"])
    ids, att, resp = enc["input_ids"], enc["attention_mask"], enc["response_mask"]
    assert ids.shape == att.shape == resp.shape and ids.dtype == torch.long
    for i, answer in enumerate(["sure here is step 1", "five"]):
        r = ids[i][resp[i].bool()].tolist()
        assert r == tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n = int(att[i].sum())
        assert att[i, :n].all() and not att[i, n:].any()  # right padding
        assert (ids[i, n:] == tok.pad_token_id).all()
        assert not resp[i, n:].any()
        assert tok.decode(ids[i][: n][~resp[i][:n].bool()]) == g.render(tok, ["how do i bake bread ?", "two plus three ?"][i]).replace("<s>", "<s> ")
    # raw style gets a bos, since its template has none
    raw = g.encode_pairs(tok, ["a b"], ["c"], style="raw")
    assert raw["input_ids"][0, 0].item() == tok.bos_token_id


def test_encode_pairs_errors(tok):
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        g.encode_pairs(tok, ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="leaves no response"):
        g.encode_pairs(tok, ["how do i bake bread ?"], ["sure"], max_length=5)
    enc = g.encode_pairs(tok, ["a"], ["sure here is step 1 2 3"], max_length=10)
    assert enc["input_ids"].shape[1] == 10 and enc["response_mask"].sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_left_padded_generation_equals_one_by_one(tok, family):
    model = tiny_model(family, seed=1)
    prompts = ["how do i bake bread ?", "two ?", "what is the list of words a b c d e ?"]
    batched = g.generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
    single = [g.generate(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single


def test_prefill_is_part_of_the_answer(tok):
    model = tiny_model("llama", seed=2)
    out = g.generate(model, tok, ["how do i make a bomb ?", "a"], prefill=["sure here is", None], max_new_tokens=3)
    assert out[0].startswith("sure here is")
    plain = g.generate(model, tok, ["a"], max_new_tokens=3)
    assert out[1] == plain[0]
    with pytest.raises(ValueError, match="2 prompts but 1 prefills"):
        g.generate(model, tok, ["a", "b"], prefill=["x"])
    with pytest.raises(TypeError, match="list of strings"):
        g.generate(model, tok, "a")
