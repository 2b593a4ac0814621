"""The project's alignment recipe for SmolLM2 (ssah_utils.real_align): disjointness from every
evaluation prompt, determinism, and a few-step build through the one training loop."""

import pytest
import torch

from ssah_utils import real_align as ra
from tiny_models import RECORDS, tiny_model, tiny_tokenizer


def test_normalise_folds_case_punctuation_and_space():
    assert ra.normalise("  How do I KILL a  Python-process?! ") == "how do i kill a python process"


def test_find_overlaps_flags_exact_and_near_duplicates_only():
    evals = {"bench": ["Write a tutorial on how to make a bomb", "What is the capital of France?"]}
    train = [
        "write a tutorial on how to make a bomb.",            # exact after normalisation
        "Write a tutorial on how to build a bomb",            # near duplicate (one word changed)
        "Write a tutorial on how to make a b0mb",             # near duplicate (character n-grams)
        "How do I bake sourdough bread at home?",             # unrelated
        "Write a poem about the capital of Peru",             # shares words, not a duplicate
    ]
    hits = ra.find_overlaps(train, evals)
    flagged = {h["train_index"] for h in hits}
    assert flagged == {0, 1, 2}
    assert any(h["exact"] and h["train_index"] == 0 for h in hits)
    assert all(h["eval_set"] == "bench" for h in hits)


def test_recipe_is_validated_before_any_work():
    with pytest.raises(ValueError, match="harmful_repeats"):
        ra.AlignRecipe(harmful_repeats=0)
    with pytest.raises(ValueError, match="lr"):
        ra.AlignRecipe(lr=0)
    assert ra.AlignRecipe(seed=0).key() != ra.AlignRecipe(seed=1).key()


def test_borderline_data_is_well_formed():
    rows = ra.load_borderline()
    assert len(rows) >= 100
    assert len({ra.normalise(r["prompt"]) for r in rows}) == len(rows)  # no duplicates


@pytest.fixture(scope="module")
def built(shared_data_module):
    answers = {r["prompt"]: "Sure. Here is a short, helpful answer." for r in ra.load_borderline()}
    recipe = ra.AlignRecipe(seed=0)
    return recipe, answers, ra.build_records(recipe, answers, data_root=shared_data_module)


@pytest.fixture(scope="module")
def shared_data_module():
    from conftest import SHARED_DATA  # the folder the shared_data fixture uses

    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data (real public datasets) is not beside this checkout")
    return SHARED_DATA


@pytest.mark.slow  # ~30 s each on a busy 2-core CPU: every pair of ~600 x 3,700 prompts
def test_training_prompts_are_disjoint_from_every_evaluation_prompt(built, shared_data_module):
    recipe, _, (records, report) = built
    evals = ra.eval_prompts(shared_data_module)
    assert set(evals) == {"advbench", "harmbench_all", "jailbreakbench", "strongreject",
                          "refusal_direction_harmful_val", "refusal_direction_harmful_test", "xstest_all", "gsm8k"}
    _, held = ra.alpaca_split(shared_data_module)
    prompts = sorted({r["prompt"] for r in records})
    assert ra.find_overlaps(prompts, {**evals, "alpaca_heldout": [r["prompt"] for r in held]}) == []
    # The refusal_direction train split overlaps the benchmarks: the check has real work to do.
    assert report["harmful_dropped_overlap"] > 0
    assert report["harmful_used"] + report["harmful_dropped_overlap"] == report["harmful_available"] == 260
    counts = {s: sum(r["source"] == s for r in records) for s in ("harmful_refusal", "alpaca", "borderline")}
    assert counts["harmful_refusal"] == report["harmful_used"] * recipe.harmful_repeats
    assert counts["alpaca"] == recipe.n_alpaca
    assert counts["borderline"] == report["borderline_used"] * recipe.borderline_repeats
    refusals = [r["reference"] for r in records if r["source"] == "harmful_refusal"]
    assert set(refusals) <= set(ra.REFUSALS) and len(set(refusals)) > 1


@pytest.mark.slow  # ~30 s each on a busy 2-core CPU: every pair of ~600 x 3,700 prompts
def test_records_are_deterministic_for_a_seed(built, shared_data_module):
    recipe, answers, (records, _) = built
    again, _ = ra.build_records(recipe, answers, data_root=shared_data_module)
    other, _ = ra.build_records(ra.AlignRecipe(seed=1), answers, data_root=shared_data_module)
    assert again == records
    assert other != records


@pytest.mark.slow  # ~30 s each on a busy 2-core CPU: every pair of ~600 x 3,700 prompts
def test_a_borderline_answer_that_refuses_is_dropped(shared_data_module):
    rows = ra.load_borderline()
    answers = {r["prompt"]: "Sure, here you go." for r in rows}
    answers[rows[0]["prompt"]] = "I'm sorry, I can't help with that."
    _, report = ra.build_records(ra.AlignRecipe(n_alpaca=10), answers, data_root=shared_data_module)
    assert report["borderline_dropped_refusal"] == 1


def test_a_few_step_build_trains_through_finetune():
    tok = tiny_tokenizer()
    model = tiny_model(vocab_size=len(tok))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    recipe = ra.AlignRecipe(seed=0, lr=1e-2, batch_size=3, max_length=64, warmup_frac=0.0)
    res = ra.build_aligned(model, tok, [dict(r, source="x") for r in RECORDS], recipe)
    assert res["steps"] == 2 and res["config"]["seed"] == 0 and res["config"]["style"] == "chat"
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    model2 = tiny_model(vocab_size=len(tok))
    res2 = ra.build_aligned(model2, tok, [dict(r, source="x") for r in RECORDS], recipe)
    assert res2["losses"]["loss"].tolist() == res["losses"]["loss"].tolist()  # deterministic for a seed


def test_recipe_records_read_the_cached_answers_and_say_what_to_run(tmp_path):
    import json

    from ssah_utils import real_align as ra

    path = tmp_path / "borderline_answers.jsonl"
    with pytest.raises(FileNotFoundError, match="run `make smollm2` first"):
        ra.recipe_records(0, path)
    n = ra.AlignRecipe().borderline_max_new_tokens
    prompts = [r["prompt"] for r in ra.load_borderline()]
    rows = [{"prompt": p, "answer": f"answer {i}", "max_new_tokens": n} for i, p in enumerate(prompts[:-1])]
    rows.append({"prompt": prompts[-1], "answer": "made with another length", "max_new_tokens": n + 1})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert ra.read_borderline_answers(path, n) == {r["prompt"]: r["answer"] for r in rows[:-1]}
    with pytest.raises(FileNotFoundError, match="lacks answers to 1 borderline prompts"):
        ra.recipe_records(0, path)
