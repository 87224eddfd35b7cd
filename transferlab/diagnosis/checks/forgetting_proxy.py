"""Check `forgetting_proxy`: catastrophic forgetting of an ImageNet source whose data is not on disk, by
proxy (source-head agreement on stratified probe images, every seed's model, with its interval; per-stage CKA
and weight drift of the first seed's); evidence when flagged: the pipeline's finetune_top (early blocks frozen),
as already trained, on the same probe images (two existing models: evidence, not a remedy run)."""

from __future__ import annotations

import copy

import numpy as np

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
        probe = ctx.probe("test")
        f = dx.forgetting_by_proxy(
            source.model,
            ctx.load_strategy_models(name),
            probe,
            source.mean,
            source.std,
            agreement_threshold=ctx.params.diagnose.proxy_agreement_threshold,
            n_bootstrap=ctx.n_bootstrap,
            seed=ctx.seed,
            confidence=ctx.confidence,
            device=ctx.device,
        )
        f["subject"] = f"{name} on {ctx.selected} (proxy: source data unavailable)"
        f["evidence"]["tuned_strategy"] = name
        return [f]

    def _agreement_rows(self, ctx: DiagnosisContext, name: str, original: np.ndarray) -> np.ndarray:
        source = ctx.load_source()
        head = copy.deepcopy(source.model.get_classifier())
        probe = ctx.probe("test")
        return np.stack(
            [
                dx.source_head_predictions(m, head, probe, source.mean, source.std, device=ctx.device)
                for m in ctx.load_strategy_models(name)
            ]
        )

    def remedy(self, ctx: DiagnosisContext, finding: dict) -> dict | None:
        name = finding["evidence"]["tuned_strategy"]
        top = next((n for n in sorted(ctx.params.strategies) if ctx.kind_of(n) == "finetune_top"), None)
        if top is None or top == name or top not in ctx.preds_by_seed or name not in ctx.preds_by_seed:
            return None
        source = ctx.load_source()
        head = copy.deepcopy(source.model.get_classifier())
        original = dx.source_head_predictions(
            source.model, head, ctx.probe("test"), source.mean, source.std, device=ctx.device
        )
        rows_name = self._agreement_rows(ctx, name, original)
        rows_top = self._agreement_rows(ctx, top, original)
        before = finding["measured"]
        a = dx.level(original, rows_top, ctx.n_bootstrap, ctx.seed, ctx.confidence)
        after = dx.graded(
            a["value"],
            a["ci_low"],
            a["ci_high"],
            before["threshold"],
            "below",
            quantity=before["quantity"],
            interval=before["interval"],
            confidence=ctx.confidence,
        )
        return dx.remedy_result(
            "evidence",
            f"{top} (early blocks frozen) as already trained by the pipeline, against {name}: two existing models "
            "compared, nothing re-trained",
            before=before,
            after=after,
            change=dx._gain(original, rows_top, rows_name, ctx.n_bootstrap, ctx.seed, ctx.confidence),
            target=ctx.target_change(ctx.preds_by_seed[name], ctx.preds_by_seed[top]),
        )
