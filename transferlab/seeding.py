"""One place that makes a run deterministic: random, numpy, torch and torch's algorithms."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int, num_threads: int = 0) -> torch.Generator:
    """Seed every RNG and switch torch to deterministic kernels.

    Args:
        seed: the run's seed (params `seed`).
        num_threads: torch CPU threads (0 keeps torch's default). The same thread count on the same
            machine is part of bit-for-bit reproducibility: reductions may split differently otherwise.

    Returns:
        A seeded torch.Generator for DataLoaders and samplers.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if num_threads:
        torch.set_num_threads(num_threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen
