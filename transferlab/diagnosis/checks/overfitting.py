"""Check `overfitting`: the train/validation gap at the best epoch (first seed); remedy: freeze more (the
linear probe's predictions, already trained by the pipeline)."""

from __future__ import annotations

from transferlab.core import layout
from transferlab.diagnosis import findings as dx
from transferlab.diagnosis.checks import Check, DiagnosisContext, register_check


@register_check("overfitting")
class Overfitting(Check):
    order = 70

    def measure(self, ctx: DiagnosisContext) -> list[dict]:
        histories = {}
        for name in sorted(ctx.params.strategies):
            by_seed = layout.read_histories(ctx.history_dir / name)
            if by_seed:
                histories[name] = next(iter(by_seed.values())).to_dict("records")
        return dx.overfitting(histories, ctx.params.diagnose.overfit_gap_threshold)

    def remedy(self, ctx: DiagnosisContext, finding: dict) -> dict | None:
        name = finding["subject"]
        if name == "linear_probe" or "linear_probe" not in ctx.preds or name not in ctx.preds:
            return None
        return dx.remedy_outcome(
            ctx.y,
            ctx.preds[name],
            ctx.preds["linear_probe"],
            ctx.n_bootstrap,
            ctx.seed,
            "linear_probe (freeze the whole backbone)",
            confidence=ctx.confidence,
        )
