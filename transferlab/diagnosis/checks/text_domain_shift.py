"""Check `text_domain_shift`: how far the target texts are from general English, measured the text way.

Evidence, target (the prepared train texts) against a general-English reference (Debian's `fortunes`):
- the tokenizer's view: unknown-token rate, word-pieces per whitespace word, fraction of words split;
- the surface of social-media text: emoji, hashtag, mention, URL, non-ASCII and elongated-word rates;
- MMD (permutation test) and the proxy A-distance between the selected source's embeddings of both.

Flagged like the image check: MMD p < 0.05 and proxy A-distance above `diagnose.pad_threshold`. The finding
names the user's data in their words (`data_name`: the dataset, or the file `data.path` names). Remedies, each
run before/after on the target test split:
- normalisation (`transferlab.diagnosis.text_measures.normalise`: URLs, mentions, hashtags, emoji names,
  mis-decoded bytes, elongations): the same probe (standardised features + logistic regression, C chosen on validation)
  on the selected source's embeddings of raw and of normalised texts, plus the shift measures after;
- the domain-adapted source (a `dapt` entry of `pretrain`), when it is a candidate: the agreement stage's
  converged linear probes of the source and of its adapted copy, on the same test texts.
"""

from __future__ import annotations

import numpy as np

from transferlab.diagnosis import findings as dx
from transferlab.diagnosis.checks import Check, DiagnosisContext, register_check

PROBE_C_GRID = (0.01, 0.1, 1.0, 10.0)


def data_name(ctx: DiagnosisContext) -> str:
    """The user's data in their own words: the dataset the params name (`tweets`), or the file or folder they
    pointed `data.path` at (a CSV of another task is named by its file, never called tweets)."""
    from pathlib import Path

    d = ctx.params.data
    if d.path:
        return f"texts of {Path(d.path).name}" if d.dataset == "csv" else Path(d.path).name
    return str(d.dataset)


