"""Check `negative_transfer`: every strategy and every candidate source (under the agreement stage's linear
probe) against scratch and the best model without transfer (scratch or the classical baseline, raw pixels or
TF-IDF, whichever validates better), on every training seed.

The strategies' gains and intervals are read from compare's metrics/summary.json, so the report and the
diagnosis never disagree about a model; the candidates are graded with the same bootstrap and the same
parameters (`compare.n_bootstrap`, `compare.confidence`, `seed`). Sources of kind `random_init` are controls:
reference points listed apart (`ctx.controls`), never findings: a random-init source below the classical
baseline is the expected result. The remedy (feature extraction, or the selected source) compares two models
that already exist: it is recorded as evidence, not a remedy run.
"""

from __future__ import annotations

import numpy as np

from transferlab.diagnosis import findings as dx
from transferlab.diagnosis.checks import Check, DiagnosisContext, register_check

CONTROL_NOTE = (
    "a control (random-init source): a reference point for the pre-trained sources, not a finding; below the "
    "classical baseline is its expected result"
)


def controls(ctx: DiagnosisContext) -> set[str]:
    """Names of the sources of kind `random_init` (the controls)."""
    return {n for n, s in ctx.params.sources.items() if s.kind == "random_init"}


@register_check("negative_transfer")
class NegativeTransfer(Check):
    order = 20

    def applies(self, ctx: DiagnosisContext) -> bool:
        return ctx.params.compare.baseline in ctx.preds_by_seed

    def _rows(self, ctx: DiagnosisContext, name: str) -> np.ndarray | None:
        if name in ctx.preds_by_seed:
            return ctx.preds_by_seed[name]
        return ctx.candidates[name][None, :] if name in ctx.candidates else None

    def _references(self, ctx: DiagnosisContext) -> dict[str, np.ndarray]:
        """scratch, and the best model without transfer (compare's choice on validation; without a summary,
        the classical baseline)."""
        base, classical = ctx.params.compare.baseline, ctx.params.baseline.model
        best = ((ctx.summary or {}).get("best_non_transfer") or {}).get("name", classical)
        return {n: ctx.preds_by_seed[n] for n in dict.fromkeys((base, best)) if n in ctx.preds_by_seed}

    def measure(self, ctx: DiagnosisContext) -> list[dict]:
        base, classical = ctx.params.compare.baseline, ctx.params.baseline.model
        ctl = controls(ctx)
        refs = self._references(ctx)
        common = {
            "n_bootstrap": ctx.compare_n_bootstrap,
            "seed": ctx.seed,
            "confidence": ctx.confidence,
            "critical": base,
        }
        if ctx.summary and ctx.summary.get("strategies"):
            out = dx.negative_transfer_from_summary(ctx.summary, exclude=(base, classical))
        else:
            strategies = {n: v for n, v in ctx.preds_by_seed.items() if n not in (base, classical)}
            out = dx.negative_transfer(ctx.y, strategies, refs, **common)
        if ctx.selected in ctl:  # every strategy then stands on a random-init source: they are controls too
            for f in out:
                ctx.controls.append(
                    {"subject": f["subject"], "gain_vs": f["evidence"]["gain_vs"], "note": CONTROL_NOTE}
                )
            out = []
        # The selected source under the agreement's linear probe is the linear_probe strategy's model again:
        # measured once (the strategy's finding), so that it is not counted twice.
        lp = next((f for f in out if ctx.kind_of(f["subject"]) == "linear_probe"), None)
        same = f"linear_probe:{ctx.selected}"
        cands = {n: p for n, p in ctx.candidates.items() if not (lp and n == same)}
        if lp and same in ctx.candidates:
            lp["evidence"]["also_measured_as"] = f"{same} (agreement stage): counted once, here"
        for f in dx.negative_transfer(ctx.y, cands, refs, **common):
            if f["subject"].split(":", 1)[1] in ctl:
                ctx.controls.append(
                    {"subject": f["subject"], "gain_vs": f["evidence"]["gain_vs"], "note": CONTROL_NOTE}
                )
            else:
                out.append(f)
        return out

    def remedy(self, ctx: DiagnosisContext, finding: dict) -> dict | None:
        name = finding["subject"]
        if ":" in name:  # a candidate source: the selected (closer / better-ranked) one, same probe
            alt = f"{name.split(':')[0]}:{ctx.selected}"
        else:
            alt = next((n for n in sorted(ctx.preds_by_seed) if ctx.kind_of(n) == "linear_probe"), None)
        ref = finding["measured"]["quantity"].removeprefix("test accuracy gain vs ")
        a, b, r = self._rows(ctx, alt) if alt else None, self._rows(ctx, name), self._rows(ctx, ref)
        if alt is None or alt == name or a is None or b is None or r is None:
            return None
        before = finding["measured"]
        g = ctx.gain(a, r)
        after = dx.graded(
            g["gain"],
            g["ci_low"],
            g["ci_high"],
            0.0,
            "below",
            quantity=before["quantity"],
            interval=before["interval"],
            confidence=ctx.confidence,
        )
        target = ctx.target_change(b, a)
        return dx.remedy_result(
            "evidence",
            f"{alt} as already trained, against {name} (two existing models compared: nothing re-trained)",
            before=before,
            after=after,
            change=target["change"],  # a gain over the same reference changes by the paired gain of alt over name
            target=target,
        )
