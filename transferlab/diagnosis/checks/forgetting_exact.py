"""Check `forgetting_exact`: for the in-pipeline source (its source task's test set is on disk), the
source-task accuracy of the fine-tuned backbone with the source head, two ways:

* as fine-tuned (weights AND BatchNorm statistics moved to the target): what a reused backbone does;
* with the source's BatchNorm buffers (running mean/var) restored: the damage done by the weights alone.

The gap between them is the share of forgetting due to the statistics. The model measured is finetune_full
trained from that source by the diagnosis under the pipeline's protocol (`ctx.protocol`: the rate chosen on
validation, every seed of `train.seeds`); the drop is graded with its interval over source test images and
seeds. The L2-SP remedy is trained the same way and re-graded against the same threshold; so is, with
`diagnose.progressive_remedy`, progressive networks (the source kept as a frozen column beside a new one: its
source-task predictions are those of its source column, measured like the others), reported beside L2-SP with
what each model costs (parameters trainable and total, training FLOPs per image; CPU latency per image goes to
the stage's perf file, being wall time). Also the
learning-rate sweep (`lr_sensitivity`, on the same source): the best rate is chosen on validation; test
accuracy is reported only.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from transferlab.diagnosis import findings as dx
from transferlab.diagnosis.checks import Check, DiagnosisContext, register_check
from transferlab.evaluation.predictions import cpu_latency_ms
from transferlab.models.columns import ProgressiveNet
from transferlab.models.inference import predict_images


def restore_bn_buffers(tuned: torch.nn.Module, source: torch.nn.Module) -> torch.nn.Module:
    """A copy of `tuned` whose BatchNorm running statistics are the source's (weights untouched)."""
    out = copy.deepcopy(tuned)
    src = dict(source.named_modules())
    for name, m in out.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats and name in src:
            m.running_mean.copy_(src[name].running_mean)
            m.running_var.copy_(src[name].running_var)
    return out


