"""Check `forgetting_exact`: for the in-pipeline source (its source task's test set is on disk), the
source-task accuracy of the fine-tuned backbone with the source head, two ways:

* as fine-tuned (weights AND BatchNorm statistics moved to the target): what a reused backbone does;
* with the source's BatchNorm buffers (running mean/var) restored: the damage done by the weights alone.

The gap between them is the share of forgetting due to the statistics. The fine-tune and the L2-SP remedy
use the pipeline's recipe (params.train, finetune_full's lr and backbone_lr_mult). Also the learning-rate
sweep (`lr_sensitivity`): the best rate is chosen on validation; test accuracy is reported only.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from transferlab.diagnosis import findings as dx
from transferlab.diagnosis.checks import Check, DiagnosisContext, register_check
from transferlab.models.inference import predict_images
from transferlab.strategies import strategy_config


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

    def _run(self, ctx: DiagnosisContext, kind: str, lr: float, epochs: int | None = None) -> dict:
        key = (kind, lr, epochs)
        runs = ctx.cache.setdefault("forgetting_runs", {})
        if key not in runs:
            fs = ctx.params.diagnose.forgetting_source
            base = ctx.load_source(fs)
            head = copy.deepcopy(base.model.get_classifier())
            s_images, _ = self._source_task(ctx)
            res = ctx.finetune_like(kind, lr, source=fs, epochs=epochs)
            dev = ctx.device
            # Buffers copied before any model moves: restore_bn_buffers reads the source's on the CPU.
            restored = restore_bn_buffers(res.model, base.model)
            runs[key] = {
                "val_accuracy": float(res.best_val_accuracy),
                "test_pred": predict_images(res.model, ctx.test_images, base.mean, base.std, device=dev)
                .argmax(1)
                .numpy(),
                "source_pred": dx.source_head_predictions(res.model, head, s_images, base.mean, base.std, device=dev),
                "source_pred_bn_restored": dx.source_head_predictions(
                    restored, head, s_images, base.mean, base.std, device=dev
                ),
            }
        return runs[key]

    def _default_lr(self, ctx: DiagnosisContext) -> float:
        return float(strategy_config("finetune_full", ctx.params.strategies.get("finetune_full") or {}).lr)

    def measure(self, ctx: DiagnosisContext) -> list[dict]:
        dp = ctx.params.diagnose
        fs = dp.forgetting_source
        s_images, s_labels = self._source_task(ctx)
        base = ctx.load_source(fs)
        head = copy.deepcopy(base.model.get_classifier())
        before = dx.source_head_predictions(base.model, head, s_images, base.mean, base.std, device=ctx.device)
        acc_before = float((before == s_labels).mean())
        lr = self._default_lr(ctx)
        run = self._run(ctx, "finetune_full", lr)
        after = float((run["source_pred"] == s_labels).mean())
        after_bn = float((run["source_pred_bn_restored"] == s_labels).mean())
        cfg = strategy_config("finetune_full", ctx.params.strategies.get("finetune_full") or {})
        f = dx.finding(
            "catastrophic_forgetting",
            f"{fs} -> finetune_full (exact: source task kept)",
            acc_before - after > dp.forgetting_drop_threshold,
            "warning",
            {
                "source_accuracy_before": round(acc_before, 6),
                "source_accuracy_after": round(after, 6),
                "source_accuracy_drop": round(acc_before - after, 6),
                "source_accuracy_after_bn_restored": round(after_bn, 6),
                "source_accuracy_drop_bn_restored": round(acc_before - after_bn, 6),
                "drop_due_to_bn_statistics": round(after_bn - after, 6),
                "lr": lr,
                "recipe": ctx.recipe("finetune_full", cfg).record(),
                "seed": ctx.train_seed,
                "source_test_samples": len(s_labels),
                "threshold": dp.forgetting_drop_threshold,
            },
            "L2-SP (pull towards the source weights), a lower learning rate, or freezing early blocks; when "
            "restoring the source's BatchNorm statistics recovers most of the drop, keep a copy of them for the "
            "source task.",
        )
        sweep = []
        # Every rate, the pipeline's own included, gets the same short budget: rates trained for different
        # numbers of epochs cannot be compared (the converged run above measures forgetting, not this).
        for rate in sorted(set(dp.lr_sweep) | {lr}):
            r = self._run(ctx, "finetune_full", rate, dp.sweep_epochs)
            s_acc = float((r["source_pred"] == s_labels).mean())
            sweep.append(
                {
                    "lr": rate,
                    "epochs": dp.sweep_epochs,
                    "val_accuracy": round(r["val_accuracy"], 6),
                    "test_accuracy": round(float((r["test_pred"] == ctx.y).mean()), 6),
                    "source_accuracy_after": round(s_acc, 6),
                    "source_accuracy_drop": round(acc_before - s_acc, 6),
                }
            )
        lr_f = dx.lr_sensitivity(
            sweep, spread_threshold=dp.lr_spread_threshold, forgetting_threshold=dp.forgetting_drop_threshold
        )
        return [f, lr_f]

    def remedy(self, ctx: DiagnosisContext, finding: dict) -> dict | None:
        if finding["type"] != "catastrophic_forgetting":
            return None
        _, s_labels = self._source_task(ctx)
        lr = finding["evidence"]["lr"]
        plain, l2sp = self._run(ctx, "finetune_full", lr), self._run(ctx, "l2sp", lr)
        out = dx.remedy_outcome(
            s_labels,
            plain["source_pred"],
            l2sp["source_pred"],
            ctx.n_bootstrap,
            ctx.seed,
            f"l2sp (alpha={ctx.params.diagnose.l2sp_alpha}, AdamW variant: not the paper's SGD with momentum) "
            f"at lr {lr:g}, the pipeline's recipe",
            metric="source-task accuracy",
            confidence=ctx.confidence,
        )
        t = dx.remedy_outcome(
            ctx.y, plain["test_pred"], l2sp["test_pred"], ctx.n_bootstrap, ctx.seed, "l2sp", confidence=ctx.confidence
        )
        out["note"] = (
            f"target test accuracy {t['before']:.3f} -> {t['after']:.3f} ({t['verdict']}); validation "
            f"{plain['val_accuracy']:.3f} -> {l2sp['val_accuracy']:.3f}"
        )
        out["target_test_change"] = t["change"]
        return out
