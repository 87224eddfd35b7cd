"""Stage `prepare`: target dataset -> validated, stratified, seeded, pre-decoded train/val/test splits."""

from __future__ import annotations

import time

from stages._common import params_or_exit, parser, run_main
from transferlab.core.io import write_json
from transferlab.data.loaders import load_dataset
from transferlab.data.splits import prepare_splits, save_prepared
from transferlab.provenance.tracking import stage_run


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--out", required=True, help="folder for the prepared splits")
    p.add_argument("--metrics", required=True, help="metrics JSON (counts, duplicates, imbalance)")
    args = p.parse_args()
    params = params_or_exit(args.params)
    read = {"seed": params.seed, "data": params.data.model_dump()}
    with stage_run(params.tracking, "prepare", read) as _run:
        import mlflow

        t = time.perf_counter()
        raw = load_dataset(params.data)
        splits, report = prepare_splits(raw, params.data, params.seed)
        save_prepared(
            args.out,
            splits,
            raw.class_names,
            {
                "dataset": params.data.dataset,
                "input_sha256": raw.input_sha256,
                "seed": params.seed,
                **(
                    {
                        "tokenizer": params.data.tokenizer,
                        "max_length": params.data.max_length,
                        "tokenizer_vocab_sha256": report["tokenizer_vocab_sha256"],
                    }
                    if raw.modality == "text"
                    else {"image_size": params.data.image_size}
                ),
            },
        )
        write_json(args.metrics, report)
        mlflow.log_metrics({k: v for k, v in report.items() if isinstance(v, int | float)})
        mlflow.log_metric("prepare_seconds", time.perf_counter() - t)
        mlflow.set_tag("input_sha256", raw.input_sha256)


if __name__ == "__main__":
    run_main(main)