@register_check("forgetting_exact")
class ForgettingExact(Check):
    order = 35
    modalities = ("image",)

    def applies(self, ctx: DiagnosisContext) -> bool:
        return ctx.params.diagnose.forgetting_source is not None

    def _source_task(self, ctx: DiagnosisContext):
        fs = ctx.params.diagnose.forgetting_source
        pdir = ctx.pretrained_dir / fs
        return np.load(pdir / "source_test_images.npy"), np.load(pdir / "source_test_labels.npy")

    def _predict(self, ctx: DiagnosisContext, model: torch.nn.Module) -> dict:
        """Target test, source-task and source-task-with-the-source's-BN-statistics predictions of `model`."""
        fs = ctx.params.diagnose.forgetting_source
        base = ctx.load_source(fs)
        head = copy.deepcopy(base.model.get_classifier())
        s_images, _ = self._source_task(ctx)
        dev = ctx.device
        # The backbone that carries the source task: a progressive network keeps it as its source column (the
        # new column serves the target only), so the source head goes on that column, measured, not assumed.
        backbone = model.source if isinstance(model, ProgressiveNet) else model
        # Buffers copied before any model moves: restore_bn_buffers reads the source's on the CPU.
        restored = restore_bn_buffers(backbone, base.model)
        return {
            "test_pred": predict_images(model, ctx.test_images, base.mean, base.std, device=dev).argmax(1).numpy(),
            "source_pred": dx.source_head_predictions(backbone, head, s_images, base.mean, base.std, device=dev),
            "source_pred_bn_restored": dx.source_head_predictions(
                restored, head, s_images, base.mean, base.std, device=dev
            ),
        }

    def _protocol_run(self, ctx: DiagnosisContext, kind: str, like: str | None = "finetune_full", **overrides) -> dict:
        """`kind` trained from the forgetting source under the pipeline's protocol (settings as `ctx.protocol`
        takes them, `like` included); every seed's predictions stacked (k_seeds, n), the first seed's model and
        its size and training compute."""
        key = (kind, like, tuple(sorted(overrides.items())))
        runs = ctx.cache.setdefault("forgetting_runs", {})
        if key not in runs:
            res = ctx.protocol(kind, source=ctx.params.diagnose.forgetting_source, like=like, **overrides)
            per_seed = [self._predict(ctx, run.model) for _, run in sorted(res.runs.items())]
            first = res.runs[min(res.runs)]
            runs[key] = {
                "lr": float(res.lr),
                "seeds": sorted(res.runs),
                "val_accuracy": [round(float(r.best_val_accuracy), 6) for _, r in sorted(res.runs.items())],
                "model": first.model,
                "cost": {
                    "trainable_params": int(first.trainable_params),
                    "total_params": int(first.total_params),
                    "train_flops_per_image": int(first.train_flops["total"]),
                },
                **{k: np.stack([p[k] for p in per_seed]) for k in per_seed[0]},
            }
        return runs[key]

    def _sweep_run(self, ctx: DiagnosisContext, lr: float, epochs: int) -> dict:
        key = ("sweep", lr, epochs)
        runs = ctx.cache.setdefault("forgetting_runs", {})
        if key not in runs:
            res = ctx.finetune_like("finetune_full", lr, source=ctx.params.diagnose.forgetting_source, epochs=epochs)
            runs[key] = {"val_accuracy": float(res.best_val_accuracy), **self._predict(ctx, res.model)}
        return runs[key]

    def _drop(self, ctx: DiagnosisContext, before: np.ndarray, after_rows: np.ndarray) -> dict:
        """Source-task accuracy before - after (all seeds), graded against the drop threshold."""
        _, s_labels = self._source_task(ctx)
        g = dx._gain(s_labels, before[None, :], after_rows, ctx.n_bootstrap, ctx.seed, ctx.confidence)
        return dx.graded(
            g["gain"],
            g["ci_low"],
            g["ci_high"],
            ctx.params.diagnose.forgetting_drop_threshold,
            "above",
            quantity="source-task accuracy drop (source head on the fine-tuned backbone), mean over seeds",
            interval="paired bootstrap over source test images + Student-t seed term",
            confidence=ctx.confidence,
        )

    def measure(self, ctx: DiagnosisContext) -> list[dict]:
        dp = ctx.params.diagnose
        fs = dp.forgetting_source
        s_images, s_labels = self._source_task(ctx)
        base = ctx.load_source(fs)
        head = copy.deepcopy(base.model.get_classifier())
        before = dx.source_head_predictions(base.model, head, s_images, base.mean, base.std, device=ctx.device)
        ctx.cache["forgetting_before"] = before
        acc_before = float((before == s_labels).mean())
        run = self._protocol_run(ctx, "finetune_full")
        drop = self._drop(ctx, before, run["source_pred"])
        drop_bn = self._drop(ctx, before, run["source_pred_bn_restored"])
        after = float((run["source_pred"] == s_labels).mean())
        after_bn = float((run["source_pred_bn_restored"] == s_labels).mean())
        f = dx.finding(
            "catastrophic_forgetting",
            f"finetune_full on {fs} (diagnosis run; exact: source task kept)",
            "ok",
            "warning",
            {
                "source_accuracy_before": round(acc_before, 6),
                "source_accuracy_after": round(after, 6),
                "source_accuracy_drop": drop["value"],
                "source_accuracy_after_bn_restored": round(after_bn, 6),
                "source_accuracy_drop_bn_restored": drop_bn["value"],
                "source_accuracy_drop_bn_restored_interval": [drop_bn["ci_low"], drop_bn["ci_high"]],
                "drop_due_to_bn_statistics": round(after_bn - after, 6),
                "lr": run["lr"],
                "lr_chosen_on": "validation (the pipeline's protocol)",
                "seeds": run["seeds"],
                "source_test_samples": len(s_labels),
                "threshold": dp.forgetting_drop_threshold,
            },
            "L2-SP (pull towards the source weights), a lower learning rate, or freezing early blocks; when "
            "restoring the source's BatchNorm statistics recovers most of the drop, keep a copy of them for the "
            "source task.",
            measured=drop,
        )
        sweep = []
        # Every rate, the protocol's own included, gets the same short budget: rates trained for different
        # numbers of epochs cannot be compared (the protocol run above measures forgetting, not this).
        for rate in sorted(set(dp.lr_sweep) | {run["lr"]}):
            r = self._sweep_run(ctx, rate, dp.sweep_epochs)
            s_acc = float((r["source_pred"] == s_labels).mean())
            sweep.append(
                {
                    "lr": rate,
                    "epochs": dp.sweep_epochs,
                    "seed": ctx.train_seed,
                    "val_accuracy": round(r["val_accuracy"], 6),
                    "test_accuracy": round(float((r["test_pred"] == ctx.y).mean()), 6),
                    "source_accuracy_before": round(acc_before, 6),
                    "source_accuracy_after": round(s_acc, 6),
                    "source_accuracy_drop": round(acc_before - s_acc, 6),
                }
            )
        lr_f = dx.lr_sensitivity(
            sweep,
            spread_threshold=dp.lr_spread_threshold,
            forgetting_threshold=dp.forgetting_drop_threshold,
            subject=f"finetune_full on {fs} (short runs, seed {ctx.train_seed})",
            n_val=len(ctx.data.labels["val"]),
            n_source=len(s_labels),
            confidence=ctx.confidence,
        )
        return [f, lr_f]

    def remedy(self, ctx: DiagnosisContext, finding: dict) -> dict | None:
        if finding["type"] != "catastrophic_forgetting":
            return None
        _, s_labels = self._source_task(ctx)
        alpha = ctx.params.diagnose.l2sp_alpha
        plain = self._protocol_run(ctx, "finetune_full")
        l2sp = self._protocol_run(ctx, "l2sp", alpha=alpha)
        after = self._drop(ctx, ctx.cache["forgetting_before"], l2sp["source_pred"])
        # drop_after - drop_before = accuracy_plain - accuracy_l2sp on the same source images: paired.
        change = dx._gain(
            s_labels, plain["source_pred"], l2sp["source_pred"], ctx.n_bootstrap, ctx.seed, ctx.confidence
        )
        fs = ctx.params.diagnose.forgetting_source
        out = dx.remedy_result(
            "remedy",
            f"l2sp (alpha={alpha}, AdamW variant: not the paper's SGD with momentum) on "
            f"{fs} under the pipeline's protocol: lr {l2sp['lr']:g} chosen on "
            f"validation, seeds {l2sp['seeds']}",
            before=finding["measured"],
            after=after,
            change=change,
            target=ctx.target_change(plain["test_pred"], l2sp["test_pred"]),
            note=f"validation accuracy by seed {plain['val_accuracy']} -> {l2sp['val_accuracy']}",
        )
        runs = {"finetune_full": plain, "l2sp": l2sp}
        if ctx.params.diagnose.progressive_remedy:
            # progressive's own settings (strategies.progressive when listed, else its defaults): its new column
            # trains from random weights, so finetune_full's rate is not its rate.
            prog = self._protocol_run(ctx, "progressive", like=None)
            runs["progressive"] = prog
            after_p = self._drop(ctx, ctx.cache["forgetting_before"], prog["source_pred"])
            out["alternatives"] = [
                dx.remedy_result(
                    "remedy",
                    f"progressive (frozen source column + new column with lateral adapters) on {fs} under the "
                    f"pipeline's protocol: lr {prog['lr']:g} chosen on validation, seeds {prog['seeds']}; the "
                    "source task read from its source column",
                    before=finding["measured"],
                    after=after_p,
                    change=dx._gain(
                        s_labels, plain["source_pred"], prog["source_pred"], ctx.n_bootstrap, ctx.seed, ctx.confidence
                    ),
                    target=ctx.target_change(plain["test_pred"], prog["test_pred"]),
                    note=f"validation accuracy by seed {plain['val_accuracy']} -> {prog['val_accuracy']}; "
                    + _cost_note(runs),
                )
            ]
        out["cost"] = {kind: run["cost"] for kind, run in runs.items()}
        # CPU latency per image (evaluate@'s measurement) of each first-seed model: wall time, so perf/ only.
        n = ctx.params.evaluate.latency_images
        base = ctx.load_source(fs)
        ctx.timings["forgetting_exact"] = {
            "cpu_latency_ms_per_image": {
                kind: cpu_latency_ms(run["model"], ctx.test_images, base.mean, base.std, n)
                for kind, run in runs.items()
            },
            "latency_images": n,
        }
        return out


def _cost_note(runs: dict[str, dict]) -> str:
    """'cost (trainable / total parameters, training GFLOPs per image; ...): finetune_full 4.93M / 4.93M, 0.340;
    ...'."""
    parts = [
        f"{kind} {c['trainable_params'] / 1e6:.2f}M / {c['total_params'] / 1e6:.2f}M, "
        f"{c['train_flops_per_image'] / 1e9:.3f}"
        for kind, c in ((k, r["cost"]) for k, r in runs.items())
    ]
    return (
        "cost (trainable / total parameters, training GFLOPs per image; CPU latency per image in the diagnose "
        "stage's perf file): " + "; ".join(parts)
    )
