"""The one training loop on several processes (`training.finetune(parallel=...)`): refused without a process
group, with what to do; its memory formula agrees with the AdamW state it measures; and, on 2 CPU processes
over gloo, DDP and FSDP2 keep frozen entries bit-identical and match one process (`scripts/distributed_check.py`,
also `make test-distributed`)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ssah_utils import training as T
from tiny_models import RECORDS, tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parent.parent


def test_parallel_without_a_process_group_says_how_to_launch():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(RuntimeError, match="torchrun --nproc_per_node N"):
        T.finetune(model, tok, RECORDS, T.TrainConfig(), parallel="ddp")
    with pytest.raises(ValueError, match="parallel must be one of"):
        T.finetune(model, tok, RECORDS, T.TrainConfig(), parallel="zero3")


def test_memory_plan_counts_the_adamw_state_finetune_holds():
    """8 bytes of AdamW moments per entry of every tensor that trains (a partly frozen one trains whole)."""
    from ssah_utils.models import UnitMask

    tok = tiny_tokenizer()
    for kw in ({}, {"train_only": None}):
        model = tiny_model("llama")
        if "train_only" in kw:
            m = UnitMask.empty(model)
            m.mlp[0, [1, 2]] = True
            kw = {"train_only": m}
        rule = T.trainable_masks(model, **kw)
        n_trained = sum(p.numel() for n, p in model.named_parameters() if rule[n] is not False)
        info = T.finetune(model, tok, RECORDS[:2], T.TrainConfig(epochs=1.0, batch_size=2), **kw)
        n_params = sum(p.numel() for p in model.parameters())
        plan = T.memory_plan(n_params, n_trained, engine="single", weight_bytes=4)
        assert info["optimizer_state_bytes"] == plan["adamw_moments"]
    assert T.memory_plan(100, 40, engine="fsdp", processes=4)["adamw_moments"] == 8 * 40 / 4
    with pytest.raises(ValueError):
        T.memory_plan(100, 40, engine="single", processes=2)


@pytest.mark.slow  # about 30 s: two runs of 2 processes each
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_freeze_exactly_and_match_one_process(parallel, tmp_path):
    out = tmp_path / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:  # a free port for this run's rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                        str(REPO / "scripts" / "distributed_check.py"), "--parallel", parallel, "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["processes"] == 2 and len(report["checks"]) == 3
    bf16 = report["checks"].pop()  # a bf16 model: float32 master weights computing in bf16 under the engine
    assert bf16["ok"] and bf16["master_weights"] and bf16["frozen_entries_changed"] == 0
    assert bf16["moved_fraction"] > 0.8 and bf16["distance_to_float32_in_updates"] < 0.3
    for c in report["checks"]:
        assert c["ok"] and c["frozen_entries_changed"] == 0 and c["trained_entries_changed"] > 0
        assert c["max_abs_diff_vs_one_process"] <= report["tolerance"]
        per = c["optimizer_state_bytes"]
        assert per["this_process"] == (per["one_process"] // 2 if parallel == "fsdp" else per["one_process"])
