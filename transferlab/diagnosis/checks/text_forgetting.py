"""Check `text_forgetting`: catastrophic forgetting of what the text source was trained for.

all-MiniLM-L6-v2 was trained for sentence similarity: its embeddings place related sentences close. The
measurement is that behaviour on general-English passages the target task never saw (Debian's `fortunes`):
the cosine similarities of every pair of passages under the source, and under each fine-tuned model's
encoder. Reported per fine-tuned strategy: the Spearman correlation of the two similarity lists (1 = the
geometry kept), and the fraction of passages whose nearest neighbour is unchanged. Flagged below
`diagnose.similarity_threshold`.

Remedies (the issue's pair), run for the flagged full fine-tune: L2-SP trained with the pipeline's recipe at
finetune_full's chosen rate (similarity kept and target test accuracy, before/after), and LoRA, whose
trained model is measured the same way when it is listed.
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
            if strategy_config(n, ctx.params.strategies[n]).kind in TUNED and n in ctx.preds
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

    def measure(self, ctx: DiagnosisContext) -> list[dict]:
        dp = ctx.params.diagnose
        before = self._source_embeddings(ctx)
        findings = []
        for name in self._tuned(ctx):
            kept = similarity_kept(before, self._embed(ctx, ctx.load_strategy_model(name)))
            ctx.cache.setdefault("kept", {})[name] = kept
            findings.append(
                dx.finding(
                    "catastrophic_forgetting",
                    f"{ctx.selected} -> {name} (sentence similarity on general English)",
                    kept["similarity_spearman"] < dp.similarity_threshold,
                    "warning",
                    {
                        "measure": "text_similarity",
                        **kept,
                        "reference_texts": len(before),
                        "reference_corpus": "Debian fortunes (general-English quotations)",
                        "threshold": dp.similarity_threshold,
                        "seed": ctx.train_seed,
                    },
                    "L2-SP (pull towards the source weights) or LoRA (the source weights stay frozen), or a "
                    "lower encoder learning rate; keep the source model for the similarity task.",
                )
            )
        return findings

    def remedy(self, ctx: DiagnosisContext, finding: dict) -> dict | None:
        name = finding["subject"].split(" -> ")[1].split(" ")[0]
        if name != "finetune_full":
            return None
        from transferlab.core.io import read_json
        from transferlab.models.inference import predict_images

        lr = float(read_json(ctx.train_metrics_dir / f"{name}.json")["lr"]) if ctx.train_metrics_dir else None
        lr = lr or float(dict(ctx.params.strategies[name] or {}).get("lr", 1e-3))
        res = ctx.finetune_like("l2sp", lr)
        src = ctx.load_source()
        after_pred = predict_images(res.model, ctx.test_images, src.mean, src.std, device=ctx.device).argmax(1).numpy()
        kept = similarity_kept(self._source_embeddings(ctx), self._embed(ctx, res.model))
        out = dx.remedy_outcome(
            ctx.y,
            ctx.preds[name],
            after_pred,
            ctx.n_bootstrap,
            ctx.seed,
            f"l2sp (alpha={ctx.params.diagnose.l2sp_alpha}, AdamW variant) at finetune_full's rate {lr:g}, "
            "the pipeline's recipe",
            confidence=ctx.confidence,
        )
        out["similarity_spearman_before"] = finding["evidence"]["similarity_spearman"]
        out["similarity_spearman_after"] = kept["similarity_spearman"]
        out["nearest_neighbour_kept_after"] = kept["nearest_neighbour_kept"]
        lora = {n: k for n, k in ctx.cache.get("kept", {}).items() if n.startswith("lora")}
        out["note"] = f"similarity kept (Spearman) {finding['evidence']['similarity_spearman']:.3f} -> " + (
            f"{kept['similarity_spearman']:.3f} with L2-SP"
            + "".join(f"; {n} (frozen source weights): {k['similarity_spearman']:.3f}" for n, k in lora.items())
        )
        return out
