"""One place that makes a run deterministic: random, numpy, torch and torch's algorithms.

What "deterministic" means depends on the device (`train.device`):

* CPU: same params + seed + thread count on the same machine give bit-identical metrics files.
* CUDA: reproducible run to run on the same card, driver and torch build (cuDNN in deterministic mode, no
  cuDNN autotuning, cuBLAS with a fixed workspace, deterministic algorithms where torch has them, a warning
  where it has none, e.g. some scatter/index backward kernels), but NOT bit-identical to the CPU: other
  kernels, other summation orders, and bfloat16/float16 autocast. Compare GPU runs with GPU runs.
"""

from __future__ import annotations

import os
import random
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
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
    import torch  # here, not at the top: stage modules import this one before validating params

    # cuBLAS reads this when it creates its handle (the first CUDA matmul), so it must be set before any
    # CUDA work: seed_everything runs first in every stage. ":4096:8" is the setting NVIDIA documents for
    # reproducible cuBLAS results (CUDA >= 10.2); a value the user already set wins.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if num_threads:
        torch.set_num_threads(num_threads)
    # warn_only: an op without a deterministic implementation warns instead of failing the run.
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True  # no nondeterministic cuDNN convolution algorithms
    torch.backends.cudnn.benchmark = False  # no autotuning: the same algorithm on every run
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen
