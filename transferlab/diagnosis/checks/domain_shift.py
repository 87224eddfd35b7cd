"""Check `domain_shift`: only from evidence that measures the source domain.

* The selected source: its own BatchNorm running statistics (set on its pre-training data) against the
  activations of stratified target images; MMD and the proxy A-distance only when the user provides
  source-domain images (`diagnose.source_images`), otherwise "not measurable offline" (no stand-in domain:
  crops of two sample photos are separable from any dataset, PAD = 2 by construction). Remedy when
  flagged: AdaBN against the linear probe (same frozen backbone), trained with the pipeline's recipe.
* The in-pipeline source (`diagnose.forgetting_source`): its own source-task images are on disk, so MMD and
  the proxy A-distance are real; remedy: the selected source under the same linear probe.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from transferlab.diagnosis import findings as dx
from transferlab.diagnosis.checks import Check, DiagnosisContext, register_check
from transferlab.diagnosis.measures import stratified_indices
from transferlab.models.inference import extract

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def load_image_folder(folder: str | Path, size: int, n: int, seed: int) -> np.ndarray:
    """Up to `n` images of a folder (searched recursively, sorted, a seeded subset), RGB, `size` px square.

    Raises:
        FileNotFoundError: the folder does not exist or holds no image.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if len(files) < 2:
        raise FileNotFoundError(
            f"diagnose.source_images: {folder} holds {len(files)} image(s) ({', '.join(IMAGE_SUFFIXES)}); "
            "point it at a folder of source-domain images, or set it to null"
        )
    if len(files) > n:
        files = [files[i] for i in sorted(np.random.default_rng(seed).choice(len(files), n, replace=False))]
    out = []
    for p in files:
        with Image.open(p) as im:
            out.append(np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR)))
    return np.stack(out)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1] == size and images.shape[2] == size and images.ndim == 4 and images.shape[3] == 3:
        return images
    return np.stack(
        [np.asarray(Image.fromarray(im).convert("RGB").resize((size, size), Image.BILINEAR)) for im in images]
    )


def adabn_config(ctx: DiagnosisContext):
    """The adabn entry of `strategies` when one is listed, else the strategy's defaults."""
    from transferlab.strategies import strategy_config

    listed = next(
        (n for n in sorted(ctx.params.strategies) if dict(ctx.params.strategies[n] or {}).get("kind", n) == "adabn"),
        None,
    )
    return listed, strategy_config("adabn", ctx.params.strategies[listed] if listed else {})


@register_check("domain_shift")
class DomainShift(Check):
    order = 40
    modalities = ("image",)

    def _target_feats(self, ctx: DiagnosisContext, source: str) -> np.ndarray:
        idx = stratified_indices(ctx.y, ctx.params.diagnose.probe_images, seed=ctx.seed)
        cached = np.load(ctx.features_dir / source / "test_features.npy")
        return cached[ctx.test_rows(ctx.sample_ids)[idx]]

    def measure(self, ctx: DiagnosisContext) -> list[dict]:
        dp = ctx.params.diagnose
        size = ctx.data.images["train"].shape[1]
        target = ctx.probe("train")
        common = {
            "n_permutations": dp.mmd_permutations,
            "seed": ctx.seed,
            "pad_threshold": dp.pad_threshold,
            "bn_gap_threshold": dp.bn_gap_threshold,
        }
        src = ctx.load_source()
        source_feats = target_feats = None
        if ctx.source_images is not None:
            source_feats, _ = extract(
                src.model, ctx.source_images, src.mean, src.std, with_logits=False, device=ctx.device
            )
            target_feats = self._target_feats(ctx, ctx.selected)
        out = [
            dx.domain_shift(
                src.model,
                target,
                source_feats,
                target_feats,
                src.mean,
                src.std,
                source_domain=f"{ctx.selected}"
                + (" (source images: diagnose.source_images)" if source_feats is not None else ""),
                device=ctx.device,
                **common,
            )
        ]
        out[0]["evidence"]["source"] = ctx.selected
        fs = dp.forgetting_source
        if fs:
            base = ctx.load_source(fs)
            pdir = ctx.pretrained_dir / fs
            s_images, s_labels = np.load(pdir / "source_test_images.npy"), np.load(pdir / "source_test_labels.npy")
            # The source task may be stored at its pre-training size: compared at the target's.
            s_probe = resize_images(s_images[stratified_indices(s_labels, dp.probe_images, seed=ctx.seed)], size)
            fs_source, _ = extract(base.model, s_probe, base.mean, base.std, with_logits=False, device=ctx.device)
            f = dx.domain_shift(
                base.model,
                target,
                fs_source,
                self._target_feats(ctx, fs),
                base.mean,
                base.std,
                source_domain=f"{fs} (its own source data)",
                device=ctx.device,
                **common,
            )
            f["evidence"]["source"] = fs
            out.append(f)
        return out

    def remedy(self, ctx: DiagnosisContext, finding: dict) -> dict | None:
        source = finding["evidence"]["source"]
        if source != ctx.selected:  # the in-pipeline source: a closer source under the same linear probe
            a, b = f"linear_probe:{source}", f"linear_probe:{ctx.selected}"
            if a not in ctx.candidates or b not in ctx.candidates:
                return None
            return dx.remedy_outcome(
                ctx.y,
                ctx.candidates[a],
                ctx.candidates[b],
                ctx.n_bootstrap,
                ctx.seed,
                f"a closer source: linear_probe on {ctx.selected}",
                confidence=ctx.confidence,
            )
        if "linear_probe" not in ctx.preds:
            return None
        listed, cfg = adabn_config(ctx)
        if listed and listed in ctx.preds:  # the pipeline already trained it: reuse, do not retrain
            after, how = ctx.preds[listed], f"{listed} as trained by the pipeline"
        else:
            from transferlab.core.seeding import seed_everything
            from transferlab.models.inference import predict_images
            from transferlab.strategies import get_strategy
            from transferlab.training.protocol import train_strategy

            seed = ctx.train_seed
            src = ctx.load_source()
            result = train_strategy(
                get_strategy("adabn"),
                cfg,
                src,
                ctx.data.images,
                ctx.data.labels,
                ctx.data.num_classes,
                ctx.recipe("adabn", cfg),
                seed=seed,
                generator=seed_everything(seed, ctx.params.train.num_threads),
                label="diagnose adabn",
            )
            after = predict_images(result.model, ctx.test_images, src.mean, src.std, device=ctx.device)
            after = after.argmax(1).numpy()
            how = f"adabn (lr {cfg.lr:g}, the pipeline's recipe)"
        return dx.remedy_outcome(
            ctx.y,
            ctx.preds["linear_probe"],
            after,
            ctx.n_bootstrap,
            ctx.seed,
            f"{how} vs linear_probe (same frozen backbone, BN statistics re-estimated exactly on the target)",
            confidence=ctx.confidence,
        )
