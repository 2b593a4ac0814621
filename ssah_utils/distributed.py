"""Which process of a torch.distributed group this is: the one question the cache (who writes an entry)
and the training loop (who evaluates and logs) both ask. Without a process group every process is its own
rank 0."""

from __future__ import annotations

import torch.distributed as dist


def process_rank() -> int:
    """This process's rank in the torch.distributed process group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    """True on rank 0 of a process group, and in a process without one: the process that evaluates and
    writes results (the cache); the others take their part in training only."""
    return process_rank() == 0


__all__ = ["process_rank", "is_main_process"]
