"""The memory plan of 03 / 04's fine-tuning on the paper's 7B/8B models: bytes per GPU of weights, gradients,
master weights and AdamW moments (`training.memory_plan`), for 1, 2, 4 and 8 GPUs, with and without FSDP.

Parameter counts come from each model's architecture instantiated on the meta device (no weights downloaded).
Trained entries: full fine-tuning and 03's freezing train every tensor (a frozen unit's rows sit in tensors that
train, and are written back after each step); 04's RU-only alignment trains only the unit tensors (q/k/v/o and
the MLP projections): embeddings, norms and lm_head get no gradients and no AdamW state. Activations are not
included (they scale with micro-batch x sequence; `make gpu-check` measures a step's peak on a lent GPU).
The per-process AdamW bytes of the formula are the ones `scripts/distributed_check.py` measures on a tiny model.

Usage: python scripts/memory_plan.py [--out docs/memory_plan.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ssah_utils import training as T  # noqa: E402

ARCHS = {  # the hub configs' numbers (LlamaConfig / MistralConfig fields)
    "Llama-2-7B": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False),
    "Llama-3-8B": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "Mistral-7B": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
}
UNIT_TENSORS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPU_GB = 80


def counts(arch: dict) -> tuple[int, int]:
    """(all parameters, entries of the unit tensors) of an architecture, on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(arch)
    conf = AutoConfig.for_model(kw.pop("model_type"), **kw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf)
    total = sum(p.numel() for p in model.parameters())
    units = sum(p.numel() for n, p in model.named_parameters() if any(f".{u}." in n for u in UNIT_TENSORS))
    return total, units


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "docs" / "memory_plan.md"))
    a = ap.parse_args(argv)
    lines = ["# Memory plan: fine-tuning a 7B/8B model in 03 and 04", "",
             "Written by `python scripts/memory_plan.py` from `training.memory_plan` (see its docstring). GB per GPU "
             "(10^9 bytes) of weights + gradients + master weights + AdamW moments, **without activations**; "
             f"'fits' compares with an {GPU_GB} GB GPU and leaves activations the rest. One GPU: the loop's "
             "bf16 weights with float32 master copies (`make reproduce`); DDP / FSDP: float32 weights on every "
             "process (`finetune(parallel=...)` under `torchrun --nproc_per_node N` or `accelerate launch "
             "--multi_gpu --num_processes N`; checked on 2 CPU processes by `make test-distributed`). 03's and "
             "04's runs on N GPUs: `make finetune NB=03 NPROC=N ENGINE=fsdp PRESET=...` (`scripts/train_stage.py`), "
             "then `make nb-03` reads them from the cache. A bf16 model trains as float32 master weights computing in bf16. "
             "Under FSDP each process also keeps a full copy of the model, in its dtype, "
             "in host memory while it trains (14 GB for a bf16 7B model, per process).", ""]
    for name, arch in ARCHS.items():
        total, units = counts(arch)
        lines += [f"## {name}: {total / 1e9:.2f}B parameters, {units / 1e9:.2f}B in unit tensors", "",
                  "| training | engine | GPUs | weights | gradients | master | AdamW | total GB | fits |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for setting, trained in (("full / 03 freeze", total), ("04 RU-only", units)):
            for engine, gpus in (("single", 1), ("ddp", 2), ("ddp", 8), ("fsdp", 2), ("fsdp", 4), ("fsdp", 8)):
                m = T.memory_plan(total, trained, engine=engine, processes=gpus)
                gb = {k: v / 1e9 for k, v in m.items()}
                lines.append(f"| {setting} | {engine} | {gpus} | {gb['weights']:.1f} | {gb['gradients']:.1f} | "
                             f"{gb['master_weights']:.1f} | {gb['adamw_moments']:.1f} | {gb['total']:.1f} | "
                             f"{'yes' if gb['total'] < GPU_GB else 'no'} |")
        lines.append("")
    Path(a.out).write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
