"""Stage `dense-prepare` (detection/pipeline.yaml, opt-in): the dense task's train / val / test images with their
boxes and per-pixel masks, from the built-in scene generator or a COCO data set (`dense.data.kind`).

Writes the prepared splits (`--out`, `transferlab.data.dense` layout) and `--metrics` (images and objects per
split, objects dropped as hidden or as bad annotations).
"""

from __future__ import annotations

from stages._common import params_or_exit, parser, run_main


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--out", required=True, help="folder of the prepared dense splits")
    p.add_argument("--metrics", required=True, help="metrics/dense/data.json")
    args = p.parse_args()
    params = params_or_exit(args.params)
    dp, seed = params.dense, params.seed

    from transferlab.core.io import write_json
    from transferlab.data.dense import save_dense

    if dp.data.kind == "scenes":
        from transferlab.data.scenes import generate_scenes

        splits, classes, info = generate_scenes(dp.data, dp.image_size, seed)
    else:
        from transferlab.data.coco import load_coco

        splits, classes, info = load_coco(dp.data, dp.image_size, seed, need_masks=dp.task == "segmentation")
    save_dense(args.out, splits, classes, info)
    counts = {n: {"images": len(s), "objects": sum(len(o) for o in s.objects)} for n, s in splits.items()}
    write_json(args.metrics, {"class_names": classes, "image_size": dp.image_size, "counts": counts, **info})


if __name__ == "__main__":
    run_main(main)
