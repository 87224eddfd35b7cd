"""Check `forgetting_proxy`: catastrophic forgetting of an ImageNet source whose data is not on disk, by
proxy (source-head agreement on stratified probe images, per-stage CKA, weight drift); remedy: the
pipeline's finetune_top (early blocks frozen), compared on the same probe images."""

from __future__ import annotations

import copy

from transferlab.diagnosis import findings as dx
from transferlab.diagnosis.checks import Check, DiagnosisContext, register_check

TUNED_PREFERENCE = ("finetune_full", "discriminative_lr", "l2sp", "gradual_unfreeze", "finetune_top")


def tuned_strategy(ctx: DiagnosisContext) -> str | None:
    """The most-changed fine-tuned strategy the pipeline trained (first of TUNED_PREFERENCE listed)."""
    kinds = {n: dict(ctx.params.strategies[n] or {}).get("kind", n) for n in ctx.params.strategies}
    return next((n for k in TUNED_PREFERENCE for n in sorted(kinds) if kinds[n] == k), None)


@register_check("forgetting_proxy")
class ForgettingProxy(Check):
    order = 30
    modalities = ("image",)

    def applies(self, ctx: DiagnosisContext) -> bool:
        return tuned_strategy(ctx) is not None and ctx.load_source().has_classifier

    def measure(self, ctx: DiagnosisContext) -> list[dict]:
        source = ctx.load_source()
        name = tuned_strategy(ctx)
        tuned = ctx.load_strategy_model(name)
        probe = ctx.probe("test")
        f = dx.forgetting_by_proxy(
            source.model,
            tuned,
            probe,
            source.mean,
            source.std,
            agreement_threshold=ctx.params.diagnose.proxy_agreement_threshold,
            device=ctx.device,
        )
        f["subject"] = f"{ctx.selected} -> {name}"
        f["evidence"]["tuned_strategy"] = name
        return [f]

    def remedy(self, ctx: DiagnosisContext, finding: dict) -> dict | None:
        name = finding["evidence"]["tuned_strategy"]
        top = next(
            (
                n
                for n in sorted(ctx.params.strategies)
                if dict(ctx.params.strategies[n] or {}).get("kind", n) == "finetune_top"
            ),
            None,
        )
        if top is None or top == name:
            return None
        source = ctx.load_source()
        head = copy.deepcopy(source.model.get_classifier())
        probe = ctx.probe("test")
        dev = ctx.device
        original = dx.source_head_predictions(source.model, head, probe, source.mean, source.std, device=dev)
        return dx.remedy_outcome(
            original,
            dx.source_head_predictions(ctx.load_strategy_model(name), head, probe, source.mean, source.std, device=dev),
            dx.source_head_predictions(ctx.load_strategy_model(top), head, probe, source.mean, source.std, device=dev),
            ctx.n_bootstrap,
            ctx.seed,
            f"{top} (early blocks frozen), as trained by the pipeline",
            metric="source top-1 agreement on probe images",
            confidence=ctx.confidence,
        )
