"""What every task does first: settle its torch threads (a worker process may be fresh)."""
from __future__ import annotations

import os

import torch


def settle_threads() -> None:
    """Use the intra-op thread count the flow chose for its workers (RUMFLOW_TORCH_THREADS)."""
    n = int(os.environ.get("RUMFLOW_TORCH_THREADS", "0") or 0)
    if n > 0 and torch.get_num_threads() != n:
        torch.set_num_threads(n)
