"""Stage `features@<source>`: one forward pass of a candidate source over the prepared splits, cached,
plus the candidate's cost profile.

Penultimate features (and the source classifier's logits, where it has one) per split, as .npy. Scoring
and the `linear_probe` strategy read this cache; no stage runs a frozen backbone over the same images
twice. `cost.json` (parameters, FLOPs, training-step memory) is deterministic and goes to the score
metrics; CPU latency is wall time and goes to `perf/`. The forward pass runs on `train.device` (the GPU when
there is one, under mixed precision: features then differ from a CPU run's in the last bits); the device
used is recorded in `perf/` and as an MLflow tag.
"""

from __future__ import annotations

from pathlib import Path

from stages._common import params_or_exit, parser, run_main
from transferlab.core.device import device_info, device_tags, resolve_device
from transferlab.core.io import write_json, write_npy
from transferlab.core.seeding import seed_everything
from transferlab.data.splits import load_prepared
from transferlab.models.features import check_source_reads, extract_splits, source_record
from transferlab.models.sources import load_source
from transferlab.params import ParamsError
from transferlab.provenance.tracking import stage_run


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--source", required=True, help="a key of `sources` in params")
    p.add_argument("--prepared", required=True)
    p.add_argument("--pretrained-dir", default="models/pretrain", help="where pretrain@<name> writes models")
    p.add_argument("--out", required=True, help="folder for this source's features and cost.json")
    p.add_argument("--perf", required=True, help="latency JSON (wall time: not a DVC metric)")
    args = p.parse_args()
    params = params_or_exit(args.params)
    from transferlab.models.costs import cost_profile

    if args.source not in params.sources:
        raise ParamsError(f"--source {args.source}: not a key of `sources` (valid: {sorted(params.sources)})")
    spec = params.sources[args.source]
    read = {
        "seed": params.seed,
        f"sources.{args.source}": spec.model_dump(),
        "score.latency_repeats": params.score.latency_repeats,
        "train.device": params.train.device,
    }
    seed_everything(params.seed, params.train.num_threads)
    device = resolve_device(params.train.device)
    data = load_prepared(args.prepared)
    source = load_source(args.source, spec, seed=params.seed, pipeline_dir=args.pretrained_dir)
    check_source_reads(args.source, source, data)
    tags = {"source": args.source, **device_tags(device)}
    with stage_run(params.tracking, f"features@{args.source}", read, tags=tags):
        import mlflow

        out = Path(args.out)
        arrays = extract_splits(source, data, device)
        for stem, array in arrays.items():
            write_npy(out / f"{stem}.npy", array)
        size = int(data.images["train"].shape[1])
        source.model.to("cpu")  # the cost profile (FLOPs, CPU latency) is measured on the CPU
        cost, timed = cost_profile(source.model, size, latency_repeats=params.score.latency_repeats)
        cost["feature_dim"] = int(arrays["train_features"].shape[1])
        write_json(out / "cost.json", cost)
        write_json(args.perf, {**timed, "extract": device_info(device)})
        write_json(out / "source.json", source_record(source))
        mlflow.log_metrics({**{k: float(v) for k, v in cost.items()}, **timed})


if __name__ == "__main__":
    run_main(main)
