"""Check `negative_transfer`: every strategy and every candidate source (under the agreement stage's linear
probe) against scratch and the classical baseline (raw pixels or TF-IDF, `baseline.model`); remedy: the
selected source, or the linear probe."""

from __future__ import annotations

from transferlab.diagnosis import findings as dx
from transferlab.diagnosis.checks import Check, DiagnosisContext, register_check


@register_check("negative_transfer")
class NegativeTransfer(Check):
    order = 20

    def applies(self, ctx: DiagnosisContext) -> bool:
        return ctx.params.compare.baseline in ctx.preds

    def _models(self, ctx: DiagnosisContext) -> dict:
        base = ctx.params.compare.baseline
        strategies = {n: v for n, v in ctx.preds.items() if n not in (base, ctx.params.baseline.model)}
        return strategies | ctx.candidates

    def measure(self, ctx: DiagnosisContext) -> list[dict]:
        refs = {"scratch": ctx.preds[ctx.params.compare.baseline]}
        classical = ctx.params.baseline.model
        if classical in ctx.preds:
            refs[classical] = ctx.preds[classical]
        # Sources are compared under the linear probe: the same cheap head for each, so the features decide.
        return dx.negative_transfer(
            ctx.y, self._models(ctx), refs, n_bootstrap=ctx.n_bootstrap, seed=ctx.seed, confidence=ctx.confidence
        )

    def remedy(self, ctx: DiagnosisContext, finding: dict) -> dict | None:
        name = finding["subject"]
        if ":" in name:  # a candidate source: the remedy is the selected (closer / better-ranked) one
            alt = f"{name.split(':')[0]}:{ctx.selected}"
        else:
            alt = "linear_probe" if "linear_probe" in ctx.preds else None
        if not alt or alt == name:
            return None
        after = ctx.candidates.get(alt, ctx.preds.get(alt))
        if after is None:
            return None
        models = self._models(ctx)
        return dx.remedy_outcome(ctx.y, models[name], after, ctx.n_bootstrap, ctx.seed, alt, confidence=ctx.confidence)
