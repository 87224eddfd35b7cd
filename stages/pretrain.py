"""Stage `pretrain`: train the in-pipeline source models (params `pretrain`) on their known source tasks.

Writes models/pretrain/<name>/ (model.pt, the held-out source test split) for each entry, and
models/pretrain/index.json listing them, so the folder exists even when no entry does. The provenance of
each run (MLflow run id, git state) goes to <run-info>/<name>.json, outside models/pretrain: the stages that
depend on the weights must not see a new hash when only the run id changed.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from stages._common import params_or_exit, parser, run_main
from transferlab.core.io import write_json, write_text
from transferlab.core.seeding import seed_everything
from transferlab.params import ParamsError
from transferlab.provenance.tracking import run_info, stage_run
from transferlab.training.pretraining import PretrainSpec, pretrain, save_pretrained


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--out", required=True, help="folder; one sub-folder per pretrain entry")
    p.add_argument("--metrics", required=True)
    p.add_argument("--history", required=True, help="folder of per-epoch CSVs")
    p.add_argument("--run-info", required=True, help="folder of provenance JSONs, one per source (runs/pretrain)")
    p.add_argument("--prepared", default="data/prepared", help="prepared target data (dapt: its unlabeled texts)")
    args = p.parse_args()
    params = params_or_exit(args.params)
    specs = {}
    for name, raw in sorted(params.pretrain.items()):
        try:
            specs[name] = PretrainSpec.model_validate(raw)
        except ValidationError as exc:
            raise ParamsError(f"pretrain.{name}: {exc}") from None
    out, metrics = Path(args.out), {}
    out.mkdir(parents=True, exist_ok=True)
    for name, spec in specs.items():
        read = {"seed": params.seed, f"pretrain.{name}": spec.model_dump()}
        gen = seed_everything(params.seed, params.train.num_threads)
        with stage_run(params.tracking, f"pretrain@{name}", read, tags={"source": name}) as run:
            import mlflow
            import pandas as pd

            if spec.kind == "dapt":
                from transferlab.data.splits import load_prepared
                from transferlab.training.pretraining import domain_adaptive_pretrain, save_dapt

                data = load_prepared(args.prepared)
                if data.modality != "text":
                    raise ParamsError(f"pretrain.{name}: kind 'dapt' needs a text dataset (data.dataset)")
                model, m, history = domain_adaptive_pretrain(
                    spec,
                    [str(t) for t in data.texts["unlabeled"]],
                    data.meta["tokenizer_vocab_sha256"],
                    int(data.meta["max_length"]),
                    params.seed,
                    gen,
                )
                save_dapt(out / name, model, spec)
            else:
                result, source_test, m = pretrain(spec, params.seed, gen, label=name)
                save_pretrained(out / name, result, spec, source_test)
                history = result.history
                m["train_seconds"] = round(result.train_seconds, 3)
            write_text(
                Path(args.history) / f"{name}.csv", pd.DataFrame(history).to_csv(index=False, lineterminator="\n")
            )
            write_json(Path(args.run_info) / f"{name}.json", run_info(run, f"pretrain@{name}", read, {}))
            mlflow.log_metrics({k: float(v) for k, v in m.items()})
            m.pop("train_seconds")  # wall time: in MLflow, not in the DVC metrics (reruns stay bit-identical)
            metrics[name] = m
    write_json(out / "index.json", {"sources": sorted(specs)})
    Path(args.run_info).mkdir(parents=True, exist_ok=True)  # declared as an output even with no source
    write_json(args.metrics, metrics)
    Path(args.history).mkdir(parents=True, exist_ok=True)


if __name__ == "__main__":
    run_main(main)
