"""Per-channel statistics of the activations entering a BatchNorm layer, exact over any number of batches.

`ChannelMoments` is the one implementation behind the two places that measure them: the `adabn` strategy
(which writes them into the layer as its new running statistics) and the diagnosis' `bn_statistics_gap`
(which compares them with the source's running statistics).

torch is imported inside the methods: strategy modules import this one and must stay importable without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm


class ChannelMoments:
    """Per-channel count, mean and sum of squared deviations in float64, merged batch by batch with the
    pairwise update of Chan, Golub & LeVeque (1979): the exact population mean and variance of everything
    seen, whatever the batch sizes (a mean of per-batch variances would miss the spread of the batch means).

    Attributes:
        count: values seen per channel (samples x height x width).
        mean: (C,) float64 on the CPU, None before the first non-empty batch.
        m2: (C,) sum of squared deviations from `mean`, None before the first non-empty batch.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, act: torch.Tensor) -> None:
        """Merge one batch of activations (N, C, ...) (channel axis 1, as BatchNorm reads them)."""
        import torch

        a = act.detach().to(device="cpu", dtype=torch.float64).transpose(0, 1).reshape(act.shape[1], -1)
        nb = a.shape[1]
        if nb == 0:
            return
        mean_b = a.mean(dim=1)
        m2_b = ((a - mean_b[:, None]) ** 2).sum(dim=1)
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = nb, mean_b, m2_b
            return
        total = self.count + nb
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (nb / total)
        self.m2 = self.m2 + m2_b + delta**2 * (self.count * nb / total)
        self.count = total

    @property
    def seen(self) -> bool:
        """Whether any value was merged (a layer the forward pass never reached has none)."""
        return self.mean is not None and self.m2 is not None and self.count > 0

    @property
    def variance(self) -> torch.Tensor:
        """(C,) population variance (divisor N: what BatchNorm normalises a batch with)."""
        if not self.seen:
            raise ValueError("no activations were merged: the layer was not reached by the forward pass")
        return self.m2 / self.count

    def store(self, bn: _BatchNorm) -> None:
        """Write the mean and population variance into `bn` as its running statistics."""
        bn.running_mean.copy_(self.mean.to(bn.running_mean.dtype))
        bn.running_var.copy_(self.variance.to(bn.running_var.dtype))
        bn.num_batches_tracked.fill_(1)