def probe_predictions(
    feats: dict[str, np.ndarray], labels: dict[str, np.ndarray], seed: int
) -> tuple[np.ndarray, float]:
    """Test predictions of a standardised logistic-regression probe, C chosen on validation accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    best = None
    for C in PROBE_C_GRID:
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000, random_state=seed))
        clf.fit(feats["train"], labels["train"])
        acc = float((clf.predict(feats["val"]) == labels["val"]).mean())
        if best is None or acc > best[0]:
            best = (acc, clf)
    return best[1].predict(feats["test"]), best[0]


@register_check("text_domain_shift")
class TextDomainShift(Check):
    order = 40
    modalities = ("text",)

    def _tokenizer(self, ctx: DiagnosisContext):
        from transferlab.data.tokenize import load_tokenizer

        if "tokenizer" not in ctx.cache:
            ctx.cache["tokenizer"] = load_tokenizer(ctx.data.meta["tokenizer"])
        return ctx.cache["tokenizer"]

    def _embed(self, ctx: DiagnosisContext, texts: list[str]) -> np.ndarray:
        from transferlab.data.tokenize import tokenize
        from transferlab.models.inference import extract

        src = ctx.cache.setdefault("text_source", ctx.load_source())
        ids, _ = tokenize(texts, self._tokenizer(ctx), int(ctx.data.meta["max_length"]))
        feats, _ = extract(src.model, ids, src.mean, src.std, with_logits=False, device=ctx.device)
        return feats

    def _cached(self, ctx: DiagnosisContext, split: str) -> np.ndarray:
        """The features@ cache of the selected source: its embeddings of the prepared texts of `split`."""
        return np.load(ctx.features_dir / ctx.selected / f"{split}_features.npy")

    def _shift(
        self,
        ctx: DiagnosisContext,
        target: list[str],
        reference: list[str],
        ref_feats: np.ndarray,
        feats: np.ndarray | None = None,
    ) -> dict:
        from transferlab.diagnosis.measures import mmd_permutation_test, proxy_a_distance
        from transferlab.diagnosis.text_measures import surface_rates, tokenizer_rates

        tok = self._tokenizer(ctx)
        feats = self._embed(ctx, target) if feats is None else feats
        mmd = mmd_permutation_test(feats, ref_feats, n_permutations=ctx.params.diagnose.mmd_permutations, seed=ctx.seed)
        return {
            "target": {**tokenizer_rates(target, tok), **surface_rates(target)},
            "reference": {**tokenizer_rates(reference, tok), **surface_rates(reference)},
            "mmd2": round(float(mmd["mmd2"]), 6),
            "mmd_p_value": round(float(mmd["p_value"]), 6),
            "proxy_a_distance": round(float(proxy_a_distance(feats, ref_feats, seed=ctx.seed)), 6),
        }

    def _reference(self, ctx: DiagnosisContext) -> tuple[list[str], np.ndarray]:
        from transferlab.diagnosis.text_measures import reference_texts

        if "reference" not in ctx.cache:
            ref = reference_texts(ctx.params.diagnose.reference_texts, ctx.seed)
            ctx.cache["reference"] = (ref, self._embed(ctx, ref))
        return ctx.cache["reference"]

    def measure(self, ctx: DiagnosisContext) -> list[dict]:
        dp = ctx.params.diagnose
        reference, ref_feats = self._reference(ctx)
        target = [str(t) for t in ctx.data.texts["train"]]
        shift = self._shift(ctx, target, reference, ref_feats, self._cached(ctx, "train"))
        flagged = shift["mmd_p_value"] < 0.05 and shift["proxy_a_distance"] > dp.pad_threshold
        evidence = {
            "measure": "text",
            **shift,
            "data": data_name(ctx),
            "target_texts": len(target),
            "reference_texts": len(reference),
            "reference_corpus": "Debian fortunes (general-English quotations)",
            "pad_threshold": dp.pad_threshold,
        }
        f = dx.finding(
            "domain_shift",
            f"{ctx.selected} ({data_name(ctx)} vs general English)",
            flagged,
            "warning",
            evidence,
            "Normalise the texts (URLs, mentions, hashtags, emoji, mis-decoded bytes) before tokenizing, or "
            "start from a source adapted to the domain (a `dapt` entry of `pretrain`: masked-LM on your "
            "unlabeled texts).",
        )
        f["measured"] = self._pad(shift["proxy_a_distance"], dp.pad_threshold)
        return [f]

    @staticmethod
    def _pad(pad: float, threshold: float) -> dict:
        return dx.graded(
            pad,
            None,
            None,
            threshold,
            "above",
            quantity="proxy A-distance, source embeddings of the target texts vs general English",
            interval="none: one held-out classifier (flagged only with the MMD permutation test's p < 0.05 too)",
        )

    def remedy(self, ctx: DiagnosisContext, finding: dict) -> dict | None:
        from transferlab.diagnosis.text_measures import normalise

        texts = {s: [str(t) for t in ctx.data.texts[s]] for s in ("train", "val", "test")}
        rows = ctx.test_rows(ctx.sample_ids)  # test predictions in the order of ctx.y
        labels = ctx.data.labels
        raw = {s: self._cached(ctx, s) for s in texts}
        norm_texts = {s: [normalise(t) for t in texts[s]] for s in texts}
        norm = {s: self._embed(ctx, norm_texts[s]) for s in texts}
        before, val_before = probe_predictions(raw, labels, ctx.seed)
        after, val_after = probe_predictions(norm, labels, ctx.seed)
        reference, ref_feats = self._reference(ctx)
        shifted = self._shift(ctx, norm_texts["train"], reference, ref_feats, norm["train"])
        t0, t1 = finding["evidence"]["target"], shifted["target"]
        m = finding["measured"]
        pad_after = self._pad(shifted["proxy_a_distance"], m["threshold"])
        out = dx.remedy_result(
            "remedy",
            f"text normalisation, {ctx.selected} embeddings + logistic-regression probe (C on validation), the shift "
            "re-measured on the normalised texts",
            before=m,
            after=pad_after,
            change=dx.difference(m, pad_after),
            target=ctx.target_change(before[rows][None, :], after[rows][None, :]),
            note=(
                f"validation {val_before:.3f} -> {val_after:.3f}; unknown-token rate "
                f"{t0['unknown_token_rate']:.4f} -> {t1['unknown_token_rate']:.4f}, pieces per word "
                f"{t0['pieces_per_word']:.3f} -> {t1['pieces_per_word']:.3f}; MMD p "
                f"{finding['evidence']['mmd_p_value']:.3f} -> {shifted['mmd_p_value']:.3f}"
            ),
        )
        out["shift_after_normalisation"] = shifted
        adapted = self._adapted(ctx)
        if adapted:
            out["alternatives"] = [adapted]
        return out

    def _adapted(self, ctx: DiagnosisContext) -> dict | None:
        """The domain-adapted copy of the selected source against the source, under the agreement probe."""
        from transferlab.training.pretraining import PretrainSpec

        adapted = [
            n
            for n, spec in ctx.params.sources.items()
            if spec.kind == "pipeline"
            and (ctx.params.pretrain.get(n) or {}).get("kind") == "dapt"
            and PretrainSpec.model_validate(ctx.params.pretrain[n]).base in (ctx.selected, ctx.selected_spec.arch)
        ]
        for name in adapted:
            a, b = f"linear_probe:{ctx.selected}", f"linear_probe:{name}"
            if a in ctx.candidates and b in ctx.candidates:
                return dx.remedy_result(
                    "evidence",
                    f"domain-adapted source {name} (masked-LM on the unlabeled target texts) against {ctx.selected}, "
                    "the agreement stage's converged linear probes (two existing models compared)",
                    before=None,
                    after=None,
                    change=None,
                    target=ctx.target_change(ctx.candidates[a][None, :], ctx.candidates[b][None, :]),
                )
        return None
