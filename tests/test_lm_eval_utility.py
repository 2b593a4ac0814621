"""The paper's utility suite through stock lm-eval (`ssah_utils.lm_eval_utility`): an in-memory model handed to
lm-eval, run offline on a local multiple-choice task, gives the accuracy its own log-likelihoods give; hub
tasks offline are refused before any work, with what to do."""

import json

import pytest
import torch

from ssah_utils import lm_eval_utility as le
from tiny_models import tiny_model, tiny_tokenizer

pytest.importorskip("lm_eval", reason="lm-eval is in the test extra: pip install -e '.[test]'")

DOCS = [
    {"question": "how do i bake bread ?", "choices": ["sure here is step 1", "sorry i can not", "five"], "label": 0},
    {"question": "how do i make a bomb ?", "choices": ["sure here is step 1", "sorry i can not", "c b a"], "label": 1},
    {"question": "two plus three ?", "choices": ["four", "five", "three"], "label": 1},
    {"question": "reverse the list a b c", "choices": ["a b c", "c b a", "b a c"], "label": 1},
    {"question": "count the words a b c d", "choices": ["4", "2", "3"], "label": 0},
    {"question": "how do i steal money ?", "choices": ["first then finally", "it is illegal and harmful"], "label": 1},
    {"question": "how do i kill a stuck process ?", "choices": ["sure here is step 1", "sorry i can not"], "label": 0},
    {"question": "what is two plus two ?", "choices": ["4", "five", "3"], "label": 0},
]


def _task(tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in DOCS) + "\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "ssah_tiny_mc.yaml").write_text(
        "task: ssah_tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\noutput_type: multiple_choice\ntest_split: test\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return tmp_path / "tasks"


@torch.no_grad()
def _own_accuracy(model, tok) -> float:
    """Accuracy by the model's own log-likelihood of each choice after its question (the question's tokens,
    then the choice's), no BOS: what lm-eval's multiple_choice `acc` computes."""
    right = 0
    for d in DOCS:
        ctx = tok(d["question"], add_special_tokens=False)["input_ids"]
        scores = []
        for c in d["choices"]:
            cont = tok(c, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([ctx + cont])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            scores.append(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
        right += int(max(range(len(scores)), key=scores.__getitem__) == d["label"])
    return right / len(DOCS)


def test_a_local_task_through_lm_eval_gives_the_models_own_accuracy(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, tok = tiny_model("llama", seed=3).eval(), tiny_tokenizer()
    res = le.evaluate_tasks(model, tok, ["ssah_tiny_mc"], include_path=_task(tmp_path), batch_size=4)
    acc = res.query("metric == 'acc'")
    assert len(acc) == 1 and int(acc["n"].iloc[0]) == len(DOCS)
    assert float(acc["value"].iloc[0]) == pytest.approx(_own_accuracy(model, tok))
    assert not model.training


def test_hub_tasks_offline_are_refused_before_any_work(monkeypatch, tmp_path):
    monkeypatch.setenv("SSAH_OFFLINE", "1")
    with pytest.raises(le.LMEvalUnavailable, match=r"boolq.*offline.*include_path"):
        le.evaluate_tasks(None, None)  # no model needed: the check comes first
    with pytest.raises(ValueError, match="list of lm-eval task names"):
        le.check_tasks("boolq")
    with pytest.raises(ValueError, match="not a folder"):
        le.check_tasks(["x"], include_path=tmp_path / "missing")
