"""The paper's utility suite through stock lm-eval: an in-memory model (ablated, fine-tuned or aligned) handed to
`lm_eval.simple_evaluate` as an `HFLM` wrapping the model object itself, zero-shot.

The paper measures utility with lm-eval's zero-shot BoolQ, RTE, HellaSwag, WinoGrande, ARC-Challenge and
OpenBookQA (`PAPER_TASKS`). Their datasets come from the Hugging Face hub; where the hub cannot be reached
(`SSAH_OFFLINE` / `HF_HUB_OFFLINE` / `HF_DATASETS_OFFLINE` set), asking for them is an error raised before any
model work, saying what to do. Local tasks (lm-eval's YAML task files, e.g. `dataset_path: json` over a file you
have; `include_path`) run offline: `tests/test_lm_eval_utility.py` runs one on a tiny model and checks lm-eval's
accuracy against the model's own log-likelihoods.

lm-eval is a heavy optional dependency (in the `test` extra, so CI exercises this path); it is imported when a
suite runs, not when the package is imported.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_challenge", "openbookqa")
OFFLINE_ENV = ("SSAH_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
LM_EVAL_VERSION = "0.4.13"


class LMEvalUnavailable(RuntimeError):
    """lm-eval, or a task's dataset, cannot be used here; the message says what to do."""


def _offline() -> list[str]:
    return [k for k in OFFLINE_ENV if os.environ.get(k, "").strip() not in ("", "0", "false", "False")]


def local_tasks(include_path: str | Path | None) -> set[str]:
    """Task names defined by the YAML files under `include_path` (their top-level `task:` lines)."""
    if include_path is None:
        return set()
    names = set()
    for f in sorted(Path(include_path).rglob("*.yaml")):
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.startswith("task:"):
                names.add(line.split(":", 1)[1].strip().strip("'\""))
    return names


def check_tasks(tasks: Sequence[str], include_path: str | Path | None = None) -> None:
    """Refuse, before any work, tasks whose data cannot be had: offline, every task must be a local one."""
    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"give a list of lm-eval task names (the paper's: {', '.join(PAPER_TASKS)}), got {tasks!r}")
    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"include_path {include_path} is not a folder of lm-eval task YAML files")
    hub = [t for t in tasks if t not in local_tasks(include_path)]
    off = _offline()
    if hub and off:
        raise LMEvalUnavailable(
            f"lm-eval tasks {hub} load their datasets from the Hugging Face hub, and this run is offline "
            f"({', '.join(off)} set). Run where the hub is reachable (unset them), or point include_path at local "
            "task YAMLs (lm-eval's `dataset_path: json` over files you have).")


def evaluate_tasks(model, tokenizer, tasks: Sequence[str] = PAPER_TASKS, *, include_path: str | Path | None = None,
                   num_fewshot: int = 0, limit: int | None = None, batch_size: int = 8, seed: int = 0) -> pd.DataFrame:
    """Run lm-eval's `tasks` on the in-memory `model` (zero-shot by default, as the paper) and return one row
    per (task, metric, filter): its value, standard error and number of documents. `limit`: at most this many
    documents per task (a quick look; the paper uses all). `include_path`: a folder of local task YAMLs."""
    check_tasks(tasks, include_path)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int (documents per task) or None, got {limit!r}")
    if not (isinstance(num_fewshot, int) and num_fewshot >= 0):
        raise ValueError(f"num_fewshot must be an int >= 0 (the paper: 0), got {num_fewshot!r}")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise LMEvalUnavailable(f"lm-eval is not installed: `pip install lm-eval=={LM_EVAL_VERSION}` "
                                "(or `pip install -e '.[test]'`)") from err
    tm = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise ValueError(f"lm-eval {lm_eval.__version__} knows no task {unknown}; local tasks found under "
                         f"{include_path}: {sorted(local_tasks(include_path))}")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(next(model.parameters()).device))
    was_training = model.training
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                      task_manager=tm, log_samples=False, random_seed=seed, numpy_random_seed=seed,
                                      torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=0)
    finally:
        model.train(was_training)
    n = {t: int(v.get("effective", -1)) for t, v in (out.get("n-samples") or {}).items()}
    rows = []
    for task, res in out["results"].items():
        for key, value in res.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = res.get(f"{metric}_stderr,{filt}")
            rows.append({"task": task, "metric": metric, "filter": filt, "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else float("nan"),
                         "n": n.get(task, -1)})
    return pd.DataFrame(rows)


__all__ = ["PAPER_TASKS", "LM_EVAL_VERSION", "LMEvalUnavailable", "local_tasks", "check_tasks", "evaluate_tasks"]
