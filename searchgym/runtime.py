"""Process-wide set-up every entry point shares: random seeds, the compute device, torch's threads."""

import random

import numpy as np
import torch

from searchgym.errors import SearchgymError


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto`` is cuda when a GPU is visible, else cpu.

    Raises:
        SearchgymError: cuda is asked for and no GPU is visible.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SearchgymError("system.device=cuda but no GPU is visible: set system.device=cpu (or auto)")
    return torch.device(name)


def set_torch_threads(threads: int | None) -> None:
    """Use ``threads`` intra-op threads (None keeps torch's default).

    On a shared CPU, processes that each use every core slow one another down badly: set it explicitly
    wherever several processes share the machine.
    """
    if threads is not None:
        torch.set_num_threads(threads)
