"""Check `overfitting`: the train/validation accuracy gap at the best epoch (`training.rules.best_row`, the
checkpoint kept) on every seed, with its interval. Evidence when flagged: the linear probe (the whole backbone
frozen), as already trained by the pipeline, its gap and target accuracy beside the flagged model's."""

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
                histories[name] = {s: h.to_dict("records") for s, h in by_seed.items()}
        out = dx.overfitting(
            histories,
            ctx.params.diagnose.overfit_gap_threshold,
            n_train=len(ctx.data.labels["train"]),
            n_val=len(ctx.data.labels["val"]),
            confidence=ctx.confidence,
        )
        ctx.cache["overfitting"] = {f["subject"]: f for f in out}
        return out

    def remedy(self, ctx: DiagnosisContext, finding: dict) -> dict | None:
        name = finding["subject"]
        lp = next((n for n in sorted(ctx.preds_by_seed) if ctx.kind_of(n) == "linear_probe"), None)
        other = ctx.cache.get("overfitting", {}).get(lp)
        if lp is None or lp == name or other is None or name not in ctx.preds_by_seed:
            return None
        before, after = finding["measured"], other["measured"]
        return dx.remedy_result(
            "evidence",
            f"{lp} (the whole backbone frozen) as already trained, against {name}: two existing models compared",
            before=before,
            after=after,
            change=dx.difference(before, after),
            target=ctx.target_change(ctx.preds_by_seed[name], ctx.preds_by_seed[lp]),
        )
