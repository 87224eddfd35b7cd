"""Stage `score`: transferability estimates and cost per candidate source; ranking and selection.

Writes `metrics/score.json` (estimates, deterministic costs, ranking, selection), `data/selection.json`
(only the source that `train.source` resolves to, so that training reruns only when that changes) and
`perf/score.json` (measured CPU latency per candidate: wall time, kept out of the metrics).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stages._common import params_or_exit, parser, run_main
from transferlab.core.io import read_json, write_json
from transferlab.data.splits import load_prepared
from transferlab.provenance.tracking import stage_run
from transferlab.scoring.selection import read_costs, score_candidates


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--prepared", required=True)
    p.add_argument("--features", required=True, help="folder of features/<source>/ caches")
    p.add_argument("--latency", required=True, help="folder of perf/features/<source>.json")
    p.add_argument("--metrics", required=True)
    p.add_argument("--selection", required=True)
    p.add_argument("--perf", required=True)
    args = p.parse_args()
    params = params_or_exit(args.params)
    sp = params.score
    read = {
        "seed": params.seed,
        "score": sp.model_dump(),
        "sources": {k: v.model_dump() for k, v in params.sources.items()},
        "train.source": params.train.source,
    }
    names = sorted(params.sources)
    missing = [n for n in names if not (Path(args.features) / n / "train_features.npy").is_file()]
    if missing:
        raise SystemExit(f"no features cached for {missing}: run `dvc repro` (features@<source> stages)")
    labels = load_prepared(args.prepared).labels["train"]
    latency = {n: read_json(Path(args.latency) / f"{n}.json") for n in names}
    with stage_run(params.tracking, "score", read):
        import mlflow

        result = score_candidates(
            args.features,
            {n: params.sources[n].kind for n in names},
            labels,
            estimators=list(sp.estimators),
            select_by=sp.select_by,
            seed=params.seed,
            costs=read_costs(args.features, names),
            latency_ms={n: latency[n]["latency_ms_batch1"] for n in names},
            max_params=sp.max_params,
            max_latency_ms=sp.max_latency_ms,
        )
        resolved = result["selected"] if params.train.source == "auto" else params.train.source
        result["train_source"] = resolved
        write_json(args.metrics, result)
        write_json(
            args.selection,
            {
                "selected": resolved,
                "auto": params.train.source == "auto",
                "spec": params.sources[resolved].model_dump(),
            },
        )
        write_json(args.perf, latency)
        for n, row in result["candidates"].items():
            mlflow.log_metrics({f"{n}.{k}": float(v) for k, v in row.items() if isinstance(v, int | float)})
        mlflow.set_tag("selected", result["selected"])
        mlflow.log_metric("labels_mean", float(np.mean(labels)))


if __name__ == "__main__":
    run_main(main)
