"""Check `text_forgetting`: catastrophic forgetting of what the text source was trained for.

all-MiniLM-L6-v2 was trained for sentence similarity: its embeddings place related sentences close. The
measurement is that behaviour on general-English passages the target task never saw (Debian's `fortunes`):
the cosine similarities of every pair of passages under the source, and under each fine-tuned model's
encoder. Reported per fine-tuned strategy: the Spearman correlation of the two similarity lists (1 = the
geometry kept), and the fraction of passages whose nearest neighbour is unchanged. Flagged below
`diagnose.similarity_threshold`.

Every seed's model is measured; the mean over seeds carries a Student-t interval over the seeds. Remedy, for
the flagged full fine-tune: L2-SP trained under the pipeline's protocol (rate on validation, every seed), the
similarity re-measured and re-graded, beside the target test accuracy; LoRA, when listed, has its own finding.
"""

from __future__ import annotations

import numpy as np

from transferlab.diagnosis import findings as dx
from transferlab.diagnosis.checks import Check, DiagnosisContext, register_check

TUNED = ("finetune_full", "finetune_top", "gradual_unfreeze", "discriminative_lr", "l2sp", "lora")


def similarity_kept(before: np.ndarray, after: np.ndarray) -> dict:
    """Spearman correlation of pairwise cosine similarities, and nearest-neighbour retention."""
    from scipy.stats import spearmanr

    def cos(x: np.ndarray) -> np.ndarray:
        x = x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)
        return x @ x.T

    sb, sa = cos(before), cos(after)
    iu = np.triu_indices(len(before), 1)
    np.fill_diagonal(sb, -np.inf)
    np.fill_diagonal(sa, -np.inf)
    return {
        "similarity_spearman": round(float(spearmanr(sb[iu], sa[iu]).statistic), 6),
        "nearest_neighbour_kept": round(float((sb.argmax(1) == sa.argmax(1)).mean()), 6),
    }


@register_check("text_forgetting")
class TextForgetting(Check):
    order = 35
    modalities = ("text",)

    def _tuned(self, ctx: DiagnosisContext) -> list[str]:
        from transferlab.strategies import strategy_config

        return [
            n
            for n in sorted(ctx.params.strategies)
            if strategy_config(n, ctx.params.strategies[n]).kind in TUNED and n in ctx.preds_by_seed
        ]

    def applies(self, ctx: DiagnosisContext) -> bool:
        return bool(self._tuned(ctx)) and ctx.selected_spec.kind != "random_init"

    def _reference_ids(self, ctx: DiagnosisContext) -> np.ndarray:
        from transferlab.data.tokenize import load_tokenizer, tokenize
        from transferlab.diagnosis.text_measures import reference_texts

        if "reference_ids" not in ctx.cache:
            ref = reference_texts(min(ctx.params.diagnose.reference_texts, 200), ctx.seed)
            tok = load_tokenizer(ctx.data.meta["tokenizer"])
            ctx.cache["reference_ids"] = tokenize(ref, tok, int(ctx.data.meta["max_length"]))[0]
        return ctx.cache["reference_ids"]

    def _embed(self, ctx: DiagnosisContext, model) -> np.ndarray:
        from transferlab.models.inference import extract

        src = ctx.load_source()
        return extract(model, self._reference_ids(ctx), src.mean, src.std, with_logits=False, device=ctx.device)[0]

    def _source_embeddings(self, ctx: DiagnosisContext) -> np.ndarray:
        if "source_embeddings" not in ctx.cache:
            ctx.cache["source_embeddings"] = self._embed(ctx, ctx.load_source().model)
        return ctx.cache["source_embeddings"]

    def _kept(self, ctx: DiagnosisContext, models: list, threshold: float) -> tuple[dict, list[dict]]:
        """Similarity kept by each seed's model; the mean over seeds graded with a Student-t interval over the
        seeds (one seed: no interval, graded on the value)."""
        from scipy.stats import t

        before = self._source_embeddings(ctx)
        per_seed = [similarity_kept(before, self._embed(ctx, m)) for m in models]
        v = np.array([k["similarity_spearman"] for k in per_seed])
        half = (
            float(t.ppf(0.5 + ctx.confidence / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None
        )
        mean = float(v.mean())
        graded = dx.graded(
            mean,
            mean - half if half is not None else None,
            mean + half if half is not None else None,
            threshold,
            "below",
            quantity="Spearman correlation of pairwise sentence similarities, source vs fine-tuned, mean over seeds",
            interval="Student-t over seeds" if half is not None else "none (one seed)",
            confidence=ctx.confidence,
        )
        return graded, per_seed

    def measure(self, ctx: DiagnosisContext) -> list[dict]:
        dp = ctx.params.diagnose
        findings = []
        for name in self._tuned(ctx):
            measured, per_seed = self._kept(ctx, ctx.load_strategy_models(name), dp.similarity_threshold)
            findings.append(
                dx.finding(
                    "catastrophic_forgetting",
                    f"{name} on {ctx.selected} (sentence similarity on general English)",
                    "ok",
                    "warning",
                    {
                        "measure": "text_similarity",
                        "similarity_spearman": measured["value"],
                        "nearest_neighbour_kept": round(
                            float(np.mean([k["nearest_neighbour_kept"] for k in per_seed])), 6
                        ),
                        "per_seed": per_seed,
                        "reference_texts": len(self._source_embeddings(ctx)),
                        "reference_corpus": "Debian fortunes (general-English quotations)",
                        "threshold": dp.similarity_threshold,
                        "strategy": name,
                    },
                    "L2-SP (pull towards the source weights) or LoRA (the source weights stay frozen), or a "
                    "lower encoder learning rate; keep the source model for the similarity task.",
                    measured=measured,
                )
            )
        return findings

    def remedy(self, ctx: DiagnosisContext, finding: dict) -> dict | None:
        name = finding["evidence"]["strategy"]
        if ctx.kind_of(name) != "finetune_full":
            return None
        from transferlab.models.inference import predict_images

        res = ctx.protocol("l2sp", alpha=ctx.params.diagnose.l2sp_alpha)
        models = [r.model for _, r in sorted(res.runs.items())]
        src = ctx.load_source()
        after_rows = np.stack(
            [predict_images(m, ctx.test_images, src.mean, src.std, device=ctx.device).argmax(1).numpy() for m in models]
        )
        before = finding["measured"]
        after, _ = self._kept(ctx, models, before["threshold"])
        return dx.remedy_result(
            "remedy",
            f"l2sp (alpha={ctx.params.diagnose.l2sp_alpha}, AdamW variant) under the pipeline's protocol: lr "
            f"{res.lr:g} chosen on validation, seeds {sorted(res.runs)}",
            before=before,
            after=after,
            change=dx.difference(before, after),
            target=ctx.target_change(ctx.preds_by_seed[name], after_rows),
        )
