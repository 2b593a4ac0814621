"""Train the fine-tuning runs of 03_freeze_finetune or 04_alignment_budget on N processes (DDP or FSDP2),
into the cache that the notebook then reads on one process.

    torchrun --standalone --nproc_per_node 8 scripts/train_stage.py 03 --engine fsdp --preset P
    make finetune NB=04 NPROC=8 ENGINE=fsdp PRESET=P        # the same, through the Makefile
    make nb-04 PRESET=P                                      # then: every run is a cache hit

The stage's config is the notebook's, built from the same parameters (its `parameters` cell, the preset's
CPU-sized defaults in notebooks/params/<preset>.yaml, then `-p name=value` here, as papermill's -p), so the
cache keys are the notebook's. Every process loads the model and trains each run together with the others
(`training.parallel_engine`); rank 0 alone evaluates (03 evaluates inside a run) and writes the cache
(`cache.cached` never writes on the other ranks). The engine is not part of a run's key: a run trained on
N processes matches the one-process run within float rounding (`make test-distributed` measures it) and
a run's results say on how many processes it trained (`processes`, shown where any run used more than one). Labels and masks are computed by rank 0 first, then read
from the cache by the others. The cache folder must be one disk that every process sees (one node).

03: the lr sweep (if `lr_grid` is set) and then every (set, condition, replicate) of Table 2; 04: every
(condition, seed) of Table 4's training (its evaluations are the notebook's, on one process).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from ssah_utils import nbparams, training  # noqa: E402
from ssah_utils import stage_budget as sb  # noqa: E402
from ssah_utils import stage_freeze as sf  # noqa: E402

NOTEBOOKS = {"03": "03_freeze_finetune", "04": "04_alignment_budget"}
TIMEOUT_H = 6  # a collective waits this long (rank 0 evaluates a run while the others wait to train the next)


def parse_param(text: str) -> tuple[str, object]:
    """'name=value' -> (name, value), typed as papermill's -p types it: True/False/None, an int, a float, else
    the text itself ('1e-4,1e-3' stays a string)."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise SystemExit(f"-p takes name=value (e.g. -p n_seeds=2), got {text!r}")
    if value in ("True", "False", "None"):
        return name.strip(), {"True": True, "False": False, "None": None}[value]
    for kind in (int, float):
        try:
            return name.strip(), kind(value)
        except ValueError:
            pass
    return name.strip(), value


def stage_config(nb: str, preset: str, model: str, seed: int, params: list[str]):
    """The notebook's config for these parameters (unknown names are nbparams' clear error)."""
    over = {"preset": preset, "model": model, "seed": int(seed), **dict(parse_param(p) for p in params)}
    values = nbparams.notebook_params(NOTEBOOKS[nb], over)
    module = sf if nb == "03" else sb
    return module.config_from_params(values), values


def _say(msg: str) -> None:
    if training.is_main_process():
        print(f"{time.strftime('%H:%M:%S')} [train_stage] {msg}", flush=True)


def prepare(nb: str, cfg) -> None:
    """Labels and masks (no collectives): computed and cached by rank 0 while the others wait, then read."""
    if training.is_main_process():
        if nb == "03":
            for ds in cfg.datasets:
                sf.train_records(cfg, ds)  # harmful_<N>: the unaligned model's answers, generated once
            for cond in cfg.conditions:
                for r in range(len(cfg.seeds)):
                    sf.freeze_mask(cfg, cond, r)
        else:
            sb.budget_masks(cfg)
    dist.barrier()


def train_03(cfg, values: dict, log) -> int:
    lrs = sf.parse_lr_grid(str(values.get("lr_grid", "")))
    sweep = sf.lr_sweep(cfg, lrs, log=log) if lrs else None
    cfg = sf.choose_lr(cfg, sweep)
    box = [cfg]
    dist.broadcast_object_list(box, src=0)  # every process trains with rank 0's choice
    cfg = box[0]
    n = 0
    for ds in cfg.datasets:
        for cond in cfg.conditions:
            for r in ([0] if cond == "before" else range(len(cfg.seeds))):
                t0 = time.perf_counter()
                res = sf.run(cfg, ds, cond, r, log=log)
                m = res["metrics"]
                _say(f"03 {ds} {cond} replicate {r}: {time.perf_counter() - t0:.0f} s"
                     + (f", frozen entries changed {m.get('verify_changed', 0)}" if cond != "before" else ""))
                n += 1
    return n


def train_04(cfg, log) -> int:
    n = 0
    for cond in cfg.conditions:
        for s in cfg.seeds:
            t0 = time.perf_counter()
            tr = sb.train_run(cfg, cond, s)
            _say(f"04 {cond} seed {s}: {time.perf_counter() - t0:.0f} s, entries changed outside the mask "
                 f"{tr['summary']['moved_outside_mask']}")
            sb.clear_memo()  # each run's weights stay in the cache, not in this process
            n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebook", choices=sorted(NOTEBOOKS), help="03 (freeze fine-tuning) or 04 (alignment budget)")
    ap.add_argument("--engine", choices=training.PARALLEL[1:], default="fsdp",
                    help="ddp: a full model per process; fsdp: FSDP2, parameters, gradients and AdamW state sharded")
    ap.add_argument("--preset", default=os.environ.get("SSAH_PRESET") or "organism")
    ap.add_argument("--model", default=os.environ.get("SSAH_MODEL", ""))
    ap.add_argument("--seed", type=int, default=int(os.environ.get("SSAH_SEED") or 0))
    ap.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                    help="a notebook parameter, as papermill's -p (repeatable)")
    a = ap.parse_args(argv)
    # Bad parameters fail here, before any process group or model exists.
    try:
        cfg, values = stage_config(a.notebook, a.preset, a.model, a.seed, a.param)
    except (ValueError, TypeError, KeyError) as err:
        raise SystemExit(f"train_stage.py {a.notebook}: {err}") from None
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SystemExit("launch under torchrun (or accelerate launch), e.g. torchrun --standalone --nproc_per_node 2 "
                         f"scripts/train_stage.py {a.notebook} --engine {a.engine} (or: make finetune NB={a.notebook} NPROC=2)")
    if getattr(cfg, "dtype", "float32") != "float32":
        raise SystemExit(f"the multi-process engines train float32 weights; this config has dtype {cfg.dtype!r}")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", 1))))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=TIMEOUT_H))
    try:
        world = dist.get_world_size()
        _say(f"{NOTEBOOKS[a.notebook]} on {world} processes ({a.engine}, {'cuda' if cuda else 'cpu'}), "
             f"preset {a.preset}")
        log = print if training.is_main_process() else None
        t0 = time.perf_counter()
        prepare(a.notebook, cfg)
        with training.parallel_engine(a.engine):
            n = train_03(cfg, values, log) if a.notebook == "03" else train_04(cfg, log)
        dist.barrier()
        _say(f"{n} runs in {time.perf_counter() - t0:.0f} s, cached; `make nb-{a.notebook}` now reads them")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
