"""Running a model on prepared inputs: uint8 images or token ids -> a batch (`to_input`), features and
source logits in one pass (`extract`), class probabilities (`predict_logits`, `predict_images`).

Batches are built on the CPU and moved to the model's device; on CUDA the pass runs under autocast
(`transferlab.core.device`). Texts are batched by length so padding stays short, in the input order out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from transferlab.core.device import as_device, autocast_context

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch is imported inside the functions: stages import this module before validating params, and a
# params typo must be reported without paying for torch.

log = logging.getLogger(__name__)


def to_input(images: np.ndarray, mean: tuple, std: tuple) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> normalised float32 (N, 3, H, W); token ids (N, L) of a text dataset -> int64
    ids cut to the batch's longest text (mean and std unused)."""
    import torch

    if images.ndim == 2:
        from transferlab.data.tokenize import ids_to_tensor

        return ids_to_tensor(images)

    x = torch.from_numpy(np.require(images, requirements=["C", "W"])).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


def extract(
    model: nn.Module,
    images: np.ndarray,
    mean: tuple,
    std: tuple,
    batch_size: int = 128,
    with_logits: bool = True,
    *,
    device: torch.device | str | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Penultimate features (and the classifier's logits) of a model over uint8 images (or token ids), in
    eval mode.

    The model is moved to `device` (default: the CPU) and left there; batches are built on the CPU and
    moved; on CUDA the pass runs under autocast (`transferlab.core.device`). The arrays are float32. Texts are
    batched by length (little padding); the rows come back in the caller's order.
    """
    import torch

    from transferlab.core.device import as_device, autocast_context

    device = as_device(device)
    model.to(device).eval()
    order = np.arange(len(images))
    if images.ndim == 2:  # token ids
        from transferlab.data.tokenize import length_order

        order = length_order(images)
    feats, logits = [], []
    with torch.no_grad(), autocast_context(device):
        for i in range(0, len(images), batch_size):
            x = to_input(images[order[i : i + batch_size]], mean, std).to(device, non_blocking=True)
            f = model.forward_head(model.forward_features(x), pre_logits=True)
            feats.append(f.float().cpu().numpy())
            if with_logits:
                logits.append(model.get_classifier()(f).float().cpu().numpy())
    back = np.argsort(order)
    return np.concatenate(feats)[back], (np.concatenate(logits)[back] if with_logits else None)


def predict_logits(
    model: nn.Module,
    inputs: Callable[[np.ndarray], torch.Tensor],
    n: int,
    batch_size: int = 256,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Logits of `model` (eval mode) over n samples; `inputs(idx)` builds a batch (on the CPU).

    `model` is moved to `device` (default: where its parameters already are, the CPU for a freshly built
    or loaded model) and left there; each batch is moved there too. The logits come back as float32 on
    the CPU whatever the device.
    """
    import torch

    device = module_device(model) if device is None else as_device(device)
    model.to(device).eval()
    with torch.no_grad(), autocast_context(device):
        out = [
            model(inputs(np.arange(i, min(i + batch_size, n))).to(device, non_blocking=True)).float().cpu()
            for i in range(0, n, batch_size)
        ]
    return torch.cat(out).float()


def predict_images(
    model: nn.Module, images: np.ndarray, mean: tuple, std: tuple, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """Logits of `model` (eval mode, moved to `device`) over uint8 (N, H, W, 3) images, normalised with
    `mean` / `std`; float32 on the CPU."""
    import torch

    if images.ndim == 2:  # token ids: batches of similar lengths (little padding), logits in the caller's order
        from transferlab.data.tokenize import length_order

        order = length_order(images)
        logits = predict_logits(model, lambda idx: to_input(images[order[idx]], mean, std), len(images), device=device)
        return logits[torch.from_numpy(np.argsort(order))]
    return predict_logits(model, lambda idx: to_input(images[idx], mean, std), len(images), device=device)


def module_device(model: nn.Module) -> torch.device:
    """The device of a module's first parameter (or buffer); the CPU for a module with neither."""
    import torch

    first = next(iter(model.parameters()), None)
    if first is None:
        first = next(iter(model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")
