"""Check `resolution`: the target image size against the source's pre-training input size.

Source size: the `pretrain.<name>.image_size` of an in-pipeline source, else timm's
`pretrained_cfg["input_size"]` of its architecture (224 for EfficientNet-Lite0, 240 Lite1, 260 Lite2).
Remedy when the target is below `diagnose.resolution_ratio_threshold` of it: features of the frozen source
at a larger size (target images upsampled bilinearly to min(source size, resolution_upsample_factor x
target size)), the same logistic-regression probe fit on train features at both sizes; validation accuracy
decides, test accuracy is reported with its CI beside the re-graded ratio.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from transferlab.diagnosis import findings as dx
from transferlab.diagnosis.checks import Check, DiagnosisContext, register_check
from transferlab.models.inference import to_input


def source_input_size(ctx: DiagnosisContext, name: str, model: torch.nn.Module) -> tuple[int, str]:
    """(side in pixels, where it came from) of the images the source was pre-trained on."""
    spec = ctx.selected_spec if name == ctx.selected else ctx.params.sources[name]
    if spec.kind == "pipeline" and "image_size" in (ctx.params.pretrain.get(name) or {}):
        return int(ctx.params.pretrain[name]["image_size"]), f"pretrain.{name}.image_size"
    size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    if size:
        return int(size[-1]), "timm pretrained_cfg input_size"
    return 224, "default (the architecture declares none)"


@torch.no_grad()
def features_at(
    model: torch.nn.Module, images: np.ndarray, mean, std, size: int, batch: int = 128, *, device=None
) -> np.ndarray:
    """Penultimate features of uint8 images bilinearly resized to `size` px (eval mode), on `device`
    (default: the CPU; the model is moved there). Resizing happens on the CPU, as in a CPU run."""
    device = torch.device("cpu") if device is None else torch.device(device)
    model.to(device).eval()
    out = []
    for i in range(0, len(images), batch):
        x = to_input(images[i : i + batch], mean, std)
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = x.to(device, non_blocking=True)
        out.append(model.forward_head(model.forward_features(x), pre_logits=True).float().cpu().numpy())
    return np.concatenate(out)


def probe_predictions(feats: dict[str, np.ndarray], labels: dict[str, np.ndarray], seed: int) -> dict:
    """Logistic regression on standardised train features; predictions on val and test."""
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))
    clf.fit(feats["train"], labels["train"])
    return {s: clf.predict(feats[s]) for s in ("val", "test")}


@register_check("resolution")
class Resolution(Check):
    order = 50
    modalities = ("image",)

    def measure(self, ctx: DiagnosisContext) -> list[dict]:
        src = ctx.load_source()
        size, origin = source_input_size(ctx, ctx.selected, src.model)
        target = int(ctx.data.meta.get("image_size", ctx.data.images["train"].shape[1]))
        f = dx.resolution(
            ctx.selected,
            target,
            size,
            ratio_threshold=ctx.params.diagnose.resolution_ratio_threshold,
            size_origin=origin,
        )
        f["evidence"]["remedy_size"] = min(size, ctx.params.diagnose.resolution_upsample_factor * target)
        return [f]

    def remedy(self, ctx: DiagnosisContext, finding: dict) -> dict | None:
        src = ctx.load_source()
        native = finding["evidence"]["target_image_size"]
        big = finding["evidence"]["remedy_size"]
        if big <= native:
            return None
        images = {"train": ctx.data.images["train"], "val": ctx.data.images["val"], "test": ctx.test_images}
        before = probe_predictions(
            {s: features_at(src.model, im, src.mean, src.std, native, device=ctx.device) for s, im in images.items()},
            self._labels(ctx),
            ctx.seed,
        )
        after = probe_predictions(
            {s: features_at(src.model, im, src.mean, src.std, big, device=ctx.device) for s, im in images.items()},
            self._labels(ctx),
            ctx.seed,
        )
        y_val = ctx.data.labels["val"]
        val_before, val_after = float((before["val"] == y_val).mean()), float((after["val"] == y_val).mean())
        m = finding["measured"]
        ratio_after = dx.graded(
            big / finding["evidence"]["source_input_size"],
            None,
            None,
            m["threshold"],
            m["direction"],
            quantity=m["quantity"],
            interval=m["interval"],
        )
        choice = "upsample" if val_after > val_before else "keep the native size"
        return dx.remedy_result(
            "remedy",
            f"frozen {ctx.selected} features at {big} px (upsampled) vs {native} px, the same logistic-regression "
            "probe (deterministic: no training seeds)",
            before=m,
            after=ratio_after,
            change=dx.difference(m, ratio_after),
            target=ctx.target_change(before["test"], after["test"]),
            note=f"validation {val_before:.3f} -> {val_after:.3f}: validation says {choice}",
        )

    @staticmethod
    def _labels(ctx: DiagnosisContext) -> dict[str, np.ndarray]:
        return {"train": ctx.data.labels["train"], "val": ctx.data.labels["val"], "test": ctx.y}
