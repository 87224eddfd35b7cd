"""Check `domain_shift`: only from evidence that measures the source domain.

* The selected source: its own BatchNorm running statistics (set on its pre-training data) against the
  activations of stratified target images; MMD and the proxy A-distance only when the user provides
  source-domain images (`diagnose.source_images`), otherwise "not measurable offline" (no stand-in domain:
  crops of two sample photos are separable from any dataset, PAD = 2 by construction). Remedy when
  flagged: AdaBN against the linear probe (same frozen backbone), trained under the pipeline's protocol (every
  seed), its BN gap re-measured and re-graded; when the pipeline already trained an adabn entry, that model is
  compared instead, as evidence.
* The in-pipeline source (`diagnose.forgetting_source`): its own source-task images are on disk, so MMD and
  the proxy A-distance are real; evidence: the selected source under the same linear probe.

The BatchNorm gap carries a bootstrap interval over the probe images; a gap whose interval straddles
`diagnose.bn_gap_threshold` is undetermined.
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
            "n_bootstrap": ctx.n_bootstrap,
            "confidence": ctx.confidence,
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
        ctx.cache["domain_shift"] = out
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
            sel = next((f for f in ctx.cache.get("domain_shift", []) if f["evidence"]["source"] == ctx.selected), None)
            if a not in ctx.candidates or b not in ctx.candidates:
                return None
            before, after = finding.get("measured"), (sel or {}).get("measured")
            return dx.remedy_result(
                "evidence",
                f"a closer source: the agreement stage's linear probe on {ctx.selected} against the one on {source} "
                "(two existing models compared, nothing re-trained)",
                before=before,
                after=after,
                change=dx.difference(before, after) if before and after else None,
                target=ctx.target_change(ctx.candidates[a][None, :], ctx.candidates[b][None, :]),
            )
        lp = next((n for n in sorted(ctx.preds_by_seed) if ctx.kind_of(n) == "linear_probe"), None)
        if lp is None or finding.get("measured") is None:
            return None
        listed, _ = adabn_config(ctx)
        src = ctx.load_source()
        if listed and listed in ctx.preds_by_seed:  # the pipeline already trained it: evidence, not a remedy run
            kind, models, after_rows = "evidence", ctx.load_strategy_models(listed), ctx.preds_by_seed[listed]
            how = f"{listed} as already trained by the pipeline, against {lp} (two existing models compared)"
        else:
            from transferlab.models.inference import predict_images

            res = ctx.protocol("adabn", like=None)  # adabn's own settings: it trains a head, not a backbone
            models = [r.model for _, r in sorted(res.runs.items())]
            after_rows = np.stack(
                [
                    predict_images(m, ctx.test_images, src.mean, src.std, device=ctx.device).argmax(1).numpy()
                    for m in models
                ]
            )
            kind = "remedy"
            how = (
                f"adabn under the pipeline's protocol (lr {res.lr:g} chosen on validation, seeds {sorted(res.runs)}), "
                f"against {lp} (same frozen backbone, BN statistics re-estimated on the target)"
            )
        dp = ctx.params.diagnose
        before = finding["measured"]
        after = dx.bn_gap_graded(
            models,
            ctx.probe("train"),
            src.mean,
            src.std,
            threshold=dp.bn_gap_threshold,
            n_bootstrap=ctx.n_bootstrap,
            seed=ctx.seed,
            confidence=ctx.confidence,
            device=ctx.device,
        )
        return dx.remedy_result(
            kind,
            how,
            before=before,
            after=after,
            change=dx.difference(before, after) if after else None,
            target=ctx.target_change(ctx.preds_by_seed[lp], after_rows),
        )
