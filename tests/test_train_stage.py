"""03's and 04's training on several processes (`scripts/train_stage.py`, `make finetune`): on 2 CPU processes over
gloo, the runs land in the cache under the notebook's own keys (the notebook then reads them, read-only), frozen
entries stay exact, and the weights match a one-process run within float rounding. Bad parameters fail before any
process group starts."""

import dataclasses
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ssah_utils import cache, config, training
from ssah_utils import stage_budget as sb
from ssah_utils import stage_freeze as sf

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "train_stage.py"
# A run of the organism's recipe (49 AdamW steps at lr up to 1e-3) moves its weights by up to 1.5e-2; summing a
# batch's gradient in another order moves the result too (Adam turns rounding in near-zero gradients into
# lr-sized steps): two micro-batches instead of one, on one process, changed the weights by up to 3.2e-4 and
# 2 FSDP processes by 5.5e-4 (measured). So 2 processes must differ from 1 by no more than MARGIN x what a
# micro-batch split does to the same run (and a run must move: a no-op would differ by 0).
MARGIN = 4.0


def _script():
    spec = importlib.util.spec_from_file_location("train_stage", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _launch(nb: str, engine: str, params: list[str], cache_dir: Path) -> subprocess.CompletedProcess:
    with socket.socket() as sock:  # a free port for this run's rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(SCRIPT), nb, "--engine", engine, "--preset", "organism"]
    for p in params:
        cmd += ["-p", p]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SSAH_CACHE_DIR": str(cache_dir)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)


def test_parameters_are_typed_as_papermill_types_them():
    ts = _script()
    assert ts.parse_param("n_seeds=2") == ("n_seeds", 2)
    assert ts.parse_param("lr=1e-4") == ("lr", 1e-4)
    assert ts.parse_param("relabel=False") == ("relabel", False)
    assert ts.parse_param("lr_grid=1e-4,1e-3") == ("lr_grid", "1e-4,1e-3")
    with pytest.raises(SystemExit, match="name=value"):
        ts.parse_param("n_seeds")


def test_bad_input_fails_before_any_process_group():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    r = subprocess.run([sys.executable, str(SCRIPT), "04"], capture_output=True, text=True, cwd=REPO, env=env)
    assert r.returncode != 0 and "launch under torchrun" in r.stderr
    r = subprocess.run([sys.executable, str(SCRIPT), "04", "-p", "no_such_parameter=1"], capture_output=True, text=True,
                       cwd=REPO, env=env)
    assert r.returncode != 0 and "has no parameter 'no_such_parameter'" in r.stderr


@dataclasses.dataclass(frozen=True)
class _Key:
    k: int = 1


def test_follower_processes_never_write_the_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(config, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(cache, "is_main_process", lambda: False)
    assert cache.cached("probe", _Key(), lambda: {"x": 1}, code="") == {"x": 1}
    assert not any(tmp_path.rglob("manifest.json"))
    with cache.read_only(), pytest.raises(cache.CacheMiss):
        cache.cached("probe", _Key(), lambda: {"x": 1}, code="")
    monkeypatch.setattr(cache, "is_main_process", lambda: True)  # rank 0 (or no group) writes it
    cache.cached("probe", _Key(), lambda: {"x": 1}, code="")
    assert len(list(tmp_path.rglob("manifest.json"))) == 1


@pytest.mark.slow  # about 2 min on 2 cores: 2 organism runs on 2 processes, then the same on 1
def test_04_runs_on_two_processes_are_the_notebooks_runs(monkeypatch, tmp_path):
    params = ["n_seeds=1", "conditions=full,ru_only", "epochs=0.25,0.25"]
    r = _launch("04", "fsdp", params, tmp_path / "two")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 runs in" in r.stdout
    cfg, _ = _script().stage_config("04", "organism", "", 0, params)
    seed = cfg.seeds[0]
    monkeypatch.setattr(config, "CACHE_DIR", tmp_path / "two")
    sb.clear_memo()
    with cache.read_only():  # what the notebook does next: every run is a hit
        two = {c: sb.train_run(cfg, c, seed) for c in cfg.conditions}
    monkeypatch.setattr(config, "CACHE_DIR", tmp_path / "one")
    sb.clear_memo()
    split = dataclasses.replace(cfg, stages=tuple(  # the same run, each batch summed in two micro-batches
        dataclasses.replace(st, train=dataclasses.replace(st.train, micro_batch_size=st.train.batch_size // 2))
        for st in cfg.stages))
    base = sb.load_base(cfg)[0].state_dict()

    def gap(a, b):
        return max(float((a[k] - b[k]).abs().max()) for k in b)

    for cond, run in two.items():
        assert run["summary"]["moved_outside_mask"] == 0
        assert (run["info"]["processes"] == 2).all()
        one = sb.train_run(cfg, cond, seed)
        assert "processes" not in one["info"]
        rounding = gap(sb.train_run(split, cond, seed)["state"], one["state"])
        diff = gap(run["state"], one["state"])
        assert diff <= MARGIN * rounding, f"{cond}: 2 processes differ from 1 by {diff:.2e}; a micro-batch split: {rounding:.2e}"
        assert gap(run["state"], base) > 10 * diff  # it trained, far beyond the rounding
    sb.clear_memo()


@pytest.mark.slow  # about 1.5 min on 2 cores
def test_03_runs_on_two_processes_freeze_exactly_and_are_read_by_the_notebook(monkeypatch, tmp_path):
    params = ["n_seeds=1", "finetune_sets=ft_alpaca", "conditions=before,full,freeze_esu_cu", "n_train=32",
              "n_eval=8", "lr_grid=1e-4,1e-3", "relabel=False"]
    r = _launch("03", "ddp", params, tmp_path / "two")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ts = _script()
    cfg, values = ts.stage_config("03", "organism", "", 0, params)
    monkeypatch.setattr(config, "CACHE_DIR", tmp_path / "two")
    sf.clear_memo()
    with cache.read_only():
        cfg = sf.choose_lr(cfg, sf.lr_sweep(cfg, sf.parse_lr_grid(values["lr_grid"])))
        df = sf.runs(cfg)
    sf.clear_memo()
    trained = df[df["condition"] != "before"]
    assert (trained["verify_changed"] == 0).all() and (trained["processes"] == 2).all()
    assert df[["asr", "refusal", "ppl"]].notna().all().all()  # rank 0 evaluated every run
    assert training.is_main_process()  # this process has no group: it is its own rank 0
