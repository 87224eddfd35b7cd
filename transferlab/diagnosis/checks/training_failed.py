"""Check `training_failed`: one finding per strategy, every seed's run judged by the train stage's rule: a run
that stayed at chance, whose loss never fell, or that diverged."""

from __future__ import annotations

import math

from transferlab.core import layout
from transferlab.core.io import read_json
from transferlab.diagnosis import findings as dx
from transferlab.diagnosis.checks import Check, DiagnosisContext, register_check


def per_seed_records(metrics: dict) -> dict[int, dict]:
    """seed -> that seed's record in a `metrics/train/<strategy>.json`, read defensively.

    Accepts per-seed records under `per_seed` or `seeds` (a dict keyed by seed, or a list of records with
    a `seed`); the file's top-level `lr` (the rate the train stage chose on validation) and `lr_search` are
    copied into each record that lacks them. A file without per-seed records is returned under key -1
    (it applies to every seed).
    """
    if not isinstance(metrics, dict):
        return {}
    shared = {k: metrics[k] for k in ("lr", "lr_search") if k in metrics}
    for key in ("per_seed", "seeds"):
        block = metrics.get(key)
        if isinstance(block, dict):
            return {int(k): {**shared, **v} for k, v in block.items() if isinstance(v, dict)}
        if isinstance(block, list) and block and all(isinstance(r, dict) and "seed" in r for r in block):
            return {int(r["seed"]): {**shared, **r} for r in block}
    return {-1: metrics}


@register_check("training_failed")
class TrainingFailed(Check):
    order = 10

    def measure(self, ctx: DiagnosisContext) -> list[dict]:
        out = []
        for name in sorted(ctx.params.strategies):
            histories = layout.read_histories(ctx.history_dir / name)
            path = ctx.train_metrics_dir / f"{name}.json" if ctx.train_metrics_dir else None
            records = per_seed_records(read_json(path)) if path and path.is_file() else {}
            runs = {}
            for seed in sorted(set(histories) | {s for s in records if s >= 0}):
                hist = histories[seed].to_dict("records") if seed in histories else []
                hist = [{k: v for k, v in r.items() if not (isinstance(v, float) and math.isnan(v))} for r in hist]
                runs[seed] = (hist, records.get(seed, records.get(-1, {})))
            if runs:  # one finding per model, every seed judged
                out.append(dx.training_failed(name, runs, ctx.data.num_classes))
        return out
