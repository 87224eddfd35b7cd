"""Stage `deploy-prepare` (deploy/pipeline.yaml, opt-in): the deployment images, stored like the prepared splits.

`deploy.data.kind: corrupted` draws the target data set's unused images (never train, val or test) and corrupts
them; `folder` reads a user's folder (`transferlab.data.deployment`). The images go to `--images`; their labels,
when there are any, to `--labels`, a separate output: deploy-train (DANN) depends on the images only, so it cannot
read a label, and the deploy stage reads them only to check predictions.
"""

from __future__ import annotations

from stages._common import params_or_exit, parser, run_main


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--prepared", required=True)
    p.add_argument("--images", required=True, help="folder for the deployment images (no labels)")
    p.add_argument("--labels", required=True, help="folder for their labels, when known (checking only)")
    p.add_argument("--metrics", required=True)
    args = p.parse_args()
    params = params_or_exit(args.params)
    spec = params.deploy.data

    from transferlab.core.io import write_json
    from transferlab.data.deployment import corrupted_deployment, folder_deployment, save_deployment
    from transferlab.data.loaders import DatasetError, load_dataset
    from transferlab.data.splits import load_prepared
    from transferlab.params import DATASET_MODALITY
    from transferlab.provenance.tracking import stage_run

    if DATASET_MODALITY[params.data.dataset] != "image":
        raise DatasetError(
            f"deploy: the deployment study measures images, and data.dataset '{params.data.dataset}' holds texts: "
            "run `make repro-deploy` with an image profile"
        )
    data = load_prepared(args.prepared)
    read = {"seed": params.seed, "data": params.data.model_dump(), "deploy.data": spec.model_dump()}
    with stage_run(params.tracking, "deploy-prepare", read) as _run:
        import mlflow

        if spec.kind == "corrupted":
            dep = corrupted_deployment(load_dataset(params.data), data, params.data, spec, params.seed)
        else:
            dep = folder_deployment(spec.path, data.class_names, params.data, spec, params.seed)
        summary = save_deployment(args.images, args.labels, dep, data.class_names)
        write_json(args.metrics, summary)
        mlflow.log_metric("deployment_images", summary["images"])
        mlflow.set_tag("deployment_labelled", str(summary["labelled"]))


if __name__ == "__main__":
    run_main(main)
