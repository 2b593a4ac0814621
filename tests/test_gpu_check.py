"""bench/gpu_check.py (the one-shot check of the bf16 / CUDA path) still runs end to end: here on CPU,
float32, one family, the smallest sizes and 4 organism prompts (a few seconds)."""

import importlib.util
import json

import pytest

from ssah_utils import config

SCRIPT = config.REPO_ROOT / "bench" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_runs_every_step_on_cpu(tmp_path):
    gc = _load()
    cache_before = config.CACHE_DIR
    rc = gc.main(["--device", "cpu", "--dtype", "float32", "--out", str(tmp_path), "--families", "llama3",
                  "--organism-prompts", "4", "--engines", ""])  # the engines: the next test
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    failed = [(r["family"], r["step"], r["error"]) for r in report["results"] if not r["ok"]]
    assert rc == 0 and report["passed"], failed
    assert [r["step"] for r in report["results"] if r["family"] == "llama3"] == list(gc.STEPS)
    assert [r["step"] for r in report["results"] if r["family"] == "organism"] == ["generate", "cpu_fp32", "agreement"]
    freeze = next(r for r in report["results"] if r["step"] == "freeze")["info"]
    assert freeze["stage_run"]["verify_changed"] == 0 and freeze["direct"]["frozen_changed"] == 0
    assert report["environment"]["torch"] and "llama3 | ok" in (tmp_path / "gpu_check.md").read_text()
    assert config.CACHE_DIR == cache_before  # the check's stage cache never replaces the project's


@pytest.mark.slow  # about 1 min: scripts/distributed_check.py under torchrun, 2 CPU processes
def test_gpu_check_runs_the_multi_process_engines(tmp_path):
    rc = _load().main(["--device", "cpu", "--dtype", "float32", "--out", str(tmp_path), "--families", "",
                       "--organism-prompts", "0", "--engines", "fsdp"])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 0 and report["passed"], [r["error"] for r in report["results"]]
    (step,) = report["results"]
    assert step["family"] == "engines" and step["step"] == "fsdp x2" and step["info"]["processes"] == 2
    checks = step["info"]["checks"]
    assert len(checks) == 3 and all(c["ok"] and c["frozen_entries_changed"] == 0 for c in checks)
